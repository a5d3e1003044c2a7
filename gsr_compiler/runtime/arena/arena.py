"""One byte buffer per input size, with typed views at planned offsets.

An :class:`Arena` turns an :class:`~gsr_compiler.runtime.arena.planner.ArenaPlan` into memory:
one ``torch.uint8`` tensor of ``plan.total_bytes`` on a device, from which ``arena.view(name,
shape, dtype)`` hands out tensors at the planned offsets. Two buffers live at the same step never
share bytes (the plan guarantees it); buffers live at different steps do, so a view is only valid
during its buffer's live interval. Nothing returned to the user may alias the arena: copy out.

:class:`ArenaCache` keeps one backing allocation across input sizes (grown, never shrunk) and the
plans for the last few ``(N, E)``.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, Optional, Sequence, Tuple, Union

import torch

from .planner import ArenaPlan, ArenaPlanCache, LiveInterval

__all__ = ["Arena", "ArenaCache"]

Shape = Union[int, Sequence[int], torch.Size]


class Arena:
    """Memory for one :class:`ArenaPlan`.

    Args:
        plan: offsets and sizes of the buffers.
        device: where to allocate (ignored when ``storage`` is given).
        storage: an existing 1-D ``torch.uint8`` tensor of at least ``plan.total_bytes`` to use
            instead of allocating (how :class:`ArenaCache` reuses memory across sizes).
    """

    def __init__(self, plan: ArenaPlan, device: Union[str, torch.device, None] = None,
                 storage: Optional[torch.Tensor] = None) -> None:
        if storage is None:
            storage = torch.empty(plan.total_bytes, dtype=torch.uint8, device=device)
        if storage.dtype != torch.uint8 or storage.dim() != 1 or not storage.is_contiguous():
            raise ValueError("arena storage must be a contiguous 1-D torch.uint8 tensor")
        if storage.numel() < plan.total_bytes:
            raise ValueError(f"arena storage has {storage.numel()} bytes, plan needs "
                             f"{plan.total_bytes}")
        self.plan = plan
        self.storage = storage

    @property
    def device(self) -> torch.device:
        return self.storage.device

    @property
    def nbytes(self) -> int:
        return self.plan.total_bytes

    def view(self, name: str, shape: Shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A contiguous tensor of ``shape`` and ``dtype`` over buffer ``name``'s planned bytes.

        Raises ``KeyError`` for an unknown buffer and ``ValueError`` if the view needs more bytes
        than were planned for it or its offset does not suit ``dtype``'s alignment. The contents
        are whatever the arena held (like ``torch.empty``).
        """
        if name not in self.plan.offsets:
            raise KeyError(f"no buffer {name!r} in the arena plan")
        shape = (shape,) if isinstance(shape, int) else tuple(int(s) for s in shape)
        if any(s < 0 for s in shape):
            raise ValueError(f"negative dimension in shape {shape}")
        itemsize = torch.empty((), dtype=dtype).element_size()
        nbytes = math.prod(shape) * itemsize
        offset = self.plan.offsets[name]
        planned = self.plan.sizes[name]
        if nbytes > planned:
            raise ValueError(f"buffer {name!r}: view {shape} of {dtype} needs {nbytes} bytes, "
                             f"{planned} were planned")
        if offset % itemsize:
            raise ValueError(f"buffer {name!r}: offset {offset} is not aligned for {dtype}")
        if offset + nbytes > self.storage.numel():  # pragma: no cover - guarded by the plan
            raise ValueError(f"buffer {name!r}: view ends past the arena")
        raw = self.storage.narrow(0, offset, nbytes)
        return raw.view(dtype).view(shape)

    def views(self, specs: Dict[str, Tuple[Shape, torch.dtype]]) -> Dict[str, torch.Tensor]:
        """``{name: view(name, shape, dtype)}`` for ``specs = {name: (shape, dtype)}``."""
        return {name: self.view(name, shape, dtype) for name, (shape, dtype) in specs.items()}

    def owns(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor``'s memory lies inside this arena (to check nothing escapes)."""
        if tensor.device != self.storage.device or self.storage.numel() == 0:
            return False
        start = self.storage.data_ptr()
        end = start + self.storage.numel()
        ptr = tensor.data_ptr()
        return start <= ptr < end

    def __repr__(self) -> str:
        return f"Arena({self.plan.summary()}, device={self.device})"


class ArenaCache:
    """Arenas for buffers whose sizes depend on ``N`` and ``E``, sharing one allocation.

    ``cache.arena(N, E)`` returns an :class:`Arena` for that size. Plans for the last
    ``max_entries`` sizes are kept; the backing storage is reallocated only when a plan needs more
    bytes than it has, so alternating between sizes does not allocate.
    """

    def __init__(self, buffers: Iterable[LiveInterval],
                 device: Union[str, torch.device, None] = None, alignment: int = 64,
                 max_entries: int = 4) -> None:
        self.plans = ArenaPlanCache(buffers, alignment=alignment, max_entries=max_entries)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._storage: Optional[torch.Tensor] = None
        self.allocations = 0

    def arena(self, N: int, E: int = 0) -> Arena:
        plan = self.plans.plan(N, E)
        if self._storage is None or self._storage.numel() < plan.total_bytes:
            # Drop the old block first so the allocator can reuse it for the new one.
            self._storage = None
            self._storage = torch.empty(plan.total_bytes, dtype=torch.uint8, device=self.device)
            self.allocations += 1
        return Arena(plan, storage=self._storage)

    @property
    def reserved_bytes(self) -> int:
        return 0 if self._storage is None else self._storage.numel()

    def release(self) -> None:
        """Free the backing storage (plans are kept)."""
        self._storage = None
