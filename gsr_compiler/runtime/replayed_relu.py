r"""ReLU and LeakyReLU whose sign choices a reversible recompute replays.

.. math::
    \mathrm{LeakyReLU}(x) = \begin{cases} x & x > 0 \\ s\,x & \text{otherwise} \end{cases}
    \qquad (s = 0:\ \mathrm{ReLU})

Outside a reversible chain, and in the chain's forward, it computes exactly ``F.relu`` /
``F.leaky_relu`` (the forward also records the elements within the replay margin of 0,
:func:`~gsr_compiler.runtime.choices.replay_signs`). In the backward recompute, which runs on the
rebuilt input, those elements take the forward's side of 0, so the gradient mask is the
forward's: :math:`\partial y / \partial x = 1` where the forward had :math:`x > 0`, else ``s``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .choices import replay_signs

__all__ = ["ReplayedReLU"]


class ReplayedReLU(nn.Module):
    """``F.leaky_relu(x, negative_slope)`` (``F.relu`` for slope 0), with replayed signs.

    Args:
        negative_slope: slope for ``x <= 0``; 0 is ReLU.
    """

    def __init__(self, negative_slope: float = 0.0) -> None:
        super().__init__()
        self.negative_slope = float(negative_slope)

    def forward(self, x: Tensor) -> Tensor:
        mask = replay_signs(x)
        if mask is None:
            if self.negative_slope == 0.0:
                return F.relu(x)
            return F.leaky_relu(x, self.negative_slope)
        if self.negative_slope == 0.0:
            return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
        return torch.where(mask, x, x * self.negative_slope)

    def extra_repr(self) -> str:
        return "" if self.negative_slope == 0.0 else f"negative_slope={self.negative_slope}"
