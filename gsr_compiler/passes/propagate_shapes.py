"""Pass: record every node's tensor shape by running the traced graph once.

Runs ``torch.fx.passes.shape_prop.ShapeProp`` on the real inputs, without grad, with
the random generators forked and all buffers restored afterwards, so that the user's
BatchNorm statistics and random stream are exactly as if nothing had run. Dropout modules
run in eval mode meanwhile: same shapes, without drawing a mask per layer (which is a
large part of the pass on a deep model).

A placeholder holding a sparse adjacency (a ``torch.sparse`` tensor in any sparse layout, or
a ``torch_sparse.SparseTensor``) carries no ``tensor_meta`` shape that says how many edges it
has: its number of stored entries goes to ``node.meta["gsr_num_edges"]``.

When a layer raises, the error names that layer and its own message, with hints on the
likely cause (``input_errors.py``), instead of torch.fx's dump of the node.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import LayerFailedError
from ..input_errors import describe_node, failure_hints


class _NodeFailed(BaseException):
    """A node's error on its way out of ShapeProp. A BaseException because ShapeProp and
    Interpreter catch Exception: the one prints the traceback, the other appends a dump
    of the node to the message; neither helps the user find the layer."""

    def __init__(self, node: fx.Node, args: tuple, error: Exception) -> None:
        super().__init__(node, args, error)
        self.node, self.inputs, self.error = node, args, error


class _RaisingInterpreter(fx.Interpreter):
    def run_node(self, n: fx.Node) -> Any:
        try:
            return super().run_node(n)
        except Exception as e:
            args, _ = self.fetch_args_kwargs_from_env(n)
            raise _NodeFailed(n, args, e) from e


class _ShapeProp(ShapeProp, _RaisingInterpreter):
    """ShapeProp whose ``super().run_node`` is ``_RaisingInterpreter.run_node``."""


@contextlib.contextmanager
def state_preserved(module: nn.Module, inputs: list) -> Iterator[None]:
    """The ``with`` block runs without grad, with the random generators forked and the
    buffers of ``module`` restored afterwards, so that running the model leaves no trace."""
    buffers = {name: b.detach().clone() for name, b in module.named_buffers()}
    cuda = sorted({t.device.index or 0 for t in inputs
                   if isinstance(t, torch.Tensor) and t.is_cuda})
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=cuda, device_type="cuda"):
            yield
    finally:
        with torch.no_grad():
            for name, b in module.named_buffers():
                b.copy_(buffers[name])


class PropagateShapes(PassBase):
    def __init__(self, inputs: list) -> None:
        super().__init__()
        self.inputs = inputs
        self.notes: list[str] = []

    def call(self, gm: fx.GraphModule) -> PassResult:
        dropouts = [m for m in gm.modules() if isinstance(m, nn.modules.dropout._DropoutNd)
                    and m.training]
        try:
            for m in dropouts:
                m.training = False
            with state_preserved(gm, self.inputs):
                _ShapeProp(gm).propagate(*self.inputs)
        except _NodeFailed as failed:
            raise self._layer_failed(gm, failed) from failed.error
        finally:
            for m in dropouts:
                m.training = True
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        for node, value in zip(placeholders, self.inputs):
            edges = sparse_adjacency_edges(value)
            if edges is not None:
                node.meta["gsr_num_edges"] = edges
        return PassResult(gm, False)

    def _layer_failed(self, gm: fx.GraphModule, failed: _NodeFailed) -> LayerFailedError:
        error = failed.error
        names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
        try:
            hints = failure_hints(gm, failed.node, failed.inputs, dict(zip(names, self.inputs)))
        except Exception:  # a hint must never hide the error itself (e.g. after a CUDA fault)
            hints = []
        return LayerFailedError(
            f"{describe_node(gm, failed.node)} raised {type(error).__name__}: {error}"
            + "".join(f"\n  hint: {h}" for h in hints)
        )


def sparse_adjacency_edges(value: Any) -> int | None:
    """The number of stored entries (edges) of a sparse adjacency, None for anything else."""
    if isinstance(value, torch.Tensor):
        return int(value._nnz()) if value.layout != torch.strided else None
    nnz = getattr(value, "nnz", None)  # torch_sparse.SparseTensor
    if callable(nnz) and hasattr(value, "storage") and hasattr(value, "sparse_sizes"):
        return int(nnz())
    return None


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
