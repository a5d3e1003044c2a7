"""The peak memory of one training step, predicted from the compiled graph without running it.

A step's peak is what is resident before it starts plus the highest point its activations reach:

==================  =====================================================================
parameters          the model's parameters and buffers
gradients           one gradient per parameter (``optimizer.zero_grad(set_to_none=True)`` frees
                    them between steps, but the step itself makes them all)
optimizer state     Adam and AdamW keep two moments per parameter; SGD with momentum one
inputs              the graph's inputs at this size (``x``, ``edge_index``: 16 bytes per edge)
arena               the chains' coupling scratch, planned once per input size and kept
activations         the highest sum of activations live at one step of forward and backward:
                    values, what autograd keeps, messages, the backward's gradients and, in a
                    reversible chain, one block's recompute (``ActivationLiveness``)
loss                the loss is not part of the graph: an elementwise loss such as MSE makes
                    four tensors the size of the model's output (the difference, its square,
                    and their gradients), counted on top of the activations' high point
==================  =====================================================================

The activations term is the maximum over the steps of the liveness walk of the bytes live at that
step; each live interval is affine in the node count N and edge count E, so the peak is a maximum
of affine functions, evaluated for any (N, E) in one pass, and the largest N that fits a budget
follows by bisection on a monotone function.

On CPU, :mod:`gsr_compiler.memory` measures the RSS *rise* of a step after a warm-up step: the
parameters, their gradients, the arena and the inputs are resident before it, so the rise is the
activations term (:attr:`StepPeak.rss_rise`). On CUDA, ``torch.cuda.max_memory_allocated`` counts
every tensor, each rounded up to the caching allocator's 512-byte blocks (:attr:`StepPeak.total`
with ``device="cuda"``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import fx, nn

from .passes.activation_liveness import ActivationLiveness, _Sizes, _traced
from .report import format_bytes

__all__ = ["StepPeak", "PeakPredictor", "OPTIMIZER_STATES", "optimizer_state_factor",
           "plain_predictor"]

#: Optimizer -> bytes of state per byte of parameters.
OPTIMIZER_STATES = {"adam": 2, "adamw": 2, "sgd": 0, "sgd-momentum": 1, "none": 0}
_CUDA_BLOCK = 512  # the caching allocator rounds every allocation up to this


def optimizer_state_factor(optimizer: str) -> int:
    """Bytes of optimizer state per parameter byte; a clear error for an unknown name."""
    key = str(optimizer).lower()
    if key not in OPTIMIZER_STATES:
        raise ValueError(f"optimizer={optimizer!r}: must be one of "
                         f"{', '.join(OPTIMIZER_STATES)} (it sets the optimizer state counted in "
                         "the peak: Adam keeps two moments per parameter)")
    return OPTIMIZER_STATES[key]


@dataclass(frozen=True)
class StepPeak:
    """The predicted peak of one training step at ``num_nodes`` nodes and ``num_edges`` edges."""

    device: str
    num_nodes: int
    num_edges: int
    parameters: int
    gradients: int
    optimizer_state: int
    inputs: int
    arena: int
    activations: int
    loss: int = 0

    @property
    def resident(self) -> int:
        """What is resident before the step's first op: all but the activations."""
        return (self.parameters + self.gradients + self.optimizer_state + self.inputs
                + self.arena)

    @property
    def total(self) -> int:
        """The step's peak: on CUDA what ``max_memory_allocated`` reports; on CPU the memory the
        step needs beyond the interpreter and libraries."""
        return self.resident + self.activations + self.loss

    @property
    def rss_rise(self) -> int:
        """The CPU RSS rise of a step after a warm-up step (what ``gsr_compiler.memory``
        measures with the fixed mmap threshold): only the activations and the loss come and go."""
        return self.activations + self.loss

    def rows(self) -> list[tuple[str, int]]:
        return [("parameters", self.parameters), ("gradients", self.gradients),
                ("optimizer state", self.optimizer_state), ("inputs", self.inputs),
                ("arena", self.arena), ("activations (peak)", self.activations),
                ("loss", self.loss), ("step peak", self.total)]

    def __str__(self) -> str:
        lines = [f"predicted peak of a training step ({self.device}, N={self.num_nodes:,}, "
                 f"E={self.num_edges:,}):"]
        lines += [f"  {name:<20} {format_bytes(value):>12}" for name, value in self.rows()]
        return "\n".join(lines)


def _parameter_bytes(module: nn.Module) -> int:
    seen = {}
    for t in list(module.parameters()) + list(module.buffers()):
        seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values())


def _trainable_bytes(module: nn.Module) -> int:
    seen = {}
    for p in module.parameters():
        if p.requires_grad:
            seen[id(p)] = p.numel() * p.element_size()
    return sum(seen.values())


class PeakPredictor:
    """Evaluates the step peak of one traced graph at any size.

    Args:
        liveness: the live intervals of one training step (``gsr_model.liveness``).
        gm: the graph they were computed for (its placeholders give the input sizes).
        module: what holds the parameters (the compiled model, or the model as written).
    """

    def __init__(self, liveness: ActivationLiveness, gm: fx.GraphModule, module: nn.Module) -> None:
        if not liveness.training:
            raise ValueError("the peak of a training step needs the liveness of a graph traced "
                             "in training mode (call model.train() before compiling)")
        self.liveness = liveness
        self.num_nodes, self.num_edges = liveness.num_nodes, liveness.num_edges
        self.parameter_bytes = _parameter_bytes(module)
        self.trainable_bytes = _trainable_bytes(module)
        placed = set(liveness.placed)
        self._free = self._per_step([b for b in liveness.intervals if b.name not in placed],
                                    liveness.steps)
        self._placed = self._per_step([b for b in liveness.intervals if b.name in placed],
                                      liveness.steps)
        self._input = self._input_size(gm, liveness.num_nodes, liveness.num_edges)
        self._output = self._output_size(gm, liveness.num_nodes, liveness.num_edges)

    @staticmethod
    def _per_step(intervals, steps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per step: bytes per node, per edge, constant, and the count of live tensors."""
        diff = np.zeros((4, steps + 1), dtype=np.float64)
        for b in intervals:
            s = b.size
            for row, v in enumerate((s.per_node, s.per_edge, s.const, 1)):
                diff[row, b.first_use] += v
                diff[row, b.last_use + 1] -= v
        out = np.cumsum(diff, axis=1)[:, :steps]
        return out[0], out[1], out[2], out[3]

    @staticmethod
    def _input_size(gm: fx.GraphModule, N: int, E: int) -> tuple[int, int, int]:
        sizes = _Sizes(N, E)
        total = (0, 0, 0)
        for node in gm.graph.nodes:
            if node.op != "placeholder":
                continue
            t = _traced(node)
            if t is None:
                continue
            s = sizes.size(t)
            total = (total[0] + s.per_node, total[1] + s.per_edge, total[2] + s.const)
        return total

    @staticmethod
    def _output_size(gm: fx.GraphModule, N: int, E: int) -> tuple[int, int, int]:
        sizes = _Sizes(N, E)
        out = next(n for n in gm.graph.nodes if n.op == "output")
        found: list = []
        fx.node.map_arg(out.args, lambda n: found.append(n) or n)
        total = (0, 0, 0)
        for node in found:
            t = _traced(node)
            if t is not None and t.dtype.is_floating_point:
                s = sizes.size(t)
                total = (total[0] + s.per_node, total[1] + s.per_edge, total[2] + s.const)
        return total

    @staticmethod
    def _peak(terms, N: float, E: float, block: int) -> float:
        a, b, c, count = terms
        if not len(a):
            return 0.0
        live = a * N + b * E + c + count * block
        return float(live.max())

    def predict(self, num_nodes: Optional[int] = None, num_edges: Optional[int] = None,
                optimizer: str = "adam", device: str = "cpu") -> StepPeak:
        """The step peak at ``num_nodes`` nodes and ``num_edges`` edges (default: traced)."""
        N = self.num_nodes if num_nodes is None else int(num_nodes)
        E = self.num_edges if num_edges is None else int(num_edges)
        if N < 0 or E < 0:
            raise ValueError(f"num_nodes and num_edges must be >= 0, got N={N}, E={E}")
        factor = optimizer_state_factor(optimizer)
        kind = torch.device(device).type
        block = _CUDA_BLOCK if kind == "cuda" else 0  # an upper bound of each tensor's rounding
        a, b, c = self._input
        o = self._output
        loss = 4 * int(o[0] * N + o[1] * E + o[2])
        return StepPeak(
            device=kind, num_nodes=N, num_edges=E, parameters=self.parameter_bytes,
            gradients=self.trainable_bytes, optimizer_state=factor * self.trainable_bytes,
            inputs=int(a * N + b * E + c), arena=int(self._peak(self._placed, N, E, block)),
            activations=int(self._peak(self._free, N, E, block)), loss=loss)

    def max_nodes(self, budget: int, avg_degree: Optional[float] = None,
                  optimizer: str = "adam", device: str = "cpu") -> int:
        """The largest node count whose step peak fits ``budget`` bytes, with
        ``avg_degree * N`` edges (default: the traced graph's ratio); 0 when none does."""
        deg = self.num_edges / max(self.num_nodes, 1) if avg_degree is None else avg_degree
        if not deg >= 0 or deg != deg or deg == float("inf"):
            raise ValueError(f"avg_degree={avg_degree!r}: must be a finite number >= 0 "
                             "(edges per node)")

        def fits(n: int) -> bool:
            return self.predict(n, int(round(deg * n)), optimizer, device).total <= budget

        if not fits(1):
            return 0
        lo, hi = 1, 2
        while fits(hi):
            lo, hi = hi, hi * 2
            if hi > 1 << 40:
                return lo
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo


def plain_predictor(model: nn.Module, example_inputs: tuple,
                    example_kwargs: Optional[dict] = None) -> PeakPredictor:
    """The predictor of the model as written: traced like a compile that converts nothing
    (no chain is long enough, no head recomputation), so every activation is autograd's."""
    from .api import gsr_compile

    traced = gsr_compile(model, min_chain_blocks=1 << 30, recompute_head=False,
                         plan_memory=False, replay_margin=None, anchors=None,
                         example_inputs=example_inputs, example_kwargs=example_kwargs)
    return PeakPredictor(traced.liveness, traced.graph_module, model)
