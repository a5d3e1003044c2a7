"""The corpus: which models there are, how to build them, and what each should do.

Each module in ``models/`` is one deep GNN from public code (its docstring names the source),
with ``make_model(depth, width)`` and ``make_inputs(dtype)``.
"""
from __future__ import annotations

import importlib
from types import ModuleType

import torch
from torch import Tensor, nn
from torch_geometric.data import Data

DEPTH = 16
WIDTH = 32

# What each model does once issue 16 is done: "converts" (a reversible chain replaces its
# residual blocks) or "unchanged" (nothing to convert; explain() says why).
EXPECTED = {
    "deepgcn_proteins": "converts",   # DeepGCNLayer res+ chain (GENConv with edge_attr)
    "rev_gnn": "unchanged",           # already GroupAddRev: left as it is, with a reason
    "graph_gps": "converts",          # the residuals inside each GPSConv (its MPNN and MLP)
    "gcn2_cora": "unchanged",         # x = relu(conv(x, x_0)): no identity residual
    "gcn2_ppi": "converts",           # x = relu(h + x): one-block chains between the ReLUs
    "egc": "converts",                # x = x + relu(norm(EGConv(x))): two-stream coupling
    "mem_pool": "converts",           # DeepGCNLayer(GATConv) res+ chain before MemPooling
    "pcqm4m_gin": "converts",         # h += h_list[layer], user GINConv: two-stream coupling
    "resgen_arxiv": "converts",       # res+ chain of the authors' GENConv, checkpointed blocks
    "resgen_molhiv": "converts",      # res+ chain of GENConv encoding edge_attr itself
    "deepgcn_ppi": "unchanged",       # every block output feeds the fusion concat
}
CORPUS = list(EXPECTED)


def load(name: str) -> ModuleType:
    return importlib.import_module(f"{__package__}.models.{name}")


def build(name: str, seed: int = 0, depth: int = DEPTH, width: int = WIDTH,
          dtype: torch.dtype = torch.float32) -> tuple[nn.Module, tuple]:
    """The model, seeded, in training mode, and its inputs, both in ``dtype``."""
    module = load(name)
    torch.manual_seed(seed)
    model = module.make_model(depth, width).to(dtype)
    return model.train(), module.make_inputs(dtype)


def float_tensors(output) -> list[Tensor]:
    items = output if isinstance(output, (tuple, list)) else (output,)
    return [t for t in items if isinstance(t, Tensor) and t.is_floating_point()]


def scalar_loss(output) -> Tensor:
    """A loss reaching every floating-point output (tuple outputs included)."""
    return sum(t.square().mean() for t in float_tensors(output))


def float_inputs(inputs: tuple) -> list[Tensor]:
    out = []
    for v in inputs:
        if isinstance(v, Data):
            out += [t for _, t in v if isinstance(t, Tensor) and t.is_floating_point()]
        elif isinstance(v, Tensor) and v.is_floating_point():
            out.append(v)
    return out
