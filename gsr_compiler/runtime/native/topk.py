"""Group-wise top-k selection on CPU in native code (``group_topk.cpp``).

``torch.topk`` over rows of a few dozen values spends most of its time per row, not per value,
so selecting in every group of every node costs many times a ReLU. The native loop keeps the same set as
:func:`~gsr_compiler.runtime.sparse.select_group_topk` (lower position among equal values,
``-0.0 == 0.0``, NaN above every number) and writes positions and values in one pass.
"""
from __future__ import annotations

import ctypes
from pathlib import Path
import torch
from torch import Tensor

from .build import library_status, load_library

__all__ = ["native_group_topk", "native_topk_available", "native_topk_covers",
           "native_topk_status"]

_NAME = "gsr_group_topk"
_SOURCE = Path(__file__).with_name("group_topk.cpp")
_SYMBOLS = {torch.float32: "gsr_group_topk_f32"}
_ARGTYPES = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
             ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]


def _library() -> ctypes.CDLL | None:
    # Asks for every symbol: a library without one is not used at all (torch selects instead).
    return load_library(_NAME, _SOURCE, tuple(_SYMBOLS.values()))


def _function(dtype: torch.dtype) -> ctypes._CFuncPtr:
    fn = getattr(_library(), _SYMBOLS[dtype])
    fn.argtypes, fn.restype = _ARGTYPES, None
    return fn


def native_topk_available() -> bool:
    """Whether the native selection could be built and loaded (built on the first call)."""
    return _library() is not None


def native_topk_covers(x: Tensor) -> bool:
    """Whether :func:`native_group_topk` runs for ``x``: a CPU float32 tensor, and the
    native library is available (built on the first call)."""
    return x.device.type == "cpu" and x.dtype in _SYMBOLS and native_topk_available()


def native_topk_status() -> str:
    """How the native selection was built and where it is cached, or why it is not used."""
    return library_status(_NAME, _SOURCE, tuple(_SYMBOLS.values()))


def native_group_topk(xg: Tensor, k: int, following: bool = False
                      ) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """Positions (int64, ascending) and values of the ``k`` largest entries along the last dim.

    ``xg`` is ``[..., g]`` on CPU, float32 (:func:`native_topk_covers`); the results
    are ``[..., k]``. With ``following``, also the largest value not kept, ``[...]``
    (``-inf`` where ``k == g``). Runs on ``torch.get_num_threads()`` threads.
    """
    if not native_topk_covers(xg):
        raise RuntimeError(f"native group top-k does not cover {xg.dtype} tensors on "
                           f"{xg.device.type}, or is unavailable ({native_topk_status()}); "
                           "check native_topk_covers first")
    g = xg.shape[-1]
    if not 1 <= k <= g:
        raise ValueError(f"k must be in 1..{g}, got {k}")
    x = xg.contiguous()
    positions = torch.empty(*xg.shape[:-1], k, dtype=torch.int64)
    values = torch.empty(*xg.shape[:-1], k, dtype=xg.dtype)
    nxt = torch.empty(xg.shape[:-1], dtype=xg.dtype) if following else None
    rows = x.numel() // g if g else 0
    if rows:
        _function(xg.dtype)(x.data_ptr(), rows, g, k, positions.data_ptr(), values.data_ptr(),
                            None if nxt is None else nxt.data_ptr(), torch.get_num_threads())
    return (positions, values) if nxt is None else (positions, values, nxt)
