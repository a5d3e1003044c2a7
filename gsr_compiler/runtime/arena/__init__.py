"""Planned activation memory: live intervals -> offsets in one buffer -> typed views.

``plan_arena`` assigns offsets (greedy best fit over several orderings, reported against the
live-bytes lower bound); ``Arena`` allocates the planned bytes once and hands out views;
``ArenaPlanCache``/``ArenaCache`` handle sizes symbolic in the node and edge counts;
``CouplingArena`` is the arena the reversible chains of one compiled model run their coupling in.
"""
from .arena import Arena, ArenaCache
from .coupling_arena import CouplingArena, CouplingScratch
from .planner import (ORDERINGS, ArenaPlan, ArenaPlanCache, Buffer, LiveInterval, SymbolicSize,
                      live_bytes_lower_bound, plan_arena)

__all__ = [
    "Arena",
    "ArenaCache",
    "ArenaPlan",
    "ArenaPlanCache",
    "Buffer",
    "CouplingArena",
    "CouplingScratch",
    "LiveInterval",
    "ORDERINGS",
    "SymbolicSize",
    "live_bytes_lower_bound",
    "plan_arena",
]
