"""Memory budgets: parsing ``"6GiB"``, and choosing the options that make a step fit one.

``parse_budget`` accepts a positive number of bytes or a string with a unit: binary (KiB, MiB,
GiB, TiB) or decimal (KB, MB, GB, TB, and B), case-insensitive, e.g. ``"6GiB"``, ``"512MiB"``,
``"1.5GB"``.

``choose_options`` is what ``GSRConfig.memory_budget`` runs at compile time: it tries the
options the compiler controls in order of the extra compute they cost, predicts each one's step
peak at the traced size from its compiled graph (:mod:`gsr_compiler.peak`), and keeps the first
that fits. The order, cheapest first:

1. the configuration as given;
2. ``recompute_head=True`` and ``plan_memory=True`` (head recomputed per row block: a head's
   forward again; the arena: no extra compute), if they were off;
3. more channel groups (4, 8, ... while they divide the width): narrower branches recomputed
   one at a time; the arithmetic is the same, the kernels narrower;
4. ``sparse_k`` (the group top-k at half, then a quarter, then an eighth of each group): the
   compressed activations are smaller, the top-k costs a selection. It changes the function, so it
   is only tried when ``sparse_k`` was not set to a value already.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

__all__ = ["parse_budget", "BudgetChoice", "UNITS"]

#: Unit -> bytes.
UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_budget(value: Any, name: str = "memory_budget") -> int:
    """Bytes of a budget given as an int/float of bytes or a string such as ``"6GiB"``.

    Raises ``ValueError`` naming ``name`` for a negative, zero, NaN, infinite or unparsable
    budget, or an unknown unit.
    """
    if isinstance(value, bool):
        raise ValueError(f"{name}={value!r}: must be a number of bytes or a string such as "
                         "'6GiB', not a bool")
    if isinstance(value, (int, float)):
        nbytes, text = float(value), repr(value)
    elif isinstance(value, str):
        text = repr(value)
        m = _PATTERN.match(value)
        if m is None:
            raise ValueError(f"{name}={value!r}: cannot read it as a size; write a number and "
                             "a unit, e.g. '6GiB', '512MiB', '1.5GB' (units: "
                             f"{', '.join(_unit_names())})")
        number, unit = m.group(1), m.group(2).lower()
        if unit and unit not in UNITS:
            raise ValueError(f"{name}={value!r}: unknown unit {m.group(2)!r}; use one of "
                             f"{', '.join(_unit_names())} (or a plain number of bytes)")
        nbytes = float(number) * UNITS[unit or "b"]
    else:
        raise ValueError(f"{name}={value!r}: must be a number of bytes or a string such as "
                         f"'6GiB', not {type(value).__name__}")
    if math.isnan(nbytes) or math.isinf(nbytes):
        raise ValueError(f"{name}={text}: must be a finite number of bytes")
    if nbytes <= 0:
        raise ValueError(f"{name}={text}: must be positive (a number of bytes, or e.g. '6GiB')")
    if nbytes < 1:
        raise ValueError(f"{name}={text}: is less than one byte")
    return int(nbytes)


def _unit_names() -> list[str]:
    return ["B", "KB", "MB", "GB", "TB", "KiB", "MiB", "GiB", "TiB"]


@dataclass
class BudgetChoice:
    """What ``memory_budget`` chose, for ``explain()``."""

    budget: int
    options: dict
    predicted_peak: int
    tried: list = field(default_factory=list)  # (options, predicted peak), in the order tried

    def lines(self) -> list[str]:
        from .report import format_bytes

        chosen = ", ".join(f"{k}={v!r}" for k, v in self.options.items()) or "the options as given"
        out = [f"memory budget {format_bytes(self.budget)}: chose {chosen}; predicted step peak "
               f"{format_bytes(self.predicted_peak)} at the traced size"]
        for options, peak in self.tried[:-1]:
            what = ", ".join(f"{k}={v!r}" for k, v in options.items()) or "the options as given"
            out.append(f"  tried {what}: {format_bytes(peak)}, over the budget")
        return out


def candidate_options(config, width: Optional[int]) -> list[dict]:
    """Option overrides, cheapest in extra compute first (see the module docstring)."""
    out: list[dict] = [{}]
    base: dict = {}
    if not config.recompute_head or not config.plan_memory:
        base = {"recompute_head": True, "plan_memory": True}
        out.append(dict(base))
    groups = [config.groups]
    if width:
        g = config.groups * 2
        while g <= width and width % g == 0 and width // g >= 4:
            groups.append(g)
            out.append({**base, "groups": g})
            g *= 2
    if config.sparse_k is None and width:
        for G in groups:
            gw = width // G
            for k in sorted({max(1, gw // 2), max(1, gw // 4), max(1, gw // 8)}, reverse=True):
                opts = {**base, "sparse_k": k}
                if G != config.groups:
                    opts["groups"] = G
                out.append(opts)
    return out


def choose_options(config, width: Optional[int],
                   predict: Callable[[dict], int]) -> tuple[dict, int, list]:
    """The first candidate whose predicted peak (``predict(overrides)``) fits
    ``config.memory_budget``: ``(overrides, peak, tried)``; ``tried`` lists every candidate
    predicted, and the last one's peak is the smallest seen when none fits."""
    budget = config.memory_budget
    tried = []
    for overrides in candidate_options(config, width):
        peak = predict(overrides)
        tried.append((overrides, peak))
        if peak <= budget:
            return overrides, peak, tried
    return None, min(p for _, p in tried), tried
