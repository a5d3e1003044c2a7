"""Gradient fuzz: random deep residual GNNs, compiled, against the same architecture storing
everything (tests/core/reference.py), in float64 and float32.

Each case draws the layer type, width, groups, depth, norm (pre, post or none), activation,
dropout, side inputs (edge features, edge weights), ``sparse_k`` and ``plan_memory`` from its
seed, so a failure names a reproducible model. CI runs ``GSR_FUZZ_EXAMPLES`` cases (default
32); a longer run: ``GSR_FUZZ_EXAMPLES=1000 python -m pytest tests/core/test_gradient_fuzz.py``.
"""
import os
import random
import warnings

import pytest
import torch
import torch.nn.functional as F
import torch_geometric.nn as pyg
from torch import nn

from gsr_compiler import gsr_compile
from gsr_compiler.errors import GSRPrecisionWarning
from gsr_compiler.passes.check_chain_precision import MIN_NORM_CHANNELS

from .reference import reference_copy

EXAMPLES = int(os.environ.get("GSR_FUZZ_EXAMPLES", "32"))
# float32: half the default drift tolerance, what anchors keep the predicted rebuild error under
TOLERANCE = {torch.float64: 1e-9, torch.float32: 5e-4}
ACTIVATIONS = {"relu": F.relu, "leaky_relu": lambda h: F.leaky_relu(h, 0.1), "gelu": F.gelu,
               "tanh": torch.tanh}
LAYERS = ("linear", "sage", "gcn", "graphconv", "gin", "gat", "gine", "gcn_weighted")


class FuzzBranch(nn.Module):
    def __init__(self, case):
        super().__init__()
        d, self.case = case["width"], case
        kind = case["layer"]
        mlp = lambda: nn.Sequential(nn.Linear(d, 2 * d), nn.LeakyReLU(0.2), nn.Linear(2 * d, d))  # noqa: E731
        self.layer = {
            "linear": lambda: nn.Linear(d, d),
            "sage": lambda: pyg.SAGEConv(d, d),
            "gcn": lambda: pyg.GCNConv(d, d),
            "graphconv": lambda: pyg.GraphConv(d, d, aggr="mean"),
            "gin": lambda: pyg.GINConv(mlp(), train_eps=True),
            "gat": lambda: pyg.GATConv(d, d // 2, heads=2),
            "gine": lambda: pyg.GINEConv(mlp(), edge_dim=3),
            "gcn_weighted": lambda: pyg.GCNConv(d, d),
        }[kind]()
        self.norm = {"layer": lambda: nn.LayerNorm(d), "batch": lambda: nn.BatchNorm1d(d),
                     "none": lambda: None}[case["norm"]]()

    def forward(self, h, edge_index, edge_attr, edge_weight):
        case, act = self.case, ACTIVATIONS[self.case["activation"]]

        def layer(t):
            kind = case["layer"]
            if kind == "linear":
                return self.layer(t)
            if kind == "gine":
                return self.layer(t, edge_index, edge_attr)
            if kind == "gcn_weighted":
                return self.layer(t, edge_index, edge_weight)
            return self.layer(t, edge_index)

        norm = self.norm if self.norm is not None else (lambda t: t)
        if case["pre_norm"]:
            h = F.dropout(act(norm(h)), p=case["dropout"], training=self.training)
            return layer(h)
        return F.dropout(act(norm(layer(h))), p=case["dropout"], training=self.training)


class FuzzModel(nn.Module):
    def __init__(self, case):
        super().__init__()
        self.encoder = nn.Linear(5, case["width"])
        self.blocks = nn.ModuleList(FuzzBranch(case) for _ in range(case["depth"]))
        self.decoder = nn.Linear(case["width"], 2)

    def forward(self, x, edge_index, edge_attr, edge_weight):
        h = self.encoder(x)
        for block in self.blocks:
            h = h + block(h, edge_index, edge_attr, edge_weight)
        return self.decoder(h)


def draw_case(seed):
    rng = random.Random(seed)
    width = rng.choice([8, 16, 32])
    groups = rng.choice([g for g in (2, 4) if width // g >= 4])
    activation = rng.choice(list(ACTIVATIONS))
    g = width // groups
    case = {
        "seed": seed, "width": width, "groups": groups, "depth": rng.randint(2, 10),
        "layer": rng.choice(LAYERS), "norm": rng.choice(["layer", "batch", "none"]),
        "pre_norm": rng.random() < 0.5, "activation": activation,
        "dropout": rng.choice([0.0, 0.2]), "plan_memory": rng.random() < 0.5,
        "dtype": rng.choice([torch.float64, torch.float32]),
        # the top-k replaces ReLUs only; elsewhere sparse_k leaves the branch dense
        "sparse_k": rng.choice([None, rng.randint(1, g)]) if activation == "relu" else None,
    }
    if case["layer"] == "gat":  # heads split the width: keep the narrowed width even
        case["groups"] = 2
    return case


def one_step(module, inputs, target):
    torch.manual_seed(11)
    module.zero_grad(set_to_none=True)
    leaf = inputs[0].clone().requires_grad_()
    out = module(leaf, *inputs[1:])
    ((out - target) ** 2).mean().backward()
    grads = {n.removeprefix("compiled."): p.grad for n, p in module.named_parameters()
             if p.grad is not None}
    grads["input"] = leaf.grad
    return out.detach(), grads


@pytest.mark.parametrize("seed", range(EXAMPLES))
def test_random_model_matches_store_everything(seed):
    case = draw_case(seed)
    dtype = case["dtype"]
    torch.manual_seed(seed)
    model = FuzzModel(case).to(dtype)
    g = torch.Generator().manual_seed(seed)
    n, e = 40, 120
    x = torch.randn(n, 5, generator=g, dtype=dtype)
    edge_index = torch.randint(0, n, (2, e), generator=g)
    edge_attr = torch.randn(e, 3, generator=g, dtype=dtype)
    edge_weight = torch.rand(e, generator=g, dtype=dtype) + 0.5
    target = torch.randn(n, 2, generator=g, dtype=dtype)
    inputs = (x, edge_index, edge_attr, edge_weight)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GSRPrecisionWarning)  # narrow norms are drawn too
        gsr = gsr_compile(model, example_inputs=inputs, groups=case["groups"],
                          sparse_k=case["sparse_k"], plan_memory=case["plan_memory"])
        assert gsr.report.chains, f"{case}: nothing converted\n{gsr.explain()}"
        ref = reference_copy(gsr)
        out, grads = one_step(gsr, inputs, target)
        ref_out, ref_grads = one_step(ref, inputs, target)
    tol = TOLERANCE[dtype]
    if case["norm"] == "layer" and case["width"] // case["groups"] < MIN_NORM_CHANNELS:
        tol *= 10  # an ill-conditioned narrow LayerNorm, warned about at compile time
    if any(n.meta.get("gsr_unreplayed") for n in gsr.graph_module.graph.nodes):
        tol *= 10  # a choice inside a layer's own code (GAT's LeakyReLU), listed by explain()
    torch.testing.assert_close(out, ref_out, rtol=tol, atol=tol, msg=lambda m: f"{case}: {m}")
    assert grads.keys() == ref_grads.keys(), case
    scale = max(float(r.abs().max()) for r in ref_grads.values())
    for name, ref_grad in ref_grads.items():
        err = float((grads[name] - ref_grad).abs().max())
        assert err <= tol * (float(ref_grad.abs().max()) + 1e-2 * scale), \
            f"{case}: gradient of {name} off by {err:.2e} (largest {float(ref_grad.abs().max()):.2e})"
