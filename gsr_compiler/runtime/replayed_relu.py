r"""ReLU and LeakyReLU whose sign choices a reversible recompute replays.

.. math::
    \mathrm{LeakyReLU}(x) = \begin{cases} x & x > 0 \\ s\,x & \text{otherwise} \end{cases}
    \qquad (s = 0:\ \mathrm{ReLU})

Outside a reversible chain it is exactly ``F.relu`` / ``F.leaky_relu``. In the chain's forward it
computes the same values and records the elements within the block's replay margin of 0,
``|x| <= margin * rms(row)`` (:mod:`~gsr_compiler.runtime.choices`). In the backward recompute,
which runs on the rebuilt input, those elements take the forward's side of 0, in value and in
gradient (:math:`\partial y / \partial x = 1` where the forward had :math:`x > 0`, else ``s``),
and the elements near 0 that were *not* recorded are counted as unsafe.

:func:`relu_record_reference` and :func:`relu_replay_reference` are the torch forms; on CPU
float32 the same runs in native code (:mod:`gsr_compiler.runtime.native.replayed_relu`), one
pass instead of several.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .choices import (active_site, dense_sign_threshold, record_dense_signs, record_signs,
                      recorded_sign_record)
from .native import native_relu_covers, native_relu_record, native_relu_replay

__all__ = ["ReplayedReLU", "relu_record_reference", "relu_replay_reference"]


def _activate(x: Tensor, slope: float) -> Tensor:
    return F.relu(x) if slope == 0.0 else F.leaky_relu(x, slope)


def _row_rms(x: Tensor) -> Tensor:
    width = x.shape[-1]
    return torch.linalg.vector_norm(x.reshape(-1, width), dim=-1) / width ** 0.5


def relu_record_reference(x: Tensor, slope: float, margin: float, most: Optional[int] = None
                          ) -> tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """``(leaky_relu(x, slope), rms of each row, flat positions (ascending) with
    |x| <= margin * rms(row), |x| / rms(row) there)``; with more than ``most`` such elements,
    the positions and margins are None."""
    rms = _row_rms(x)
    width = x.shape[-1]
    near = (x.reshape(-1, width).abs() <= margin * rms[:, None]).reshape(-1)
    if most is not None and int(near.sum()) > most:
        return _activate(x, slope), rms, None, None
    positions = near.nonzero().squeeze(1)
    margins = x.reshape(-1)[positions].abs() / rms[positions // width]
    return _activate(x, slope), rms, positions, margins


def relu_replay_reference(x: Tensor, slope: float, margin: float, forced: Tensor,
                          positive: Tensor) -> tuple[Tensor, Tensor, int]:
    """``(leaky_relu(x, slope) with the elements at forced (flat positions) on the side
    positive says, rms of each row, how many elements have |x| <= margin * rms(row))``."""
    rms = _row_rms(x)
    width = x.shape[-1]
    y = _activate(x, slope).contiguous()
    picked = x.reshape(-1)[forced]
    y.view(-1)[forced] = torch.where(positive, picked, picked * slope)
    near = int((x.reshape(-1, width).abs() <= margin * rms[:, None]).sum())
    return y, rms, near


class _ForcedSigns(torch.autograd.Function):
    """The replayed ReLU: the value from :func:`relu_replay_reference` (or native), the
    gradient with the forward's sign choices at ``forced``. Keeps ``x`` (as ``F.relu`` keeps its
    output)."""

    @staticmethod
    def forward(ctx, x: Tensor, forced: Tensor, positive: Tensor, slope: float,
                margin: float, counts: list) -> Tensor:
        replay = native_relu_replay if native_relu_covers(x) else relu_replay_reference
        y, rms, near = replay(x, slope, margin, forced, positive)
        # Unsafe: near 0 now but not recorded; forced: recorded, and now on the other side.
        picked = x.detach().reshape(-1)[forced]
        recorded_near = (picked.abs() <= margin * rms[forced // x.shape[-1]]).sum()
        counts.append((near - recorded_near, (~(picked <= 0) != positive).sum()))
        ctx.save_for_backward(x, forced, positive)
        ctx.slope = slope
        return y.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, forced, positive = ctx.saved_tensors
        slope = ctx.slope
        if slope == 0.0:
            grad_x = torch.ops.aten.threshold_backward(grad, x, 0)
        else:
            grad_x = torch.ops.aten.leaky_relu_backward(grad, x, slope, False)
        grad_x = grad_x.contiguous()
        picked = grad.reshape(-1)[forced]
        grad_x.view(-1)[forced] = torch.where(positive, picked, picked * slope)
        return grad_x, None, None, None, None, None


class _MaskedForcedSigns(torch.autograd.Function):
    """:class:`_ForcedSigns` for a dense record: the forced elements as a flat bool mask
    ``recorded`` (and the forward's ``x > 0`` as ``positive``) instead of positions. Each element
    passes (``x``, gradient 1) or not (``slope * x``, gradient ``slope``) by one mask: the
    forward's choice where recorded, ReLU's own test elsewhere (as torch decides -0.0 and NaN)."""

    @staticmethod
    def forward(ctx, x: Tensor, recorded: Tensor, positive: Tensor, slope: float,
                margin: float, counts: list) -> Tensor:
        flat = x.detach().reshape(-1)
        forced = recorded & positive
        # relu(x) = x < 0 ? 0 : x and its gradient x <= 0 ? 0 : g; leaky: x > 0 either way.
        passes = forced | (~recorded & (~(flat < 0) if slope == 0.0 else flat > 0))
        grad_passes = forced | (~recorded & ~(flat <= 0)) if slope == 0.0 else passes
        y = torch.where(passes, flat, flat * slope if slope != 0.0 else 0.0)
        rms = _row_rms(x.detach())
        near = (flat.view(-1, x.shape[-1]).abs() <= margin * rms[:, None]).reshape(-1)
        counts.append(((near & ~recorded).sum(), (recorded & (~(flat <= 0) != positive)).sum()))
        ctx.save_for_backward(grad_passes)
        ctx.slope = slope
        return y.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (grad_passes,) = ctx.saved_tensors
        flat = grad.reshape(-1)
        slope = ctx.slope
        grad_x = torch.where(grad_passes, flat, flat * slope if slope != 0.0 else 0.0)
        return grad_x.view_as(grad), None, None, None, None, None


class ReplayedReLU(nn.Module):
    """``F.leaky_relu(x, negative_slope)`` (``F.relu`` for slope 0), with replayed signs.

    Args:
        negative_slope: slope for ``x <= 0``; 0 is ReLU.
    """

    def __init__(self, negative_slope: float = 0.0) -> None:
        super().__init__()
        self.negative_slope = float(negative_slope)

    def forward(self, x: Tensor) -> Tensor:
        site = active_site()
        slope = self.negative_slope
        if site is None or x.dim() == 0 or x.shape[-1] == 0:
            return _activate(x, slope)
        if not site.replay:  # the chain's forward
            record = native_relu_record if native_relu_covers(x) else relu_record_reference
            with torch.no_grad():
                xd = x.detach()
                # Many elements near 0 (a ReLU of a ReLU's output): bitmasks, not positions.
                y, rms, positions, margins = record(xd, slope, site.margin,
                                                    dense_sign_threshold(xd.numel()))
                if positions is None:
                    near = xd.reshape(-1, x.shape[-1]).abs() <= site.margin * rms[:, None]
                    record_dense_signs(site, tuple(x.shape), near, xd > 0)
                else:
                    positive = xd.reshape(-1)[positions] > 0
                    record_signs(site, tuple(x.shape), positions, positive, margins)
            return y.view_as(x) if not torch.is_grad_enabled() else _activate(x, slope)
        record = recorded_sign_record(site, tuple(x.shape))
        counts: list = []
        if record.dense:
            recorded, positive = record.masks()
            y = _MaskedForcedSigns.apply(x, recorded.to(x.device), positive.to(x.device), slope,
                                         0.5 * site.margin, counts)
        else:
            forced, positive = record.choices()
            y = _ForcedSigns.apply(x, forced, positive, slope, 0.5 * site.margin, counts)
        unsafe, flipped = counts[0]
        site.tape.count(forced=flipped, unsafe=unsafe)
        return y

    def extra_repr(self) -> str:
        return "" if self.negative_slope == 0.0 else f"negative_slope={self.negative_slope}"
