"""CPU kernels in native code, compiled on first use and cached (see :mod:`.build`).

Each is an accelerator beside a torch path that gives the same results; without a C++ compiler
(or with ``GSR_NATIVE=0``) the torch path runs.
"""
from .replayed_relu import (native_relu_covers, native_relu_record, native_relu_replay,
                            native_relu_status)
from .topk import native_group_topk, native_topk_available, native_topk_covers, native_topk_status

__all__ = ["native_group_topk", "native_topk_available", "native_topk_covers", "native_topk_status",
           "native_relu_covers", "native_relu_record", "native_relu_replay", "native_relu_status"]
