"""Pass: record every node's tensor shape by running the traced graph once.

Runs ``torch.fx.passes.shape_prop.ShapeProp`` on the real inputs, without grad, with
the random generators forked and all buffers restored afterwards, so that the user's
BatchNorm statistics and random stream are exactly as if nothing had run. Dropout modules
run in eval mode meanwhile: same shapes, without drawing a mask per layer (which is a
large part of the pass on a deep model).
"""
from __future__ import annotations

import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from torch.fx.passes.shape_prop import ShapeProp


class PropagateShapes(PassBase):
    def __init__(self, inputs: list) -> None:
        super().__init__()
        self.inputs = inputs
        self.notes: list[str] = []

    def call(self, gm: fx.GraphModule) -> PassResult:
        buffers = {name: b.detach().clone() for name, b in gm.named_buffers()}
        cuda = sorted({t.device.index or 0 for t in self.inputs
                       if isinstance(t, torch.Tensor) and t.is_cuda})
        dropouts = [m for m in gm.modules() if isinstance(m, nn.modules.dropout._DropoutNd)
                    and m.training]
        try:
            for m in dropouts:
                m.training = False
            with torch.no_grad(), torch.random.fork_rng(devices=cuda, device_type="cuda"):
                ShapeProp(gm).propagate(*self.inputs)
        finally:
            for m in dropouts:
                m.training = True
            with torch.no_grad():
                for name, b in gm.named_buffers():
                    b.copy_(buffers[name])
        return PassResult(gm, False)


def node_shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(shape) if shape is not None else None


def node_bytes(node: fx.Node) -> int:
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        return 0
    numel = 1
    for s in meta.shape:
        numel *= int(s)
    return numel * torch.empty((), dtype=meta.dtype).element_size()
