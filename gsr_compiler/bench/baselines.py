"""The configurations ``gsr bench`` compares: the tools people use today, and GSR.

Every baseline is the same deep residual GNN (:class:`~gsr_compiler.models.ResidualGNN`:
linear encoder, ``depth`` pre-norm blocks ``h = h + conv(dropout(relu(norm(h))))``,
norm, decoder), written the way each tool wants it:

==================  ===========================================================
``plain``           the model as written, eager PyTorch
``checkpoint``      the same, each block under ``torch.utils.checkpoint``
``deepgcn``         the same blocks as PyG ``DeepGCNLayer(block="res+", ckpt_grad=True)``
``groupaddrev``     grouped reversible blocks built by hand with PyG ``GroupAddRev``
``torch.compile``   ``torch.compile`` of the plain model (default mode)
``gsr-rev``         ``gsr_compile(plain, groups=G)``: grouped reversible only (no planned arena)
``gsr-sparse``      the same plus the group top-k (``sparse_k=k``)
``gsr-full``        the most complete GSR configuration this ``GSRConfig`` offers
==================  ===========================================================

``plain``, ``checkpoint``, ``deepgcn`` and ``torch.compile`` compute the same function;
``groupaddrev`` and the GSR forms are the grouped reversible architecture (G branches of
width D/G per block).

A baseline's ``build`` is a module-level function so that a :class:`Baseline` can be sent
to the fresh process that measures it.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable

import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..models import CONVS, ResidualGNN


@dataclass(frozen=True)
class ModelSpec:
    """The architecture every baseline builds."""

    in_channels: int
    width: int
    depth: int
    out_channels: int = 1
    conv: str = "sage"
    dropout: float = 0.1
    groups: int = 2
    sparse_k: int | None = None  # None: g/8 of the group width g = width/groups

    @property
    def group_width(self) -> int:
        return self.width // self.groups

    @property
    def top_k(self) -> int:
        """Values kept per node and channel group by the sparse GSR forms."""
        return self.sparse_k if self.sparse_k is not None else max(1, self.group_width // 8)

    def plain(self) -> ResidualGNN:
        return ResidualGNN(self.in_channels, self.width, self.out_channels, self.depth,
                           conv=self.conv, dropout=self.dropout)


@dataclass(frozen=True)
class Baseline:
    """One configuration of the comparison: a name, what it is, and how to build it."""

    name: str
    title: str
    build: Callable[[ModelSpec, tuple], nn.Module]
    same_function_as_plain: bool = False

    def describe(self, spec: ModelSpec, on_cuda: bool = False) -> str:
        """What this baseline includes, for the table (GSR options spelled out)."""
        options = gsr_options(self.name, spec, on_cuda)
        if options is None:
            return self.title
        text = f"{self.title}: gsr_compile({', '.join(f'{k}={v!r}' for k, v in options.items())})"
        if self.name == "gsr-full":
            missing = [n for n in _FULL_ONLY + ("backend",) if n not in _gsr_config_fields()]
            if missing:
                text += (f"; this GSRConfig has no {' or '.join(missing)} option, so that part "
                         "is not included")
            if "backend" in options and not on_cuda:
                text += "; on CPU the backend keeps its default (Triton kernels need CUDA)"
        return text


class CheckpointedResidualGNN(nn.Module):
    """A :class:`~gsr_compiler.models.ResidualGNN` whose blocks run under
    ``torch.utils.checkpoint``: each block keeps only its input and recomputes the rest
    in backward (the RNG state is restored, so dropout replays exactly)."""

    def __init__(self, model: ResidualGNN) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        m = self.model
        h = m.encoder(x)
        for block in m.blocks:
            h = h + checkpoint(block, h, edge_index, use_reentrant=False)
        return m.decoder(F.relu(m.norm(h)))


class DeepGCNResidualGNN(nn.Module):
    """The same model with PyG's ``DeepGCNLayer(block="res+", ckpt_grad=True)`` blocks,
    which compute ``x + conv(dropout(act(norm(x))))`` and checkpoint the conv only."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        from torch_geometric.nn import DeepGCNLayer

        self.encoder = nn.Linear(spec.in_channels, spec.width)
        self.blocks = nn.ModuleList(
            DeepGCNLayer(CONVS[spec.conv](spec.width), nn.LayerNorm(spec.width), nn.ReLU(),
                         block="res+", dropout=spec.dropout, ckpt_grad=True)
            for _ in range(spec.depth))
        self.norm = nn.LayerNorm(spec.width)
        self.decoder = nn.Linear(spec.width, spec.out_channels)

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        h = self.encoder(x)
        for block in self.blocks:
            h = block(h, edge_index)
        return self.decoder(F.relu(self.norm(h)))


# ----------------------------------------------------------------------------- GSR options


# GSRConfig options of the execution pipeline, on in gsr-full only.
_FULL_ONLY = ("plan_memory", "recompute_head")


def _gsr_config_fields() -> dict[str, Any]:
    from ..config import GSRConfig

    return {f.name: f for f in fields(GSRConfig)}


def gsr_options(name: str, spec: ModelSpec, on_cuda: bool = False) -> dict[str, Any] | None:
    """The ``gsr_compile`` options of a GSR baseline (None for the others).

    ``gsr-full`` turns on everything the installed ``GSRConfig`` offers: the group top-k,
    and the planned arena, the recomputed head and the Triton backend where those options exist
    (Triton on CUDA only: on CPU its kernels would run in the interpreter, so the option keeps
    its default). ``gsr-rev`` and ``gsr-sparse`` leave the arena and the recomputed head off,
    so that each step of the ladder shows what it adds.
    """
    known = _gsr_config_fields()
    if name in ("gsr-rev", "gsr-sparse"):
        options: dict[str, Any] = {"groups": spec.groups}
        if name == "gsr-sparse":
            options["sparse_k"] = spec.top_k
        for option in _FULL_ONLY:  # the execution pipeline belongs to gsr-full only
            if option in known:
                options[option] = False
        return options
    if name != "gsr-full":
        return None
    options = {"groups": spec.groups, "sparse_k": spec.top_k}
    for option in _FULL_ONLY:
        if option in known:
            options[option] = True
    if "backend" in known:
        from ..runtime.kernels._dispatch import HAS_TRITON

        default = known["backend"].default
        options["backend"] = "triton" if on_cuda and HAS_TRITON else default
    return options


def _on_cuda(inputs: tuple) -> bool:
    return any(isinstance(t, Tensor) and t.is_cuda for t in inputs)


# ----------------------------------------------------------------------------- builders


def build_plain(spec: ModelSpec, inputs: tuple) -> nn.Module:
    return spec.plain()


def build_checkpoint(spec: ModelSpec, inputs: tuple) -> nn.Module:
    return CheckpointedResidualGNN(spec.plain())


def build_deepgcn(spec: ModelSpec, inputs: tuple) -> nn.Module:
    return DeepGCNResidualGNN(spec)


def build_groupaddrev(spec: ModelSpec, inputs: tuple) -> nn.Module:
    from .group_add_rev import GroupAddRevGNN

    return GroupAddRevGNN(spec.in_channels, spec.width, spec.out_channels, spec.depth,
                          groups=spec.groups, dropout=spec.dropout, conv=spec.conv)


def build_torch_compile(spec: ModelSpec, inputs: tuple) -> nn.Module:
    import torch

    return torch.compile(spec.plain())  # compiles lazily, in the warm-up step


def _build_gsr(name: str, spec: ModelSpec, inputs: tuple) -> nn.Module:
    from ..api import gsr_compile

    model = spec.plain()
    if inputs:
        model = model.to(inputs[0].device)
    # example_inputs compiles now: parameters exist before the optimizer is made
    return gsr_compile(model, example_inputs=tuple(inputs),
                       **gsr_options(name, spec, _on_cuda(inputs)))


def build_gsr_rev(spec: ModelSpec, inputs: tuple) -> nn.Module:
    return _build_gsr("gsr-rev", spec, inputs)


def build_gsr_sparse(spec: ModelSpec, inputs: tuple) -> nn.Module:
    return _build_gsr("gsr-sparse", spec, inputs)


def build_gsr_full(spec: ModelSpec, inputs: tuple) -> nn.Module:
    return _build_gsr("gsr-full", spec, inputs)


BASELINES: dict[str, Baseline] = {b.name: b for b in (
    Baseline("plain", "plain residual model (eager)", build_plain),
    Baseline("checkpoint", "plain model, torch.utils.checkpoint per block", build_checkpoint, True),
    Baseline("deepgcn", "PyG DeepGCNLayer(block='res+', ckpt_grad=True)", build_deepgcn, True),
    Baseline("groupaddrev", "grouped reversible, built by hand with PyG GroupAddRev",
             build_groupaddrev),
    Baseline("torch.compile", "torch.compile(plain model)", build_torch_compile, True),
    Baseline("gsr-rev", "GSR reversible only", build_gsr_rev),
    Baseline("gsr-sparse", "GSR reversible + group top-k", build_gsr_sparse),
    Baseline("gsr-full", "GSR full", build_gsr_full),
)}


def check_spec(spec: ModelSpec, baselines: list[str]) -> None:
    """Raises ``ValueError`` when the architecture cannot be built for these baselines."""
    if spec.conv not in CONVS:
        raise ValueError(f"unknown conv {spec.conv!r}; choose one of {', '.join(CONVS)}")
    grouped = [b for b in baselines if b == "groupaddrev" or b.startswith("gsr")]
    if grouped:
        if spec.groups < 2:
            raise ValueError(f"--groups {spec.groups}: grouped reversible blocks need at least 2 "
                             "groups")
        if spec.width % spec.groups:
            raise ValueError(f"width {spec.width} is not divisible by --groups {spec.groups} "
                             f"(needed by {', '.join(grouped)}): each group gets width/groups "
                             "channels")
    sparse = [b for b in baselines if b in ("gsr-sparse", "gsr-full")]
    if sparse and not 1 <= spec.top_k <= spec.group_width:
        raise ValueError(f"--sparse-k {spec.top_k} must be in 1..{spec.group_width} (the group "
                         f"width, width {spec.width} / groups {spec.groups}) for "
                         f"{', '.join(sparse)}")
    if spec.conv == "gat":
        widths = {spec.width} | ({spec.group_width} if grouped else set())
        if any(w % 4 for w in widths):
            raise ValueError(f"--conv gat uses 4 heads: widths {sorted(widths)} must be "
                             "multiples of 4")
