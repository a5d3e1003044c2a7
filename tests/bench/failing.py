"""Baselines that fail on purpose, one way each. Module-level, so that the measuring
processes can import them."""
from __future__ import annotations

import os
import time

import torch

from gsr_compiler.bench.baselines import Baseline, ModelSpec

TINY_SPEC = ModelSpec(in_channels=16, width=8, depth=2)


def build_raising(spec, inputs):
    raise RuntimeError("this baseline is broken on purpose")


def build_exiting(spec, inputs):
    os._exit(3)  # ends without a word, as a crashing extension would


def build_huge_allocation(spec, inputs):
    return torch.empty(1 << 60)  # 4 EiB: the allocator refuses at once


def build_memory_hog(spec, inputs):
    hoard = []
    while True:  # touches 64 MiB at a time until something stops it
        hoard.append(torch.ones(1 << 24))


def build_sleeper(spec, inputs):
    time.sleep(600)


BROKEN = Baseline("broken", "a baseline that raises", build_raising)
EXITING = Baseline("exiting", "a baseline whose process exits", build_exiting)
HUGE = Baseline("huge", "a baseline that asks for more memory than exists", build_huge_allocation)
MEMORY_HOG = Baseline("memory-hog", "a baseline that allocates without end", build_memory_hog)
SLEEPER = Baseline("sleeper", "a baseline that never finishes", build_sleeper)
