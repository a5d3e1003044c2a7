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

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .choices import active_site, record_signs, recorded_signs
from .native import native_relu_covers, native_relu_record, native_relu_replay

__all__ = ["ReplayedReLU", "relu_record_reference", "relu_replay_reference"]


def _activate(x: Tensor, slope: float) -> Tensor:
    return F.relu(x) if slope == 0.0 else F.leaky_relu(x, slope)


def _row_rms(x: Tensor) -> Tensor:
    width = x.shape[-1]
    return torch.linalg.vector_norm(x.reshape(-1, width), dim=-1) / width ** 0.5


def relu_record_reference(x: Tensor, slope: float, margin: float
                          ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(leaky_relu(x, slope), rms of each row, flat positions (ascending) with
    |x| <= margin * rms(row), |x| / rms(row) there)``."""
    rms = _row_rms(x)
    width = x.shape[-1]
    near = (x.reshape(-1, width).abs() <= margin * rms[:, None]).reshape(-1)
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
                y, _, positions, margins = record(x.detach(), slope, site.margin)
                positive = x.detach().reshape(-1)[positions] > 0
            record_signs(site, tuple(x.shape), positions, positive, margins)
            return y.view_as(x) if not torch.is_grad_enabled() else _activate(x, slope)
        forced, positive = recorded_signs(site, tuple(x.shape))
        counts: list = []
        y = _ForcedSigns.apply(x, forced, positive, slope, 0.5 * site.margin, counts)
        unsafe, flipped = counts[0]
        site.tape.count(forced=flipped, unsafe=unsafe)
        return y

    def extra_repr(self) -> str:
        return "" if self.negative_slope == 0.0 else f"negative_slope={self.negative_slope}"
