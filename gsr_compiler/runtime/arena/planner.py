"""Offsets for activation buffers in one arena, from their live intervals.

Each buffer ``b`` is live during the inclusive step range ``[b.first_use, b.last_use]`` and needs
``b.size`` bytes. Two buffers whose intervals intersect must not share bytes; the plan assigns an
offset to every buffer so that this holds and the arena (the largest ``offset + size``) is small.

This is the dynamic storage allocation problem (NP-hard in general). We use the greedy heuristic
of Pisarchyk & Lee, "Efficient Memory Management for Deep Neural Net Inference" (2020): place the
buffers one at a time, each into the best-fitting gap left between the already placed buffers that
are live at the same time, and run it for several orderings, keeping the smallest plan.

The plan is reported against the lower bound

.. math::
    \\mathrm{LB} = \\max_t \\sum_{b \\,:\\, t \\in [b.first, b.last]} b.size,

the peak of simultaneously live bytes, which no placement can beat.

Sizes may be symbolic in the number of nodes ``N`` and edges ``E`` (:class:`SymbolicSize`);
:class:`ArenaPlanCache` evaluates them per input size and keeps the last few plans.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = [
    "SymbolicSize",
    "LiveInterval",
    "Buffer",
    "ArenaPlan",
    "ArenaPlanCache",
    "plan_arena",
    "live_bytes_lower_bound",
    "ORDERINGS",
]


# --------------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SymbolicSize:
    """A byte count affine in the graph size: ``const + per_node * N + per_edge * E``.

    Example: a float32 activation of shape ``[N, 128]`` is ``SymbolicSize(per_node=512)``; the
    compressed form of a ``[N, 8 groups, k=4]`` float32 top-k is values plus uint8 indices,
    ``SymbolicSize(per_node=8 * 4 * (4 + 1))``. Sizes add and scale by integers.
    """

    const: int = 0
    per_node: int = 0
    per_edge: int = 0

    def __post_init__(self) -> None:
        for name in ("const", "per_node", "per_edge"):
            value = getattr(self, name)
            if int(value) != value:
                raise TypeError(f"SymbolicSize.{name} must be an integer, got {value!r}")
            object.__setattr__(self, name, int(value))

    def evaluate(self, N: int, E: int = 0) -> int:
        """Bytes for a graph with ``N`` nodes and ``E`` edges (never negative)."""
        nbytes = self.const + self.per_node * int(N) + self.per_edge * int(E)
        if nbytes < 0:
            raise ValueError(f"size {self} is negative at N={N}, E={E}")
        return nbytes

    @property
    def is_constant(self) -> bool:
        return self.per_node == 0 and self.per_edge == 0

    def __add__(self, other: Union["SymbolicSize", int]) -> "SymbolicSize":
        other = as_symbolic(other)
        return SymbolicSize(self.const + other.const, self.per_node + other.per_node,
                            self.per_edge + other.per_edge)

    __radd__ = __add__

    def __mul__(self, factor: int) -> "SymbolicSize":
        if int(factor) != factor:
            return NotImplemented
        factor = int(factor)
        return SymbolicSize(self.const * factor, self.per_node * factor, self.per_edge * factor)

    __rmul__ = __mul__

    def __str__(self) -> str:
        terms = []
        if self.per_node:
            terms.append(f"{self.per_node}*N")
        if self.per_edge:
            terms.append(f"{self.per_edge}*E")
        if self.const or not terms:
            terms.append(str(self.const))
        return " + ".join(terms)


SizeLike = Union[int, SymbolicSize]


def as_symbolic(size: SizeLike) -> SymbolicSize:
    if isinstance(size, SymbolicSize):
        return size
    if int(size) != size:
        raise TypeError(f"size must be an int or SymbolicSize, got {size!r}")
    return SymbolicSize(const=int(size))


# --------------------------------------------------------------------------------------------
# Buffers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LiveInterval:
    """One buffer: ``size`` bytes live from step ``first_use`` to step ``last_use``, inclusive.

    Steps are positions in the execution order (forward then backward, as the liveness analysis
    numbers them). A buffer written at step 3 and last read at step 7 is ``first_use=3,
    last_use=7``; a buffer written at step 8 may then reuse its bytes.
    """

    name: str
    size: SizeLike
    first_use: int
    last_use: int

    def __post_init__(self) -> None:
        if self.last_use < self.first_use:
            raise ValueError(f"buffer {self.name!r}: last_use {self.last_use} < first_use "
                             f"{self.first_use}")
        if isinstance(self.size, int) and self.size < 0:
            raise ValueError(f"buffer {self.name!r}: negative size {self.size}")

    def overlaps_in_time(self, other: "LiveInterval") -> bool:
        return self.first_use <= other.last_use and other.first_use <= self.last_use

    def nbytes(self, N: Optional[int] = None, E: Optional[int] = None) -> int:
        if isinstance(self.size, SymbolicSize):
            if self.size.is_constant:
                return self.size.const
            if N is None:
                raise ValueError(f"buffer {self.name!r} has symbolic size {self.size}: pass N "
                                 "(and E) to evaluate it")
            return self.size.evaluate(N, 0 if E is None else E)
        return int(self.size)


#: The record the issue calls a buffer: same thing, both names are public.
Buffer = LiveInterval


def _round_up(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


def live_bytes_lower_bound(sizes: Sequence[int], first: Sequence[int], last: Sequence[int]) -> int:
    """Peak over all steps of the bytes live at that step (intervals are inclusive)."""
    events: List[Tuple[int, int]] = []
    for size, lo, hi in zip(sizes, first, last):
        if size:
            events.append((lo, size))
            events.append((hi + 1, -size))
    # At equal step, ends (negative) come before starts: a buffer dying at t-1 frees its bytes
    # for one born at t.
    events.sort(key=lambda ev: (ev[0], ev[1]))
    live = peak = 0
    for _, delta in events:
        live += delta
        peak = max(peak, live)
    return peak


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------


@dataclass
class ArenaPlan:
    """Offsets of every buffer in one arena of ``total_bytes``.

    ``sizes`` are the requested bytes (not rounded); each offset is a multiple of ``alignment``.
    ``lower_bound`` is the peak of live requested bytes; ``gap_percent`` how far above it the plan
    is. ``ordering`` names the buffer order that produced the smallest plan.
    """

    offsets: Dict[str, int]
    sizes: Dict[str, int]
    intervals: Dict[str, Tuple[int, int]]
    total_bytes: int
    lower_bound: int
    alignment: int
    ordering: str = ""
    candidates: Dict[str, int] = field(default_factory=dict)
    num_nodes: Optional[int] = None
    num_edges: Optional[int] = None

    @property
    def gap_bytes(self) -> int:
        return self.total_bytes - self.lower_bound

    @property
    def gap_percent(self) -> float:
        """``100 * (total - lower_bound) / lower_bound`` (0 for an empty plan)."""
        if self.lower_bound == 0:
            return 0.0
        return 100.0 * self.gap_bytes / self.lower_bound

    @property
    def unplanned_bytes(self) -> int:
        """Bytes the buffers would take as separate allocations (no reuse)."""
        return sum(self.sizes.values())

    def __len__(self) -> int:
        return len(self.offsets)

    def __contains__(self, name: str) -> bool:
        return name in self.offsets

    def check(self) -> None:
        """Raise ``AssertionError`` if two time-overlapping buffers overlap in memory."""
        names = sorted(self.offsets, key=lambda n: self.offsets[n])
        for i, a in enumerate(names):
            a_lo, a_hi = self.offsets[a], self.offsets[a] + self.sizes[a]
            assert a_lo % self.alignment == 0, f"{a} at {a_lo} is not {self.alignment}-aligned"
            assert a_hi <= self.total_bytes, f"{a} ends at {a_hi} > arena {self.total_bytes}"
            for b in names[i + 1:]:
                b_lo = self.offsets[b]
                if b_lo >= a_hi:
                    break
                if self.sizes[a] == 0 or self.sizes[b] == 0:
                    continue
                (af, al), (bf, bl) = self.intervals[a], self.intervals[b]
                assert not (af <= bl and bf <= al), (
                    f"{a} [{a_lo}, {a_hi}) steps {af}..{al} overlaps {b} "
                    f"[{b_lo}, {b_lo + self.sizes[b]}) steps {bf}..{bl}")

    def summary(self) -> str:
        """One line: planned bytes vs lower bound and the gap."""
        where = ""
        if self.num_nodes is not None:
            where = f" at N={self.num_nodes}, E={self.num_edges}"
        return (f"arena {_fmt_bytes(self.total_bytes)} for {len(self)} buffers{where}; "
                f"lower bound {_fmt_bytes(self.lower_bound)} (gap {self.gap_percent:.1f}%); "
                f"without reuse {_fmt_bytes(self.unplanned_bytes)}")

    def __str__(self) -> str:
        lines = [f"ArenaPlan: {self.summary()}"]
        if self.ordering:
            tried = ", ".join(f"{k}={_fmt_bytes(v)}" for k, v in self.candidates.items())
            tried = f" (tried {tried})" if tried else ""
            lines.append(f"  best ordering: {self.ordering}{tried}")
        if self.offsets:
            width = max(len("buffer"), *(len(n) for n in self.offsets))
            lines.append(f"  {'buffer':<{width}}  {'offset':>12}  {'bytes':>12}  steps")
            for name in sorted(self.offsets, key=lambda n: (self.offsets[n], self.intervals[n])):
                lo, hi = self.intervals[name]
                lines.append(f"  {name:<{width}}  {self.offsets[name]:>12}  "
                             f"{self.sizes[name]:>12}  {lo}..{hi}")
        return "\n".join(lines)


def _fmt_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


# --------------------------------------------------------------------------------------------
# Greedy placement
# --------------------------------------------------------------------------------------------

# Each ordering maps (size, first, last) arrays to a permutation. Ties fall back to the buffer's
# position in the input, so plans are deterministic.
ORDERINGS: Dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]] = {
    "size_desc": lambda s, f, l: np.lexsort((f, -s)),
    "size_x_duration_desc": lambda s, f, l: np.lexsort((f, -s, -(s * (l - f + 1)))),
    "duration_desc": lambda s, f, l: np.lexsort((f, -s, -(l - f))),
    "start_asc": lambda s, f, l: np.lexsort((-s, f)),
    "end_desc": lambda s, f, l: np.lexsort((-s, -l)),
    # Buffers live at the busiest step first: they decide the peak.
    "peak_first": None,  # filled in below, needs the live-bytes profile
}


def _peak_first_order(s: np.ndarray, f: np.ndarray, l: np.ndarray) -> np.ndarray:
    if len(s) == 0:
        return np.zeros(0, dtype=np.int64)
    steps = np.unique(np.concatenate([f, l]))
    lo = np.searchsorted(steps, f)
    hi = np.searchsorted(steps, l)
    # Live bytes at each step where something starts or ends (a difference array).
    delta = np.zeros(len(steps) + 1, dtype=np.int64)
    np.add.at(delta, lo, s)
    np.add.at(delta, hi + 1, -s)
    live = np.cumsum(delta)[:-1]
    # Each buffer's weight: the largest live total over its lifetime.
    cum_max = np.array([live[a:b + 1].max() for a, b in zip(lo, hi)])
    return np.lexsort((f, -s, -cum_max))


ORDERINGS["peak_first"] = _peak_first_order


def _place(order: np.ndarray, asize: np.ndarray, first: np.ndarray, last: np.ndarray,
           best_fit: bool) -> Tuple[np.ndarray, int]:
    """Place buffers in ``order``; return offsets and arena size (all in aligned units)."""
    n = len(asize)
    offsets = np.zeros(n, dtype=np.int64)
    placed_first = np.empty(n, dtype=np.int64)
    placed_last = np.empty(n, dtype=np.int64)
    placed_lo = np.empty(n, dtype=np.int64)
    placed_hi = np.empty(n, dtype=np.int64)
    count = 0
    total = 0
    for i in order:
        size = asize[i]
        if size == 0:
            offsets[i] = 0
            continue
        conflict = (placed_first[:count] <= last[i]) & (first[i] <= placed_last[:count])
        los = placed_lo[:count][conflict]
        his = placed_hi[:count][conflict]
        offset = 0
        if len(los):
            sort = np.argsort(los, kind="stable")
            los, his = los[sort], his[sort]
            # Gaps between the (possibly overlapping) occupied ranges, from the bottom.
            best: Optional[Tuple[int, int]] = None
            reach = 0
            for lo, hi in zip(los.tolist(), his.tolist()):
                gap = lo - reach
                if gap >= size:
                    if not best_fit:
                        best = (gap, reach)
                        break
                    if best is None or gap < best[0]:
                        best = (gap, reach)
                        if gap == size:
                            break
                reach = max(reach, hi)
            offset = best[1] if best is not None else reach
        offsets[i] = offset
        placed_first[count], placed_last[count] = first[i], last[i]
        placed_lo[count], placed_hi[count] = offset, offset + size
        count += 1
        total = max(total, offset + size)
    return offsets, total


def plan_arena(buffers: Iterable[LiveInterval], alignment: int = 64, *,
               num_nodes: Optional[int] = None, num_edges: Optional[int] = None,
               orderings: Optional[Sequence[str]] = None) -> ArenaPlan:
    """Assign an offset to every buffer so that buffers live at the same step never share bytes.

    Args:
        buffers: the live intervals; names must be unique.
        alignment: every offset is a multiple of this many bytes (64 suits every dtype and GPU
            cache lines); sizes are rounded up to it for placement.
        num_nodes, num_edges: values of ``N`` and ``E`` for :class:`SymbolicSize` sizes.
        orderings: names from :data:`ORDERINGS` to try (default: all of them), each with best
            fit and with first fit; the smallest arena wins. The search stops early at a plan
            that meets the lower bound (rounded up to ``alignment``), which none can beat.

    Returns:
        The smallest :class:`ArenaPlan` found, with the live-bytes lower bound.
    """
    if alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"alignment must be a positive power of two, got {alignment}")
    buffers = list(buffers)
    names = [b.name for b in buffers]
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"buffer names must be unique, repeated: {dupes}")
    sizes = np.array([b.nbytes(num_nodes, num_edges) for b in buffers], dtype=np.int64)
    first = np.array([b.first_use for b in buffers], dtype=np.int64)
    last = np.array([b.last_use for b in buffers], dtype=np.int64)
    # Place in units of `alignment`: offsets come out aligned, and arithmetic stays small.
    units = -(-sizes // alignment)
    lower = live_bytes_lower_bound(sizes.tolist(), first.tolist(), last.tolist())

    chosen = list(ORDERINGS) if orderings is None else list(orderings)
    unknown = [o for o in chosen if o not in ORDERINGS]
    if unknown:
        raise ValueError(f"unknown orderings {unknown}; known: {list(ORDERINGS)}")

    best_offsets = np.zeros(len(buffers), dtype=np.int64)
    best_total: Optional[int] = None
    best_name = ""
    candidates: Dict[str, int] = {}
    seen_orders = set()
    # No arena is smaller than the bound rounded up to the alignment: reaching it ends the search
    # (a real saving on deep models, whose thousands of buffers often plan at the bound at once).
    optimal_units = -(-int(lower) // alignment)
    for name in chosen:
        if best_total is not None and best_total <= optimal_units:
            break
        order = ORDERINGS[name](units, first, last)
        key = order.tobytes()
        for best_fit in (True, False):
            label = f"{name}/{'best' if best_fit else 'first'}_fit"
            if (key, best_fit) in seen_orders:
                continue
            seen_orders.add((key, best_fit))
            offsets, total = _place(order, units, first, last, best_fit)
            candidates[label] = int(total) * alignment
            if best_total is None or total < best_total:
                best_offsets, best_total, best_name = offsets, total, label
            if best_total <= optimal_units:
                break
    best_total = best_total or 0

    # The top buffer need not be padded: trim the arena to the last requested byte, then round
    # the whole arena up to the alignment so consecutive arenas stay aligned too.
    end = int((best_offsets * alignment + sizes).max()) if len(buffers) else 0
    total_bytes = _round_up(end, alignment)
    return ArenaPlan(
        offsets={n: int(o) * alignment for n, o in zip(names, best_offsets)},
        sizes={n: int(s) for n, s in zip(names, sizes)},
        intervals={b.name: (b.first_use, b.last_use) for b in buffers},
        total_bytes=total_bytes,
        lower_bound=int(lower),
        alignment=alignment,
        ordering=best_name,
        candidates=candidates,
        num_nodes=num_nodes,
        num_edges=num_edges,
    )


# --------------------------------------------------------------------------------------------
# Plans per input size
# --------------------------------------------------------------------------------------------


class ArenaPlanCache:
    """Plans for buffers with sizes symbolic in ``N`` and ``E``, kept for the last few sizes.

    >>> cache = ArenaPlanCache([Buffer("h", SymbolicSize(per_node=512), 0, 3)])
    >>> cache.plan(N=1000, E=5000).total_bytes
    512000

    Training on one graph re-uses one plan; sampled subgraphs of varying size cycle through a
    handful of plans (least recently used is evicted first).
    """

    def __init__(self, buffers: Iterable[LiveInterval], alignment: int = 64,
                 max_entries: int = 4) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.buffers: List[LiveInterval] = list(buffers)
        self.alignment = alignment
        self.max_entries = max_entries
        self._plans: "OrderedDict[Tuple[int, int], ArenaPlan]" = OrderedDict()
        self.hits = 0
        self.misses = 0

    def plan(self, N: int, E: int = 0) -> ArenaPlan:
        key = (int(N), int(E))
        plan = self._plans.get(key)
        if plan is not None:
            self.hits += 1
            self._plans.move_to_end(key)
            return plan
        self.misses += 1
        plan = plan_arena(self.buffers, self.alignment, num_nodes=key[0], num_edges=key[1])
        self._plans[key] = plan
        if len(self._plans) > self.max_entries:
            self._plans.popitem(last=False)
        return plan

    def cached_sizes(self) -> List[Tuple[int, int]]:
        """Cached ``(N, E)`` keys, least recently used first."""
        return list(self._plans)

    def clear(self) -> None:
        self._plans.clear()

    def __len__(self) -> int:
        return len(self._plans)
