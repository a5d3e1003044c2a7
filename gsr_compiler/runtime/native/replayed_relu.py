"""ReLU with recorded or replayed sign choices, on CPU in native code (``replayed_relu.cpp``).

A reversible block's forward records the ReLU inputs near 0 (``|x| <= margin * rms(row)``) and
its backward recompute forces them to the forward's side of 0
(:mod:`gsr_compiler.runtime.replayed_relu`, whose torch functions are the reference). In torch
each is a ReLU plus an absolute value, a row norm, a comparison and a ``nonzero`` or a count:
several passes and tensors. Here it is one pass per row; the results are the same (the row's
RMS is summed in another order, so an element within rounding of the margin may be recorded on
one path and not the other).
"""
from __future__ import annotations

import ctypes
from typing import Optional
from pathlib import Path

import torch
from torch import Tensor

from .build import library_status, load_library

__all__ = ["native_relu_covers", "native_relu_record", "native_relu_replay",
           "native_relu_status"]

_NAME = "gsr_replayed_relu"
_SOURCE = Path(__file__).with_name("replayed_relu.cpp")
_SYMBOLS = ("gsr_relu_record_f32", "gsr_relu_replay_f32")
_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float


def _library() -> ctypes.CDLL | None:
    return load_library(_NAME, _SOURCE, _SYMBOLS)


def native_relu_covers(x: Tensor) -> bool:
    """Whether the native ReLU runs for ``x``: CPU float32 with a non-empty last dimension,
    and the library is available (built on first use)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() >= 1
            and x.shape[-1] > 0 and _library() is not None)


def native_relu_status() -> str:
    """How the library was built and where it is cached, or why it is not used."""
    return library_status(_NAME, _SOURCE, _SYMBOLS)


def _shape(x: Tensor) -> tuple[Tensor, Tensor, Tensor, int, int]:
    x = x.detach().contiguous()
    width = x.shape[-1]
    rows = x.numel() // width
    return x, torch.empty_like(x), torch.empty(rows, dtype=torch.float32), rows, width


def native_relu_record(x: Tensor, slope: float, margin: float, most: Optional[int] = None
                       ) -> tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """``(leaky_relu(x, slope), rms of each row, flat positions with |x| <= margin * rms,
    |x| / rms there)``; positions ascending, int64. With more than ``most`` such elements, the
    positions and margins are None (not collected)."""
    x, y, rms, rows, width = _shape(x)
    fn = _library().gsr_relu_record_f32
    fn.argtypes, fn.restype = [_P, _P, _P, _I, _I, _F, _F, _P, _P, _I, ctypes.c_int], _I
    cap = int(4 * margin * x.numel()) + 1024  # about twice the Gaussian expectation
    if most is not None:
        cap = min(cap, most)
    while True:
        positions = torch.empty(cap, dtype=torch.int64)
        margins = torch.empty(cap, dtype=torch.float32)
        count = fn(x.data_ptr(), y.data_ptr(), rms.data_ptr(), rows, width, float(slope),
                   float(margin), positions.data_ptr(), margins.data_ptr(), cap,
                   torch.get_num_threads()) if rows else 0
        if count <= cap:
            return y, rms, positions[:count], margins[:count]
        if most is not None and count > most:
            return y, rms, None, None
        cap = count


def native_relu_replay(x: Tensor, slope: float, margin: float, forced: Tensor,
                       positive: Tensor) -> tuple[Tensor, Tensor, int]:
    """``(leaky_relu(x, slope) with the elements at forced (ascending flat positions) on the
    side positive says, rms of each row, how many elements have |x| <= margin * rms)``."""
    x, y, rms, rows, width = _shape(x)
    forced = forced.to(torch.int64).contiguous()
    positive = positive.to(torch.uint8).contiguous()
    fn = _library().gsr_relu_replay_f32
    fn.argtypes, fn.restype = [_P, _P, _P, _I, _I, _F, _F, _P, _P, _I, ctypes.c_int], _I
    count = fn(x.data_ptr(), y.data_ptr(), rms.data_ptr(), rows, width, float(slope),
               float(margin), forced.data_ptr(), positive.data_ptr(), forced.numel(),
               torch.get_num_threads()) if rows else 0
    return y, rms, int(count)
