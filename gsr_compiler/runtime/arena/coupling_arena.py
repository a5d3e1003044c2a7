"""The arena the reversible chains of one compiled model run their coupling in.

A call of a :class:`~gsr_compiler.runtime.reversible.ReversibleChain` (its forward, or its
backward) keeps the chain's G channel groups in *scratch* buffers of ``[rows, D/G]`` each and
updates them in place block after block (``y_i = x_i + f_i`` forward, ``x_i = y_i - f_i`` and
the gradient sums backward):

==============  ===========================================================================
``forward``     ``state.0 .. state.{G-1}`` (the groups), ``y0`` (``x_2 + ... + x_G``, G > 2)
``backward``    ``state.*`` (the rebuilt inputs), ``grad.0 .. grad.{G-1}`` (gradient of the
                groups), ``y0`` (G > 2)
==============  ===========================================================================

Scratch lives only *during* one call: whatever leaves a call (the chain output, which autograd
saves for backward; the input gradient handed back to autograd) is a fresh tensor, and every
call rewrites its scratch before reading it. Calls never run inside each other, so the scratch
of all chains and both phases shares one arena, planned with
:func:`~gsr_compiler.runtime.arena.planner.plan_arena` (each call is one time slot), allocated
once per input size (:class:`ArenaCache`: a few sizes, one backing allocation) and reused across
steps. A second forward before the first backward therefore cannot corrupt the first graph:
nothing the first graph keeps is in the arena.

Only the phases that have run are planned: a model used for inference only gets an arena for
the forward scratch; the first backward re-plans once to include the backward's.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from .arena import Arena, ArenaCache
from .planner import ArenaPlan, LiveInterval, SymbolicSize, plan_arena

__all__ = ["CouplingArena", "CouplingScratch", "PHASES", "scratch_buffer_names"]

PHASES = ("forward", "backward")


def scratch_buffer_names(chain: str, phase: str, groups: int) -> Dict[str, List[str]]:
    """Names of the scratch buffers of one call, by role (``state``, ``grad``, ``y0``)."""
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    names = {"state": [f"{chain}.{phase}.state.{j}" for j in range(groups)],
             "grad": [], "y0": []}
    if phase == "backward":
        names["grad"] = [f"{chain}.{phase}.grad.{j}" for j in range(groups)]
    if groups > 2:  # with two groups y0 is x2 itself
        names["y0"] = [f"{chain}.{phase}.y0"]
    return names


@dataclass
class CouplingScratch:
    """The scratch views of one chain call; each ``[rows, group_width]``, contents undefined."""

    state: List[torch.Tensor]
    grad: List[torch.Tensor]
    y0: Optional[torch.Tensor]


@dataclass(frozen=True)
class _ChainShape:
    groups: int
    group_width: int


class CouplingArena:
    """Scratch of the reversible chains of one model, in one planned buffer per input size.

    Args:
        max_sizes: plans (input sizes) kept; the backing allocation is shared by all of them
            and only grows.
        alignment: offset alignment in bytes.

    ``add_chain`` registers a chain (the compiler does it); ``scratch(...)`` hands one call
    its views. The arena is not thread safe: a call that starts while another call of the same
    model is running raises instead of sharing the bytes.
    """

    def __init__(self, max_sizes: int = 4, alignment: int = 64) -> None:
        if max_sizes < 1:
            raise ValueError("max_sizes must be at least 1")
        self.max_sizes = max_sizes
        self.alignment = alignment
        self._chains: Dict[str, _ChainShape] = {}
        self._reset_runtime_state()

    def _reset_runtime_state(self) -> None:
        self._phases: List[str] = []
        self.allocations = 0  # backing allocations made so far (re-plans that grew it)
        self._cache: Optional[ArenaCache] = None
        self._cache_key: Optional[Tuple[torch.device, torch.dtype]] = None
        self._current: Optional[Arena] = None
        self._busy = False
        self._lock = threading.Lock()

    # -- registration ------------------------------------------------------------------

    def add_chain(self, name: str, groups: int, group_width: int) -> None:
        """Registers chain ``name`` (``groups`` groups of ``group_width`` channels)."""
        shape = _ChainShape(int(groups), int(group_width))
        known = self._chains.get(name)
        if known == shape:
            return
        if known is not None:
            raise ValueError(f"chain {name!r} is registered with {known}, not {shape}")
        self._chains[name] = shape
        self.release()  # the buffer set changed: plans must be redone

    @property
    def chains(self) -> List[str]:
        return list(self._chains)

    def buffers(self, itemsize: int, phases: Optional[List[str]] = None) -> List[LiveInterval]:
        """The scratch buffers as live intervals: call ``(chain, phase)`` number ``t`` is step
        ``t``, and its buffers live at that step only. Sizes are symbolic in the row count N.
        ``phases``: those to include (default: both)."""
        out: List[LiveInterval] = []
        step = 0
        for name, shape in self._chains.items():
            per_row = SymbolicSize(per_node=shape.group_width * int(itemsize))
            for phase in PHASES if phases is None else [p for p in PHASES if p in phases]:
                for names in scratch_buffer_names(name, phase, shape.groups).values():
                    out += [LiveInterval(n, per_row, step, step) for n in names]
                step += 1
        return out

    def plan(self, num_rows: int, dtype: torch.dtype = torch.float32,
             phases: Optional[List[str]] = None) -> ArenaPlan:
        """The plan for ``num_rows`` rows of ``dtype`` (does not allocate)."""
        return plan_arena(self.buffers(_itemsize(dtype), phases), self.alignment,
                          num_nodes=num_rows, num_edges=0)

    # -- run time ----------------------------------------------------------------------

    @contextlib.contextmanager
    def scratch(self, chain: str, phase: str, num_rows: int, group_width: int,
                dtype: torch.dtype, device: torch.device) -> Iterator[CouplingScratch]:
        """Views for one call of ``chain``; valid only inside the ``with`` block."""
        shape = self._chains.get(chain)
        if shape is None:
            raise KeyError(f"chain {chain!r} is not registered in this arena "
                           f"(registered: {', '.join(self._chains) or 'none'})")
        if shape.group_width != group_width:
            raise ValueError(f"chain {chain!r} was planned with groups of {shape.group_width} "
                             f"channels, called with {group_width}")
        with self._lock:
            if self._busy:
                raise RuntimeError(
                    "the activation arena of this model is in use by another chain call; it is "
                    "shared by the chains of one model, which must not run concurrently (from "
                    "several threads, or one inside another). Compile with plan_memory=False "
                    "to run such calls.")
            self._busy = True
        try:
            if phase not in self._phases:
                self._phases.append(phase)
                self.release()  # re-planned below with this phase's buffers
            arena = self._arena(int(num_rows), dtype, device)
            names = scratch_buffer_names(chain, phase, shape.groups)
            rows_shape = (int(num_rows), group_width)
            views = {role: [arena.view(n, rows_shape, dtype) for n in role_names]
                     for role, role_names in names.items()}
            yield CouplingScratch(views["state"], views["grad"],
                                  views["y0"][0] if views["y0"] else None)
        finally:
            self._busy = False

    def _arena(self, num_rows: int, dtype: torch.dtype, device: torch.device) -> Arena:
        key = (torch.device(device), dtype)
        if self._cache is None or self._cache_key != key:
            # A new dtype or device: drop the old allocation before making the new one.
            self.release()
            self._cache = ArenaCache(self.buffers(_itemsize(dtype), self._phases), device=key[0],
                                     alignment=self.alignment, max_entries=self.max_sizes)
            self._cache_key = key
        # A normal tensor even when the first call runs under inference_mode: later calls
        # outside it write into the same memory.
        before = self._cache.allocations
        with torch.inference_mode(False):
            self._current = self._cache.arena(num_rows, 0)
        self.allocations += self._cache.allocations - before
        return self._current

    def release(self) -> None:
        """Frees the backing memory (it is allocated again by the next call)."""
        if self._cache is not None:
            self._cache.release()
        self._cache = None
        self._cache_key = None
        self._current = None

    # -- inspection --------------------------------------------------------------------

    @property
    def reserved_bytes(self) -> int:
        """Bytes of the backing allocation (0 before the first call or after ``release``)."""
        return 0 if self._cache is None else self._cache.reserved_bytes

    @property
    def last_plan(self) -> Optional[ArenaPlan]:
        """The plan of the last call, or None."""
        return None if self._current is None else self._current.plan

    def cached_sizes(self) -> List[Tuple[int, int]]:
        """``(rows, 0)`` of the plans kept, least recently used first."""
        return [] if self._cache is None else self._cache.plans.cached_sizes()

    def owns(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor``'s memory lies in the backing allocation."""
        return self._current is not None and self._current.owns(tensor)

    # -- copying and pickling: the registration travels, the memory does not ------------

    def __getstate__(self) -> dict:
        return {"max_sizes": self.max_sizes, "alignment": self.alignment,
                "_chains": dict(self._chains)}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset_runtime_state()

    def __repr__(self) -> str:
        return (f"CouplingArena({len(self._chains)} chain(s), "
                f"{self.reserved_bytes} bytes reserved)")


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
