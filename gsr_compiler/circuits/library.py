"""The netlists bundled with the ``circuitgraph`` package, and their families.

``circuitgraph`` ships 65 gate-level netlists from four benchmark suites
(ISCAS85, ISCAS89, ITC99, EPFL) plus a few small examples (banyan networks,
muxes, a switch). Several files are versions of the same design: ``c432g`` is a
re-synthesis of ``c432``, ``b17_C`` / ``b17_Cg`` are two combinational versions of
``b17``, ``banyan_8`` ... ``banyan_256`` are one generator at different sizes.
They form a *family*; splits must keep a family together (see ``splits.py``).
"""

from __future__ import annotations

import difflib
import re
from functools import lru_cache
from pathlib import Path

__all__ = [
    "EPFL_CIRCUITS",
    "bundled_netlist_dir",
    "bundled_names",
    "bundled_path",
    "family_of",
    "suite_of",
    "close_matches",
]

#: The EPFL combinational benchmark suite as shipped by circuitgraph
#: (arithmetic and random/control; ``hyp`` is not shipped).
EPFL_CIRCUITS = frozenset(
    {
        "adder", "bar", "div", "log2", "max", "multiplier", "sin", "sqrt", "square",
        "arbiter", "cavlc", "ctrl", "dec", "i2c", "int2float", "memctrl",
        "priority_ckt", "router", "voter",
    }
)  # fmt: skip

NETLIST_SUFFIXES = (".v", ".bench")

# name -> family: strip the suffixes that mark a variant of the same design.
_FAMILY_RULES = (
    (re.compile(r"^(c\d+)(?:g|_assign|_gates)?$"), r"\1"),  # ISCAS85 + re-synthesis
    (re.compile(r"^(s\d+)(?:_unrolled_\d+)?$"), r"\1"),  # ISCAS89 + unrolled copy
    (re.compile(r"^(b\d+)(?:_Cg|_C)$"), r"\1"),  # ITC99 combinational twins
    (re.compile(r"^(banyan)_\d+$"), r"\1"),  # one generator, many sizes
    (re.compile(r"^(mux)_\d+$"), r"\1"),
)


def bundled_netlist_dir() -> Path:
    """Folder holding circuitgraph's netlists."""
    import circuitgraph

    return Path(circuitgraph.__file__).parent / "netlists"


@lru_cache(maxsize=1)
def _bundled() -> dict[str, Path]:
    files = sorted(
        p for p in bundled_netlist_dir().iterdir() if p.suffix in NETLIST_SUFFIXES
    )
    return {p.stem: p for p in files}


def bundled_names() -> list[str]:
    """Names of all bundled netlists, sorted."""
    return sorted(_bundled())


def bundled_path(name: str) -> Path | None:
    """Path of a bundled netlist, or ``None`` if ``name`` is not bundled."""
    return _bundled().get(name)


def family_of(name: str) -> str:
    """Design family of a circuit name (``"c432g"`` -> ``"c432"``, ``"b17_Cg"`` -> ``"b17"``).

    Names that match no variant rule are their own family. User files are
    classified by their file stem with the same rules.
    """
    for pattern, repl in _FAMILY_RULES:
        if pattern.match(name):
            return pattern.sub(repl, name)
    return name


def suite_of(name: str) -> str:
    """Benchmark suite of a bundled circuit: ISCAS85, ISCAS89, ITC99, EPFL or other."""
    family = family_of(name)
    if family in EPFL_CIRCUITS:
        return "EPFL"
    if re.fullmatch(r"c\d+", family):
        return "ISCAS85"
    if re.fullmatch(r"s\d+", family):
        return "ISCAS89"
    if re.fullmatch(r"b\d+", family):
        return "ITC99"
    return "other"


def close_matches(name: str, n: int = 5) -> list[str]:
    """Bundled names similar to ``name`` (for "did you mean" messages)."""
    names = bundled_names()
    matches = difflib.get_close_matches(name, names, n=n, cutoff=0.6)
    # difflib misses short prefixes such as "b19" -> "b19_Cg"; add those too.
    for candidate in names:
        if len(matches) >= n:
            break
        if candidate.startswith(name) and candidate not in matches and len(name) >= 2:
            matches.append(candidate)
    return matches
