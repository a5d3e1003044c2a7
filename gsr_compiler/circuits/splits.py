"""Train / validation / test split of circuits by design family.

Two versions of one design (``c432`` and its re-synthesis ``c432g``, ``b17_C``
and ``b17_Cg``, ``banyan_8`` ... ``banyan_256``) share most of their structure;
if one were in training and the other in test, test scores would measure
memorisation. So whole families go to one side (:func:`~gsr_compiler.circuits.family_of`).

The test side always holds the deep EPFL arithmetic circuits (depths 321 to
9031), where a shallow GNN cannot see far enough: that is where depth must pay
off. Of the other families, a fixed fraction goes to validation, chosen by a
hash of ``(seed, family)``: deterministic on every machine and Python version,
and adding a circuit never moves the others.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

from .library import bundled_names, family_of

__all__ = ["DEEP_ARITHMETIC", "CircuitSplit", "split_by_family"]

#: EPFL arithmetic circuits deeper than 300 levels (``hyp`` is not shipped).
DEEP_ARITHMETIC: tuple[str, ...] = ("div", "log2", "multiplier", "sin", "sqrt", "square")


@dataclass(frozen=True)
class CircuitSplit:
    """Circuit names per side, each list sorted."""

    train: list[str] = field(default_factory=list)
    val: list[str] = field(default_factory=list)
    test: list[str] = field(default_factory=list)

    def side_of(self, name: str) -> str:
        """``"train"``, ``"val"`` or ``"test"`` (``KeyError`` if not in the split)."""
        for side in ("train", "val", "test"):
            if name in getattr(self, side):
                return side
        raise KeyError(name)


def _rank(seed: int, family: str) -> str:
    return hashlib.sha256(f"{seed}:{family}".encode()).hexdigest()


def split_by_family(
    names: Optional[Iterable[str]] = None,
    *,
    val_fraction: float = 0.15,
    test_families: Sequence[str] = DEEP_ARITHMETIC,
    seed: int = 0,
) -> CircuitSplit:
    """Split circuits so that each family lands on exactly one side.

    Args:
        names: circuit names (default: all bundled netlists).
        val_fraction: fraction of the non-test families sent to validation
            (rounded up, at least one family when there are two or more).
        test_families: families always in test (default :data:`DEEP_ARITHMETIC`).
        seed: changes which families go to validation.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    names = sorted(set(bundled_names() if names is None else names))
    test_set = set(test_families)
    families = sorted({family_of(n) for n in names} - test_set)
    num_val = math.ceil(val_fraction * len(families)) if len(families) > 1 else 0
    val_set = set(sorted(families, key=lambda f: _rank(seed, f))[:num_val])
    split = CircuitSplit()
    for name in names:
        family = family_of(name)
        side = "test" if family in test_set else "val" if family in val_set else "train"
        getattr(split, side).append(name)
    return split
