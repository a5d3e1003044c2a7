"""The autocast state of a forward, restored around its backward recompute.

Autograd runs backward outside the forward's ``torch.autocast`` context. A recompute there (a
reversible block rebuilt from its output, a row-wise head run again) must see the autocast the
forward saw, or its ops run in another dtype than the forward's: at best another function, at
worst a bfloat16 activation meeting a float32 weight. ``torch.utils.checkpoint`` records and
restores the same state for its recompute.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch

__all__ = ["AutocastState", "capture_autocast", "restored_autocast", "autocast_enabled"]


@dataclass(frozen=True)
class AutocastState:
    """Per device type in use: whether autocast was on and its dtype; and whether its cache
    was on."""

    devices: tuple[tuple[str, bool, torch.dtype], ...]
    cache_enabled: bool


def _device_types(device: torch.device) -> list[str]:
    # CPU autocast can be on beside CUDA's; both matter for ops on either device.
    return sorted({device.type, "cpu"})


def autocast_enabled(device: torch.device) -> bool:
    """Whether autocast is on for ``device``'s type now."""
    return torch.is_autocast_enabled(device.type)


def capture_autocast(device: torch.device) -> AutocastState:
    """The autocast state now, for ``device``'s type and the CPU."""
    return AutocastState(
        tuple((t, torch.is_autocast_enabled(t), torch.get_autocast_dtype(t))
              for t in _device_types(device)),
        torch.is_autocast_cache_enabled())


@contextlib.contextmanager
def restored_autocast(state: AutocastState) -> Iterator[None]:
    """Runs the body under ``state`` (nothing to do where autocast was off everywhere)."""
    with contextlib.ExitStack() as stack:
        for device_type, enabled, dtype in state.devices:
            stack.enter_context(torch.autocast(device_type, dtype=dtype, enabled=enabled,
                                               cache_enabled=state.cache_enabled))
        yield
