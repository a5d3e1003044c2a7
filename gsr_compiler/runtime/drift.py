r"""Bounding and measuring how far a reversible chain's rebuilt inputs drift from the forward's.

The backward rebuilds block inputs from outputs, :math:`x_i = y_i - f_i(y_{i-1})`. Each
subtraction rounds at the scale of :math:`y_i`, and :math:`f_i` amplifies the error it is given,
so the error grows with depth, and fast where activations grow (a branch without a norm): rebuilding
a small :math:`x` from a large :math:`y` loses :math:`\log_2 |y| / |x|` bits.

* **Anchors** (:class:`AnchorPolicy`): the forward keeps the exact input of some blocks, and the
  backward resumes from it, so the error cannot compound past one segment. ``"auto"`` places one
  where the state's RMS, sampled on a few rows, has grown :func:`auto_anchor_growth` times since
  the last anchor (or the chain input); an integer places one every that many blocks.

  Why growth: rebuilding :math:`x_a` from a state :math:`G` times larger rounds at
  :math:`\epsilon G` relative to :math:`x_a`, and the branches amplify that error about as much
  as they grew the state, so the relative error at the anchor is near :math:`\epsilon G^2`
  (measured here, float32: pre-norm SAGE blocks grow about 20x over 1000 blocks and rebuild the
  input within 5e-5; GIN blocks without a norm grow 1.3x per block, and segments of 16x and 64x
  growth rebuild within 1.4e-5 and 1.6e-4). Anchors keep it below a quarter of the replay margin,
  so that unrecorded choices stay out of reach.
* **Measurement**: at every anchor, and at the chain input (a few rows of it are kept), the
  backward compares the rebuilt tensor with the exact one: ``rms(rebuilt - exact) / rms(exact)``.
  :class:`ChainPrecision` holds what the last backward measured.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .choices import ReplayStats

__all__ = ["PROBE_ROWS", "AnchorPolicy", "ChainPrecision", "auto_anchor_growth",
           "check_anchors", "relative_error"]

#: Rows of the chain input kept to measure the reconstruction error at the end of the backward
#: (and sampled for the growth of ``anchors="auto"``).
PROBE_ROWS = 64

AnchorSetting = Union[str, int, None]


def check_anchors(anchors: object) -> AnchorSetting:
    """``anchors`` if valid (``"auto"``, a positive int, or None), else a ValueError."""
    if anchors is None or anchors == "auto":
        return anchors
    if isinstance(anchors, int) and not isinstance(anchors, bool) and anchors >= 1:
        return int(anchors)
    raise ValueError(f"anchors={anchors!r}: must be 'auto' (where the state grows), a positive "
                     "int (every that many blocks) or None (no anchors)")


def auto_anchor_growth(dtype: torch.dtype, replay_margin: Optional[float],
                       drift_tolerance: float) -> float:
    r"""The state growth after which ``anchors="auto"`` keeps an exact input: the
    :math:`G` with :math:`\epsilon G^2` at a quarter of the replay margin (a tenth of the drift
    tolerance without replay), :math:`\epsilon` the dtype's unit roundoff. About 20 for float32 with
    the default margin, 5e5 for float64."""
    target = drift_tolerance / 10
    if replay_margin:
        target = min(target, replay_margin / 4)
    # Unit roundoff: half the distance from 1 to the next number.
    unit = (torch.finfo(dtype if dtype.is_floating_point else torch.float32).eps) / 2
    return max(2.0, math.sqrt(target / unit))


def relative_error(rebuilt: Tensor, exact: Tensor) -> float:
    """``rms(rebuilt - exact) / rms(exact)`` in float64 (inf if the exact tensor is all 0 and
    the rebuilt one is not)."""
    diff = torch.linalg.vector_norm((rebuilt.detach().double() - exact.detach().double()))
    scale = torch.linalg.vector_norm(exact.detach().double())
    d, s = float(diff), float(scale)
    if s == 0.0:
        return 0.0 if d == 0.0 else math.inf
    return d / s


def _rows(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1]) if t.dim() else t.reshape(1, 1)


def probe_rows(t: Tensor) -> Tensor:
    """Indices of at most :data:`PROBE_ROWS` rows of ``t`` spread evenly (no randomness: the
    dropout streams must not move)."""
    n = _rows(t).shape[0]
    step = max(1, -(-n // PROBE_ROWS))
    return torch.arange(0, n, step, device=t.device)


def _rms(groups: Sequence[Tensor], rows: Tensor) -> float:
    sample = torch.cat([_rows(t).index_select(0, rows) for t in groups], dim=-1).double()
    return float(torch.linalg.vector_norm(sample)) / math.sqrt(max(1, sample.numel()))


class AnchorPolicy:
    """Where one forward of a chain keeps exact block inputs.

    Args:
        setting: ``"auto"``, an int (every that many blocks) or None.
        x_groups: the chain input's groups (the growth baseline and the probe rows).
        growth: the growth that places an anchor under ``"auto"`` (:func:`auto_anchor_growth`).
    """

    def __init__(self, setting: AnchorSetting, x_groups: Sequence[Tensor],
                 growth: float) -> None:
        self.setting = setting
        self.growth = growth
        self.rows = probe_rows(x_groups[0])
        self._base = _rms(x_groups, self.rows) if setting == "auto" else 0.0

    def wants(self, block: int, groups: Sequence[Tensor]) -> bool:
        """Whether to keep the exact input of ``block`` (its groups ``groups``)."""
        if block == 0 or self.setting is None:
            return False
        if isinstance(self.setting, int):
            return block % self.setting == 0
        now = _rms(groups, self.rows)
        if not math.isfinite(now):
            return False
        if now > self.growth * self._base:
            self._base = now
            return True
        return False


@dataclass
class ChainPrecision:
    """What the last backward of a chain kept and measured.

    Attributes:
        replay: the discrete choices recorded and replayed (None with replay off).
        anchors: blocks whose exact input the forward kept.
        anchor_bytes: bytes those inputs kept until the backward.
        errors: block -> ``rms(rebuilt - exact) / rms(exact)`` of that block's rebuilt input,
            at every anchor and at block 0 (the chain input, on :data:`PROBE_ROWS` rows).
        gradient_errors: with ``verify``, the relative error of each gradient (``"input"``
            and every parameter by name) against the chain run storing everything.
    """

    replay: Optional[ReplayStats]
    anchors: list[int] = field(default_factory=list)
    anchor_bytes: int = 0
    errors: dict[int, float] = field(default_factory=dict)
    gradient_errors: dict[str, float] = field(default_factory=dict)

    @property
    def worst_error(self) -> float:
        return max(self.errors.values(), default=0.0)

    @property
    def kept_bytes(self) -> int:
        """Bytes kept for the guard: replay records and anchors."""
        return self.anchor_bytes + (self.replay.nbytes if self.replay is not None else 0)

    def summary(self) -> str:
        parts = []
        if self.replay is not None:
            r = self.replay
            parts.append(f"{r.recorded} of {r.choices} choices recorded, {r.forced} flips "
                         f"prevented, {r.unsafe} unsafe")
        parts.append(f"{len(self.anchors)} anchor(s) ({self.anchor_bytes} bytes)")
        if self.errors:
            worst = max(self.errors, key=self.errors.get)
            parts.append(f"largest reconstruction error {self.errors[worst]:.1e} (block {worst})")
        if self.gradient_errors:
            worst = max(self.gradient_errors, key=self.gradient_errors.get)
            parts.append(f"verify: largest gradient error {self.gradient_errors[worst]:.1e} "
                         f"({worst})")
        return "; ".join(parts)
