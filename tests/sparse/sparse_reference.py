"""Independent references for the sparse runtime tests (no code shared with the implementation)."""
from typing import Dict, List, Tuple

import numpy as np
import torch


def reference_topk_mask(x: torch.Tensor, k: int, group: int) -> torch.Tensor:
    """Bool [N, D] mask of kept entries, by explicit ranks: an entry's rank in its group is the
    number of entries that beat it (larger, or equal and at a lower position); rank < k is kept."""
    n, d = x.shape
    if group > 512:
        return _reference_topk_mask_numpy(x, k, group)
    xg = x.reshape(n, d // group, group)
    a = xg.unsqueeze(-1)   # entry p  [N, G, g, 1]
    b = xg.unsqueeze(-2)   # entry q  [N, G, 1, g]
    pos = torch.arange(group)
    lower = (pos.view(1, -1) < pos.view(-1, 1))  # [p, q]: q < p
    beats = (b > a) | ((b == a) & lower)
    rank = beats.sum(-1)
    return (rank < k).reshape(n, d)


def _reference_topk_mask_numpy(x: torch.Tensor, k: int, group: int) -> torch.Tensor:
    """Same, for wide groups: numpy's stable argsort of the negated values (lower position first)."""
    n, d = x.shape
    xg = x.reshape(n, d // group, group).double().numpy()
    order = np.argsort(-xg, axis=-1, kind="stable")[..., :k]
    mask = np.zeros(xg.shape, dtype=bool)
    np.put_along_axis(mask, order, True, axis=-1)
    return torch.from_numpy(mask.reshape(n, d))


def reference_topk(x: torch.Tensor, k: int, group: int) -> torch.Tensor:
    return torch.where(reference_topk_mask(x, k, group), x, torch.zeros_like(x))


class SavedTensorLog:
    """Records what autograd saves (via saved_tensors_hooks), one entry per storage."""

    def __init__(self, exclude: Tuple[torch.Tensor, ...] = ()) -> None:
        self._exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self.storages: Dict[int, int] = {}
        self.shapes: List[Tuple[Tuple[int, ...], torch.dtype]] = []

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self.shapes.append((tuple(t.shape), t.dtype))
        s = t.untyped_storage()
        if s.data_ptr() not in self._exclude:
            self.storages[s.data_ptr()] = s.nbytes()
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    @property
    def nbytes(self) -> int:
        return sum(self.storages.values())
