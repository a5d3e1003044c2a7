r"""Bounding and measuring how far a reversible chain's rebuilt inputs drift from the forward's.

The backward rebuilds block inputs from outputs, :math:`x_i = y_i - f_i(y_{i-1})`. Each
subtraction rounds at the scale of :math:`y_i`, and :math:`f_i` carries the error on to earlier
blocks, so the error grows with depth, and fast where the state grows: rebuilding a small
:math:`x` from a large :math:`y` loses :math:`\log_2 |y| / |x|` bits.

**The prediction.** Rebuilding block :math:`i`'s input from a point :math:`n` blocks later (an
anchor, or the chain output), where the state is :math:`R` times larger (the largest RMS on the
way over the RMS at :math:`i`), leaves a relative error near

.. math::
    e_i \approx \max(c\, u\, R \sqrt{n},\; u R^2), \qquad c = 10

with :math:`u` the dtype's unit roundoff: rounding errors of size :math:`uR` add up like a random
walk, or, where the branches grow the state along itself (no norm), are amplified as much as the
state grew. Branches can amplify errors more than that (ResGEN's GENConv blocks with softmax
aggregation and BatchNorm, 128 two-stream coupling blocks: measured 14 times the prediction, the
error growing about as :math:`n^{2.3}` with the segment length). So each chain **calibrates** the
prediction with what its backwards measure: the prediction is multiplied by the largest ratio of
measured to predicted error seen so far (:func:`calibrated_scale`, at least 1), and the next
forward places its anchors and replay margins with it. Measured here in float32 at the chain input against this prediction: pre-norm SAGE,
2,000 nodes, 1000 blocks (R = 20): 2.4e-4 vs 3.8e-4; the same on b18_Cg, 256 blocks (R = 41):
3.7e-4 vs 3.9e-4; GIN blocks without a norm, segments growing 64x over 16 blocks: 1.6e-4 vs
2.5e-4, and 16x over about 10 blocks: 1.4e-5 vs 3e-5. The chain samples the RMS of its state on
:data:`PROBE_ROWS` rows before every block.

* **Anchors** (:class:`AnchorPolicy`): the forward keeps the exact input of some blocks, and the
  backward resumes from it, so the error cannot compound past one segment. ``"auto"`` keeps one
  where the predicted error of the segment since the last anchor would pass
  :data:`ANCHOR_SHARE` of the drift tolerance; an integer keeps one every that many blocks.
* **Replay margins** (:func:`block_margins`): each block keeps the discrete choices whose margin
  is below 4 times the error predicted at its input (at least ``replay_margin``, at most twice the
  drift tolerance), so that a rebuilt input cannot reach an unrecorded one.
* **Measurement**: at every anchor, and at the chain input (a few rows of it are kept), the
  backward compares the rebuilt tensor with the exact one: ``rms(rebuilt - exact) / rms(exact)``.
  :class:`ChainPrecision` holds what the last backward measured, beside the prediction.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from .choices import ReplayStats

__all__ = ["PROBE_ROWS", "ANCHOR_SHARE", "DRIFT_CONSTANT", "AnchorPolicy", "ChainPrecision", "ForwardGuard",
           "block_margins", "calibrated_scale", "check_anchors", "drift_findings", "exact_patch", "predicted_errors",
           "recording_margins", "relative_error", "unit_roundoff"]

#: Rows of the chain input kept to measure the reconstruction error at the end of the backward,
#: and sampled before every block for the RMS of the state.
PROBE_ROWS = 64

#: ``"auto"`` anchors keep the predicted rebuild error under this share of ``drift_tolerance``.
#: Real models amplify a rebuild error far more than pre-norm SAGE does: at 256 blocks in
#: float32, ResGEN (GENConv, softmax aggregation, BatchNorm), EGC, OGB's GIN with bond encoders
#: and MemPooling's GAT blocks turn rebuild errors of 1e-4 to 2e-3 into gradient errors 10 to
#: 10,000 times float32's own (``benchmarks/corpus_exactness.py``); with
#: ``drift_tolerance=1e-5`` (anchors under 5e-6) every one is within twice it. Not the default
#: yet: the anchors then grow with depth (pre-norm SAGE, 2,000 nodes: 6 states at 256 blocks,
#: 18 at 1000), which the peak prediction and the memory budget do not count.
ANCHOR_SHARE = 1 / 2

#: ``c`` of the prediction :math:`e \approx c u R \sqrt{n}` (module docstring).
DRIFT_CONSTANT = 10.0

AnchorSetting = Union[str, int, None]


def check_anchors(anchors: object) -> AnchorSetting:
    """``anchors`` if valid (``"auto"``, a positive int, or None), else a ValueError."""
    if anchors is None or anchors == "auto":
        return anchors
    if isinstance(anchors, int) and not isinstance(anchors, bool) and anchors >= 1:
        return int(anchors)
    raise ValueError(f"anchors={anchors!r}: must be 'auto' (where the state grows), a positive "
                     "int (every that many blocks) or None (no anchors)")


def unit_roundoff(dtype: torch.dtype) -> float:
    """Half the distance from 1 to the next number of ``dtype`` (float32: 6e-8)."""
    return torch.finfo(dtype if dtype.is_floating_point else torch.float32).eps / 2


def predicted_errors(rms: Sequence[float], anchors: Sequence[int], unit: float,
                     scale: float = 1.0) -> np.ndarray:
    """Predicted relative rebuild error of each block input ``0..L-1``.

    ``rms[i]`` is the state's RMS before block ``i`` (``rms[L]``: the chain output); ``anchors``
    the blocks whose exact input is kept. Each block is rebuilt from the next anchor above it,
    or from the output. ``scale`` is the chain's calibration (:func:`calibrated_scale`)."""
    s = np.asarray(rms, dtype=np.float64)
    depth = len(s) - 1
    errors = np.zeros(depth)
    tops = sorted(set(a for a in anchors if 0 < a < depth)) + [depth]
    start = 0
    for top in tops:
        seg = s[start:top + 1]
        # the largest RMS from each block up to the segment top, over the block's own
        peak = np.maximum.accumulate(seg[::-1])[::-1][:-1]
        own = np.where(seg[:-1] > 0, seg[:-1], np.inf)
        steps = top - np.arange(start, top)
        growth = peak / own
        errors[start:top] = scale * np.maximum(DRIFT_CONSTANT * unit * growth * np.sqrt(steps),
                                               unit * growth ** 2)
        start = top
    return np.nan_to_num(errors, nan=np.inf)


def block_margins(errors: np.ndarray, floor: Optional[float], drift_tolerance: float
                  ) -> dict[int, float]:
    """The replay margin of each block: 4 times its predicted error, at least ``floor`` (the
    configured ``replay_margin``), at most twice ``drift_tolerance``."""
    low = floor or 0.0
    high = max(low, 2 * drift_tolerance)
    return {i: float(min(high, max(low, 4 * e))) for i, e in enumerate(errors)}


def recording_margins(previous_rms: Optional[Sequence[float]], depth: int, unit: float,
                      floor: Optional[float], drift_tolerance: float,
                      scale: float = 1.0) -> list[float]:
    """The margin each block's forward records below, before the step's own prediction is
    known: from the previous step's RMS profile (the state twice as large relative to each
    block, to be safe), or without one the largest margin (twice ``drift_tolerance``). The
    forward prunes its records to :func:`block_margins` once it has run."""
    high = max(floor or 0.0, 2 * drift_tolerance)
    if previous_rms is None or len(previous_rms) != depth + 1:
        return [high] * depth
    s = np.asarray(previous_rms, dtype=np.float64)
    peak = np.maximum.accumulate(s[::-1])[::-1][:-1]
    own = np.where(s[:-1] > 0, s[:-1], np.inf)
    growth = 2 * peak / own
    estimate = scale * np.maximum(
        DRIFT_CONSTANT * unit * growth * np.sqrt(depth - np.arange(depth)), unit * growth ** 2)
    return list(block_margins(np.nan_to_num(estimate, nan=np.inf), floor,
                              drift_tolerance).values())


def calibrated_scale(scale: float, measured: dict[int, float], predicted: dict[int, float]
                     ) -> float:
    """The chain's calibration after a backward: ``scale`` (the one its forward predicted with)
    raised to what the measured rebuild errors need, ``scale * measured / predicted`` at the
    worst block, never lowered (a prediction the anchors it placed made true must stay)."""
    ratios = [measured[i] / predicted[i] for i in measured
              if predicted.get(i, 0.0) > 0.0 and math.isfinite(measured[i])]
    return max(scale, scale * max(ratios, default=1.0))


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


def sampled_rms(groups: Sequence[Tensor], rows: Tensor) -> float:
    """RMS of the state (its groups side by side) on the sampled ``rows``."""
    sample = torch.cat([_rows(t).index_select(0, rows) for t in groups], dim=-1).double()
    return float(torch.linalg.vector_norm(sample)) / math.sqrt(max(1, sample.numel()))


class AnchorPolicy:
    """Where one forward of a chain keeps exact block inputs; it also records the RMS of the
    state before every block (:attr:`rms`).

    Args:
        setting: ``"auto"``, an int (every that many blocks) or None.
        x_groups: the chain input's groups (its RMS is the first entry; the probe rows).
        unit: the unit roundoff of the chain's dtype.
        limit: ``"auto"`` keeps an anchor before the predicted error of the current segment
            passes this.
        scale: the chain's calibration of the prediction (:func:`calibrated_scale`).
    """

    def __init__(self, setting: AnchorSetting, x_groups: Sequence[Tensor], unit: float,
                 limit: float, scale: float = 1.0) -> None:
        self.setting, self.unit, self.limit, self.scale = setting, unit, limit, scale
        self.rows = probe_rows(x_groups[0])
        self.rms = [sampled_rms(x_groups, self.rows)]
        self.anchors: list[int] = []
        self.inexact: list[int] = []  # blocks whose update the backward rebuilds with rounding
        self._start = 0

    def note_exact(self, block: int, exact: bool) -> None:
        """Whether ``block``'s updates are rebuilt exactly (every group patched, :func:`exact_patch`)."""
        if not exact:
            self.inexact.append(block)

    def _exact_since(self, start: int) -> bool:
        return not self.inexact or self.inexact[-1] < start

    def wants(self, block: int, groups: Sequence[Tensor]) -> bool:
        """Whether to keep the exact input of ``block`` (its groups ``groups``); call once per
        block, in order, from block 1 (block 0's input is the chain input)."""
        self.rms.append(sampled_rms(groups, self.rows))
        if self.setting is None:
            return False
        if isinstance(self.setting, int):
            keep = block % self.setting == 0
        elif self._exact_since(self._start):
            keep = False  # nothing rebuilt with rounding since the last anchor
        else:
            seg = self.rms[self._start:block + 1]
            keep = block > self._start and bool(
                predicted_errors(seg, [], self.unit, self.scale).max(initial=0.0) > self.limit)
        if keep:
            self.anchors.append(block)
            self._start = block
        return keep

    def finish(self, output: Tensor) -> np.ndarray:
        """After the last block: the predicted error of every block input (0 where every
        block from it up to the next anchor, or the output, is rebuilt exactly)."""
        self.rms.append(sampled_rms(list(output.chunk(1, dim=-1)), self.rows))
        errors = predicted_errors(self.rms, self.anchors, self.unit, self.scale)
        depth = len(self.rms) - 1
        tops = sorted(set(self.anchors)) + [depth]
        inexact = set(self.inexact)
        for i in range(depth):
            top = next(t for t in tops if t > i)
            if not any(b in inexact for b in range(i, top)):
                errors[i] = 0.0
        return errors


@dataclass
class ForwardGuard:
    """What one forward of a chain keeps for its backward's exactness.

    Attributes:
        policy: where anchors go; it samples the state's RMS before every block.
        anchors: block -> its exact input groups.
        predicted: the predicted rebuild error of every block input (after the forward).
        patches: ``(block, group)`` -> ``(flat positions, exact values)`` of the state elements
            that subtracting the branch output again would not give back exactly; kept where a
            16-bit branch output (autocast) updates a wider state (:func:`exact_patch`).
    """

    policy: AnchorPolicy
    anchors: dict[int, list[Tensor]] = field(default_factory=dict)
    predicted: Optional[np.ndarray] = None
    patches: dict[tuple[int, int], tuple[Tensor, Tensor]] = field(default_factory=dict)


def exact_patch(before: Tensor, after: Tensor, out: Tensor) -> tuple[Tensor, Tensor]:
    """The elements of a coupling update ``after = before + out`` that ``after - out`` does not
    give back, as ``(flat positions, values of before)``.

    Under autocast a branch output has 8 (bfloat16) or 11 (float16) significant bits and the
    state 24: the addition rounds only where the state's bits and the output's do not overlap,
    which is rare, so the backward can rebuild the state *exactly* by subtracting and patching
    these few elements. That matters more than in float32: a rebuilt input off by a rounding
    error makes the 16-bit recompute of the next branch round differently, an error of a 16-bit
    unit where float32 would give one of a float32 unit, and the errors cascade (measured:
    bfloat16 autocast, 1000 pre-norm SAGE blocks, the chain input rebuilt 0.5 off without this,
    exactly with it)."""
    wrong = (torch.sub(after, out) != before).reshape(-1).nonzero().squeeze(1)
    positions = wrong.to(torch.int32 if before.numel() < 2 ** 31 else torch.int64)
    return positions, before.reshape(-1)[wrong].clone()


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
        patch_bytes: bytes of the exact values kept where a 16-bit branch output (autocast)
            updated the float32 state with rounding (:func:`exact_patch`).
        predicted: the predicted error at the blocks of ``errors``, for comparison.
        margins: smallest and largest replay margin of the blocks.
        short: blocks whose forward recorded below a smaller margin than their prediction
            asked for (the state grew more than the previous step's suggested).
        calibration: the factor the forward multiplied the prediction by
            (:func:`calibrated_scale` of the backwards before it).
    """

    replay: Optional[ReplayStats]
    anchors: list[int] = field(default_factory=list)
    anchor_bytes: int = 0
    patch_bytes: int = 0
    errors: dict[int, float] = field(default_factory=dict)
    gradient_errors: dict[str, float] = field(default_factory=dict)
    predicted: dict[int, float] = field(default_factory=dict)
    margins: tuple[float, float] = (0.0, 0.0)
    short: list[int] = field(default_factory=list)
    calibration: float = 1.0

    @property
    def worst_error(self) -> float:
        return max(self.errors.values(), default=0.0)

    @property
    def kept_bytes(self) -> int:
        """Bytes kept for the guard: replay records, anchors and exact patches."""
        return (self.anchor_bytes + self.patch_bytes
                + (self.replay.nbytes if self.replay is not None else 0))

    def summary(self) -> str:
        parts = []
        if self.replay is not None:
            r = self.replay
            parts.append(f"{r.recorded} of {r.choices} choices recorded, {r.forced} flips "
                         f"prevented, {r.unsafe} unsafe")
            parts.append(f"replay margins {self.margins[0]:.1e} to {self.margins[1]:.1e}"
                         + (f", {len(self.short)} block(s) recorded short" if self.short else ""))
        parts.append(f"{len(self.anchors)} anchor(s) ({self.anchor_bytes} bytes)")
        if self.patch_bytes:
            parts.append(f"exact patches {self.patch_bytes} bytes")
        if self.errors:
            worst = max(self.errors, key=self.errors.get)
            guess = self.predicted.get(worst)
            parts.append(f"largest reconstruction error {self.errors[worst]:.1e} (block {worst}"
                         + (f", predicted {guess:.1e})" if guess is not None else ")"))
        if self.calibration != 1.0:
            parts.append(f"prediction calibrated x{self.calibration:.3g} by earlier backwards")
        if self.gradient_errors:
            worst = max(self.gradient_errors, key=self.gradient_errors.get)
            parts.append(f"verify: largest gradient error {self.gradient_errors[worst]:.1e} "
                         f"({worst})")
        return "; ".join(parts)


def drift_findings(name: str, precision: ChainPrecision, replay_margin: Optional[float],
                   drift_tolerance: float) -> list[tuple[str, str]]:
    """``(kind, message)`` for each way the backward of chain ``name`` went beyond what it
    guarantees: unsafe choices, verified gradients off, records short of their margin, a
    rebuild error above the tolerance. Each message says what to change."""
    found = []
    replay = precision.replay
    if replay is not None and replay.unsafe:
        found.append(("unsafe",
            f"{name}: the backward recompute found {replay.unsafe} discrete choice(s) (ReLU "
            "signs, top-k selections) the forward did not record, within half their block's "
            f"replay margin (at most {precision.margins[1]:g}) of flipping: the rebuilt inputs "
            "drifted that far, and the gradients may be inexact. Raise GSRConfig.replay_margin "
            f"(now {replay_margin}), add anchors (GSRConfig.anchors=<every n blocks>), or check "
            "with verify_gradients()."))
    grads = precision.gradient_errors
    if grads and max(grads.values()) > drift_tolerance:
        worst = max(grads, key=grads.get)
        found.append(("verify",
            f"{name}: verify: the reversible backward's gradient of {worst} is off by "
            f"{grads[worst]:.2e} (relative) from the chain run storing everything, above "
            f"drift_tolerance={drift_tolerance:g}. See last_precision.gradient_errors."))
    if precision.short:
        found.append(("short",
            f"{name}: {len(precision.short)} block(s) (first: {precision.short[0]}) needed a "
            "larger replay margin than the forward recorded with, because the state grew more "
            "than in the previous step; their rebuilt choices rely on the unsafe count. Raise "
            "GSRConfig.replay_margin if this repeats."))
    if precision.worst_error > drift_tolerance:
        block = max(precision.errors, key=precision.errors.get)
        found.append(("drift",
            f"{name}: the backward rebuilt the input of block {block} with a relative error of "
            f"{precision.worst_error:.2e}, above drift_tolerance={drift_tolerance:g} (anchors: "
            f"{len(precision.anchors)}). The chain's next forwards predict the drift from this "
            "measurement (with anchors='auto' they keep more anchors). Keep exact states more "
            "often (GSRConfig.anchors=<every n blocks>), normalize the branches (activations that grow block after block are "
            "what the rebuild loses), train in float32 or wider, or check with "
            "verify_gradients()."))
    return found
