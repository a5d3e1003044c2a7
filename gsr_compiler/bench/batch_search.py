"""The largest batch that fits a memory budget, found by measuring.

``largest_fitting_batch`` grows the batch size from the smallest (doubling) until a
measurement does not fit or the largest useful size is reached, then bisects between the last
size that fitted and the first that did not, until they are within ``tolerance`` of each other.
Every size it accepts was measured to fit; a size whose measurement failed (the process died,
ran out of memory, raised) counts as not fitting, with its reason kept. When even the smallest
size does not fit, the search says so and accepts nothing.

The measurement is a function of the batch size, so the search itself is cheap to test; the
benchmark measures one training step in a fresh process (:mod:`.budget_sweep`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

__all__ = ["Probe", "SearchResult", "largest_fitting_batch"]


@dataclass
class Probe:
    """One measurement: a batch size, its peak (None when it failed) and whether it fits."""

    batch_nodes: int
    fits: bool
    peak_bytes: Optional[int] = None
    reason: Optional[str] = None  # why it does not fit, or what failed
    details: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class SearchResult:
    """The accepted batch size (None: nothing fits) and every probe, in order."""

    batch_nodes: Optional[int]
    probes: list[Probe]
    reason: Optional[str] = None  # why nothing was accepted

    @property
    def accepted(self) -> Optional[Probe]:
        return next((p for p in self.probes if p.fits and p.batch_nodes == self.batch_nodes),
                    None)

    def as_dict(self) -> dict:
        return {"batch_nodes": self.batch_nodes, "reason": self.reason,
                "probes": [p.as_dict() for p in self.probes]}


def largest_fitting_batch(measure: Callable[[int], Probe], smallest: int, largest: int,
                          start: Optional[int] = None, tolerance: float = 0.1,
                          max_probes: int = 16) -> SearchResult:
    """The largest batch size in ``[smallest, largest]`` whose measurement fits.

    ``start``: a first guess above ``smallest`` (e.g. a prediction) to grow from; it is measured
    like any other size. ``tolerance``: the search stops when the first size that did not fit
    is within this share above the last that did. ``max_probes`` bounds the measurements.
    """
    if not 1 <= smallest <= largest:
        raise ValueError(f"need 1 <= smallest <= largest, got {smallest} and {largest}")
    if tolerance <= 0:
        raise ValueError(f"tolerance must be positive, got {tolerance}")
    probes: list[Probe] = []
    measured: dict[int, Probe] = {}

    def fits(n: int) -> bool:
        if n not in measured:
            measured[n] = measure(n)
            probes.append(measured[n])
        return measured[n].fits

    if not fits(smallest):
        first = probes[0]
        return SearchResult(None, probes, f"even the smallest batch ({smallest:,} nodes) does "
                                          f"not fit: {first.reason or 'over the budget'}")
    good, bad = smallest, None
    n = min(largest, max(2 * smallest, start or 0))
    while good < largest and len(probes) < max_probes:  # grow
        if fits(n):
            good = n
            n = min(largest, 2 * n)
        else:
            bad = n
            break
    while bad is not None and bad > good * (1 + tolerance) and bad - good > 1 \
            and len(probes) < max_probes:  # bisect, geometric mid-point
        mid = int(round((good * bad) ** 0.5))
        mid = min(max(mid, good + 1), bad - 1)
        if fits(mid):
            good = mid
        else:
            bad = mid
    return SearchResult(good, probes)
