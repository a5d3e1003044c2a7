r"""Replaying the discrete choices of a reversible block in its backward recompute.

A reversible chain's backward rebuilds each block input from the block output
(:math:`x_i = y_i - f_i(y_{i-1})`) and runs the branch again on it. The rebuilt input differs
from the forward's by rounding, and the difference grows with depth. Where the branch makes a
discrete choice, an input that close to the boundary can choose differently in the recompute:
a group top-k then keeps another value (its output changes by about the value itself), a ReLU's
gradient mask flips. The forward output is unaffected, so the loss looks normal while the
gradients are wrong, and the wrong branch output feeds every earlier block's reconstruction.

So the forward records, for each choice whose *margin* is small, what it chose, and the
recompute makes the same choice there:

* a **sign** (ReLU, LeakyReLU: which side of 0): margin :math:`|x| / \mathrm{rms}(x_{row})`;
* a **selection** (group top-k: which ``k`` of ``g`` values are kept): margin
  :math:`(v_{(k)} - v_{(k+1)}) / \max(|v_{(1)}|, |v_{(k+1)}|)`, the gap between the smallest
  kept and the largest dropped value relative to the group's scale.

The forward records every choice whose margin is below the tape's ``margin`` (:class:`ChoiceTape`)
together with that margin; once the forward has run, :meth:`ChoiceTape.keep` keeps, block by
block, only the choices below that block's own margin (the chain sets it from the rebuild error
it predicts there, :mod:`~gsr_compiler.runtime.drift`). Every other choice cannot flip unless the
rebuilt input moved by about its block's margin. The recompute checks exactly that: an unrecorded
choice whose rebuilt margin is below half its block's margin is counted as *unsafe*
(:class:`ReplayStats`), the sign that the reconstruction error has outgrown the margin. Nothing
dense is kept per choice: a recorded sign costs its flat position and one byte (or, where more
than about one element in 20 is near 0, two bits per element: :func:`record_dense_signs`), a
recorded selection its ``(row, group)`` position and a bitmask of ``g`` bits.

Ops find the tape through :func:`active_site`, set by the chain around each branch call (record
in the forward, replay in the backward); outside a chain they run as they always do.
"""
from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Union

import numpy as np
import torch
from torch import Tensor


__all__ = ["ChoiceTape", "ReplayStats", "active_site", "record_signs", "record_dense_signs",
           "recorded_signs", "recorded_sign_record", "dense_sign_threshold",
           "SelectionReplay", "selection_margin"]

_active = threading.local()


def _index_dtype(count: int) -> torch.dtype:
    return torch.int32 if count < 2 ** 31 else torch.int64


@dataclass
class ReplayStats:
    """What one chain call recorded and what its recompute found.

    Attributes:
        choices: discrete choices made in the forward (signs, or ``(row, group)`` selections).
        recorded: of those, recorded for the recompute (margin below the tape's margin).
        nbytes: bytes the records keep until the backward.
        forced: recorded choices the recompute would have made differently (flips prevented).
        unsafe: unrecorded choices whose margin in the recompute fell below half the tape's
            margin: the rebuilt input moved far enough that an unrecorded choice may have flipped.
    """

    choices: int = 0
    recorded: int = 0
    nbytes: int = 0
    forced: int = 0
    unsafe: int = 0


def _pack_bits(mask: Tensor) -> Tensor:
    """A flat bool mask as uint8 bytes, 8 elements each (little-endian bit order)."""
    flat = mask.reshape(-1)
    if flat.device.type == "cpu":  # numpy packs in one pass, torch's form below in several
        return torch.from_numpy(np.packbits(flat.numpy(), bitorder="little"))
    padded = torch.zeros(-(-flat.numel() // 8) * 8, dtype=torch.uint8, device=mask.device)
    padded[:flat.numel()] = flat
    weights = torch.tensor([1 << b for b in range(8)], dtype=torch.uint8, device=mask.device)
    return (padded.view(-1, 8) * weights).sum(1, dtype=torch.uint8)


def _unpack_bits(packed: Tensor, numel: int) -> Tensor:
    if packed.device.type == "cpu":
        bits = np.unpackbits(packed.numpy(), count=numel, bitorder="little")
        return torch.from_numpy(bits.view(np.bool_))
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(1) >> shifts) & 1).bool().reshape(-1)[:numel]


def dense_sign_threshold(numel: int) -> int:
    """The count of recorded signs above which two bitmasks over every element (2 bits each)
    are smaller than the positions and choices of the recorded ones."""
    bits_per_recorded = (_index_dtype(numel).itemsize + 1) * 8
    return (2 * numel + 64) // bits_per_recorded


@dataclass
class _SignRecord:
    """A ReLU's recorded sign choices: sparse (flat positions and the forward's ``x > 0``
    there), or, where more than about one element in 20 is recorded (a ReLU of a ReLU's
    output, whose many exact zeros all sit at the margin), two bitmasks over every element,
    2 bits each instead of 40 per recorded one."""

    shape: tuple
    positions: Tensor  # flat positions of the recorded elements, or the recorded bitmask
    positive: Tensor   # bool: the forward's choice (x > 0) there, or its bitmask
    margins: Optional[Tensor] = None  # their margins, until ChoiceTape.keep
    dense: bool = False
    count: int = 0     # recorded elements

    def tensors(self) -> list[Tensor]:
        return [self.positions, self.positive]

    def keep_below(self, margin: float) -> None:
        if self.dense and self.margins is None:
            return  # recorded as bitmasks: every choice within the recording margin, kept
        keep = self.margins < margin
        self.positions, self.positive = self.positions[keep], self.positive[keep]
        self.margins = None
        self.count = self.positions.numel()
        numel = math.prod(self.shape)
        if self.count > dense_sign_threshold(numel):
            recorded = torch.zeros(numel, dtype=torch.bool, device=self.positions.device)
            recorded[self.positions.long()] = True
            positive = torch.zeros_like(recorded)
            positive[self.positions.long()] = self.positive
            self.positions, self.positive = _pack_bits(recorded), _pack_bits(positive)
            self.dense = True

    def masks(self) -> tuple[Tensor, Tensor]:
        """Of a dense record: flat bool masks of the recorded elements and of the forward's
        ``x > 0`` (meaningful where recorded)."""
        numel = math.prod(self.shape)
        return _unpack_bits(self.positions, numel), _unpack_bits(self.positive, numel)

    def choices(self) -> tuple[Tensor, Tensor]:
        """Flat positions (int64, ascending) and the forward's ``x > 0`` there."""
        if not self.dense:
            return self.positions.long(), self.positive
        numel = math.prod(self.shape)
        positions = _unpack_bits(self.positions, numel).nonzero().reshape(-1)
        return positions, _unpack_bits(self.positive, numel)[positions]


@dataclass
class _SelectionRecord:
    shape: tuple       # [N, G, g] of the selection
    k: int
    pairs: Tensor      # flat (row * G + group) ids of the recorded selections, ascending
    kept: Tensor       # [r, ceil(g / 8)] uint8: bit p set where position p was kept
    margins: Optional[Tensor] = None  # their margins, until ChoiceTape.keep

    def tensors(self) -> list[Tensor]:
        return [self.pairs, self.kept]

    def keep_below(self, margin: float) -> None:
        keep = self.margins < margin
        self.pairs, self.kept = self.pairs[keep], self.kept[keep]
        self.margins = None


_Record = Union[_SignRecord, _SelectionRecord]


@dataclass
class _Site:
    """The records of one branch call: appended in call order, taken back in the same order."""

    tape: "ChoiceTape"
    records: list
    replay: bool
    where: str
    margin: float  # recording: the tape's; replaying: the block's (unsafe below half of it)
    cursor: int = 0

    def put(self, record: _Record) -> None:
        self.records.append(record)

    def take(self, kind: type, shape: tuple) -> _Record:
        if self.cursor >= len(self.records):
            raise RuntimeError(
                f"{self.where}: the backward recompute made more discrete choices (ReLU, top-k) "
                "than the forward; the branch must run the same ops on every call")
        record = self.records[self.cursor]
        self.cursor += 1
        if not isinstance(record, kind) or tuple(record.shape) != tuple(shape):
            raise RuntimeError(
                f"{self.where}: the backward recompute made a {kind.__name__[1:]} of shape "
                f"{tuple(shape)} where the forward recorded a {type(record).__name__[1:]} of "
                f"shape {tuple(record.shape)}; the branch must run the same ops on every call")
        return record


class ChoiceTape:
    """The recorded choices of one call of a reversible chain, by ``(block, group)``.

    Args:
        margin: relative margin below which the forward records a choice (see the module
            docstring); 0 records nothing, but still counts unsafe choices in the recompute.
    """

    def __init__(self, margin: float) -> None:
        if not (isinstance(margin, (int, float)) and math.isfinite(margin) and margin >= 0):
            raise ValueError(f"replay margin must be a finite number >= 0, got {margin!r}")
        self.margin = float(margin)
        self.stats = ReplayStats()
        self._records: dict[tuple[int, int], list[_Record]] = {}
        self._block_margins: dict[int, float] = {}
        self._recorded_at: dict[int, float] = {}
        self.short: list[int] = []  # blocks recorded below a smaller margin than they needed
        self._pending_forced: list[Tensor] = []
        self._pending_unsafe: list[Tensor] = []

    @contextlib.contextmanager
    def site(self, block: int, group: int, replay: bool,
             margin: Optional[float] = None) -> Iterator[None]:
        """Makes the ops of one branch call record (forward; below ``margin``, default the
        tape's) or replay (backward) here."""
        records = self._records.setdefault((block, group), [])
        if not replay:
            records.clear()
            margin = self.margin if margin is None else min(float(margin), self.margin)
            self._recorded_at[block] = margin
        else:
            margin = self._block_margins.get(block, self.margin)
        outer = getattr(_active, "site", None)
        _active.site = _Site(self, records, replay, f"block {block}, group {group}", margin)
        try:
            yield
        finally:
            _active.site = outer

    def keep(self, block_margins: dict[int, float]) -> None:
        """After the forward: keeps, in each block, only the choices below its margin in
        ``block_margins`` (at most what the forward recorded below), and counts what is kept
        and the blocks whose records fall short of their margin (:attr:`short`)."""
        self.short = sorted(b for b, m in block_margins.items()
                            if m > self._recorded_at.get(b, self.margin) * (1 + 1e-9))
        self._block_margins = {b: min(float(m), self._recorded_at.get(b, self.margin))
                               for b, m in block_margins.items()}
        for (block, _), records in self._records.items():
            for r in records:
                r.keep_below(self._block_margins.get(block, self.margin))
        kept = self.tensors()
        self.stats.recorded = sum(r.count if isinstance(r, _SignRecord) else r.pairs.numel()
                                  for records in self._records.values() for r in records)
        self.stats.nbytes = sum(t.numel() * t.element_size() for t in kept)

    def count(self, forced: Optional[Tensor] = None, unsafe: Optional[Tensor] = None) -> None:
        """Adds to the recompute's counts; they stay tensors (no device sync per op) until
        :meth:`settle`."""
        if forced is not None:
            self._pending_forced.append(forced)
        if unsafe is not None:
            self._pending_unsafe.append(unsafe)

    def settle(self) -> ReplayStats:
        """Folds the recompute's counts into :attr:`stats` (one sync) and returns it."""
        for name, pending in (("forced", self._pending_forced), ("unsafe", self._pending_unsafe)):
            if pending:
                tensors = [torch.as_tensor(t) for t in pending]
                device = tensors[-1].device
                total = int(torch.stack([t.to(device).reshape(()).long() for t in tensors]).sum())
                setattr(self.stats, name, getattr(self.stats, name) + total)
                pending.clear()
        return self.stats

    @property
    def block_margins(self) -> dict[int, float]:
        """The margin each block's records were kept below (after :meth:`keep`)."""
        return dict(self._block_margins)

    def tensors(self) -> list[Tensor]:
        """Every tensor the records hold, in a fixed order (for ``save_for_backward``)."""
        return [t for key in sorted(self._records) for r in self._records[key]
                for t in r.tensors()]

    def load(self, tensors: list[Tensor]) -> None:
        """Puts back the tensors of :meth:`tensors` as autograd returns them."""
        it = iter(tensors)
        for key in sorted(self._records):
            for r in self._records[key]:
                if isinstance(r, _SignRecord):
                    r.positions, r.positive = next(it), next(it)
                else:
                    r.pairs, r.kept = next(it), next(it)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def active_site() -> Optional[_Site]:
    """The branch call recording or replaying choices now, or None outside a chain."""
    return getattr(_active, "site", None)


# -- signs: ReLU and LeakyReLU -------------------------------------------------------------

def record_signs(site: _Site, shape: tuple, positions: Tensor, positive: Tensor,
                 margins: Tensor) -> None:
    """Records a ReLU's sign choices near 0 (flat positions, ascending; the forward's
    ``x > 0`` there; their margins ``|x| / rms(row)``)."""
    numel = math.prod(shape)
    site.put(_SignRecord(tuple(shape), positions.to(_index_dtype(numel)), positive, margins))
    site.tape.stats.choices += numel


def record_dense_signs(site: _Site, shape: tuple, near: Tensor, positive: Tensor) -> None:
    """Records a ReLU's sign choices as two bitmasks over every element: where ``near`` (within
    the site's margin of 0) and the forward's ``x > 0``. For inputs with many elements at 0
    (a ReLU of a ReLU's output): 2 bits per element, none of them kept per position."""
    numel = math.prod(shape)
    near = near.reshape(-1)
    site.put(_SignRecord(tuple(shape), _pack_bits(near), _pack_bits(positive.reshape(-1) & near),
                         None, dense=True, count=int(near.sum())))
    site.tape.stats.choices += numel


def recorded_signs(site: _Site, shape: tuple) -> tuple[Tensor, Tensor]:
    """The next recorded sign choices: flat positions (int64) and the forward's ``x > 0``."""
    return site.take(_SignRecord, tuple(shape)).choices()


def recorded_sign_record(site: _Site, shape: tuple) -> _SignRecord:
    """The next recorded sign choices, as recorded (sparse positions or dense bitmasks)."""
    return site.take(_SignRecord, tuple(shape))


# -- selections: the group top-k ------------------------------------------------------------

def selection_margin(values: Tensor, following: Tensor) -> Tensor:
    """The relative margin of each ``(row, group)`` selection, ``[R, G]`` float32.

    ``values``: the kept values ``[R, G, k]`` (before any dropout); ``following``: the largest
    value not kept, ``[R, G]`` (``-inf`` where all are kept). NaN gives 0 (always recorded).
    """
    v = values.detach().float()
    nxt = following.detach().float()
    gap = v.amin(-1) - nxt
    scale = torch.maximum(v.amax(-1).abs(), nxt.abs())
    rel = torch.where(scale > 0, gap / scale, torch.zeros_like(gap))
    rel = torch.where(torch.isinf(nxt) & (nxt < 0), torch.full_like(rel, math.inf), rel)
    return torch.nan_to_num(rel, nan=0.0, posinf=math.inf)


def _pack_positions(positions: Tensor, group: int) -> Tensor:
    """``[r, k]`` positions in ``0..group-1`` -> ``[r, ceil(group / 8)]`` uint8 bitmask."""
    r = positions.shape[0]
    bytes_per = (group + 7) // 8
    bits = torch.zeros(r, bytes_per * 8, dtype=torch.uint8, device=positions.device)
    bits.scatter_(1, positions.long(), 1)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=bits.device)
    return (bits.view(r, bytes_per, 8) * weights).sum(-1, dtype=torch.uint8)


def _unpack_positions(kept: Tensor, group: int, k: int) -> Tensor:
    """Inverse of :func:`_pack_positions`: ``[r, k]`` int64 positions, ascending."""
    r = kept.shape[0]
    shifts = torch.arange(8, dtype=torch.uint8, device=kept.device)
    bits = ((kept.unsqueeze(-1) >> shifts) & 1).view(r, -1)[:, :group].bool()
    return bits.nonzero()[:, 1].view(r, k)


class SelectionReplay:
    """Record or replay of one group top-k call inside a branch, in one or more row blocks.

    Build it with :meth:`begin` (None outside a chain); pass every block's selection through
    :meth:`apply`; call :meth:`close` after the last block.

    ``apply(indices, values, margin, values_at, row_start)`` takes the block's kept positions
    ``[R, G, k]`` and values (either may be changed in place and are returned), the relative
    margins ``[R, G]`` (:func:`selection_margin`), and ``values_at(local_pairs, positions)``,
    which returns the values the op would output for the given ``(row, group)`` pairs of the block
    (flat ids ``local_row * G + group``) had it kept ``positions`` (``[r, k]``, ascending).
    """

    def __init__(self, site: _Site, shape: tuple, k: int) -> None:
        self.site, self.shape, self.k = site, tuple(shape), int(k)
        self._pairs: list[Tensor] = []
        self._kept: list[Tensor] = []
        self._margins: list[Tensor] = []
        self.record = site.take(_SelectionRecord, self.shape) if site.replay else None

    @classmethod
    def begin(cls, shape: tuple, k: int) -> Optional["SelectionReplay"]:
        site = active_site()
        if site is None or int(k) >= int(shape[-1]):  # keeping all g values chooses nothing
            return None
        return cls(site, shape, k)

    def apply(self, indices: Tensor, values: Tensor, margin: Tensor,
              values_at: Callable[[Tensor, Tensor], Tensor], row_start: int = 0
              ) -> tuple[Tensor, Tensor]:
        groups, group = self.shape[1], self.shape[2]
        offset = row_start * groups
        if not self.site.replay:
            flat = margin.reshape(-1)
            local = (~(flat >= self.site.margin)).nonzero().squeeze(1)  # NaN margins are recorded
            self._pairs.append(local + offset)
            self._kept.append(_pack_positions(indices.reshape(-1, self.k)[local], group))
            self._margins.append(flat[local].nan_to_num(nan=0.0).float())
            self.site.tape.stats.choices += margin.numel()
            return indices, values
        indices, values = indices.contiguous(), values.contiguous()
        pairs = self.record.pairs.long()
        lo, hi = offset, offset + margin.numel()
        take = (pairs >= lo) & (pairs < hi)
        local = pairs[take] - offset
        unsafe = (margin < 0.5 * self.site.margin).reshape(-1)
        self.site.tape.count(unsafe=unsafe.sum() - unsafe[local].sum())
        if local.numel():
            forced = _unpack_positions(self.record.kept[take], group, self.k)
            flat_idx = indices.view(-1, self.k)
            self.site.tape.count(forced=(flat_idx[local].long() != forced).any(-1).sum())
            flat_idx[local] = forced.to(indices.dtype)
            values.view(-1, self.k)[local] = values_at(local, forced).to(values.dtype)
        return indices, values

    def close(self) -> None:
        if self.site.replay:
            return
        device = self._pairs[0].device if self._pairs else None
        groups, group = self.shape[1], self.shape[2]
        count = self.shape[0] * groups
        pairs = (torch.cat(self._pairs) if self._pairs
                 else torch.empty(0, dtype=torch.int64, device=device))
        kept = (torch.cat(self._kept) if self._kept
                else torch.empty(0, (group + 7) // 8, dtype=torch.uint8, device=device))
        margins = (torch.cat(self._margins) if self._margins
                   else torch.empty(0, device=device))
        self.site.put(_SelectionRecord(self.shape, self.k, pairs.to(_index_dtype(count)), kept,
                                       margins))
