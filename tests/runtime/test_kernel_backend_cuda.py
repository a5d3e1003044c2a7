"""On a CUDA device: compiled models with backend="auto" (the compiled Triton kernels) against
backend="torch", forward and every gradient.

The test session imports triton in interpreter mode (tests/conftest.py), which cannot run
compiled kernels, so the comparison runs in a subprocess without ``TRITON_INTERPRET``. Models
whose other ops are deterministic on CUDA (Linear, LayerNorm, top-k, the compressed Linear; no
message passing, whose scatter is not) must agree bit for bit where no kernel computes in its own
order; the GIN model, whose compressed
aggregation the kernel runs, and the sparse MLP, whose LayerNorm the fused LayerNorm + top-k
kernel computes, to float tolerance. Skipped without CUDA.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton", reason="triton is not importable")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SCRIPT = r"""
import copy, json, sys
from collections import Counter

import torch
from torch import nn

from gsr_compiler import gsr_compile
from gsr_compiler.runtime.kernels import _dispatch
from residual_models import GINResidual

device, backend = sys.argv[1], sys.argv[2]
nodes = int(sys.argv[3]) if len(sys.argv) > 3 else 1001
launches = Counter()
launch = _dispatch.LazyKernel.__getitem__
def counting(self, grid):
    launches[self.__name__] += 1
    return launch(self, grid)
_dispatch.LazyKernel.__getitem__ = counting


class MLPResidual(nn.Module):
    def __init__(self, width, depth):
        super().__init__()
        self.encoder = nn.Linear(5, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.ReLU(), nn.Dropout(0.2), nn.Linear(width, width))
            for _ in range(depth))
        self.decoder = nn.Linear(width, 3)

    def forward(self, x, edge_index):
        h = self.encoder(x)
        for block in self.blocks:
            h = h + block(h)
        return self.decoder(h)


def step(model, inputs, seed):
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    out = model(*inputs)
    (out.square().mean() + out.sum()).backward()
    return [out.detach()] + [p.grad.clone() for p in model.parameters()]


g = torch.Generator().manual_seed(0)
results = {}
for name, make, groups, options in [
        ("mlp-G2", lambda: MLPResidual(96, 3), 2, {}),
        ("mlp-G3", lambda: MLPResidual(96, 3), 3, {}),
        ("mlp-G2-sparse", lambda: MLPResidual(96, 3), 2, {"sparse_k": 4, "sparse_group": 16}),
        ("gin-G2-sparse", lambda: GINResidual(64, 3), 2, {"sparse_k": 4, "sparse_group": 16})]:
    for plan_memory in (True, False):
        x = torch.randn(nodes, 5, generator=g).to(device)
        edge_index = torch.randint(0, nodes, (2, 4 * nodes), generator=g).to(device)
        torch.manual_seed(0)
        model = make().to(device)
        ref = gsr_compile(copy.deepcopy(model), example_inputs=(x, edge_index), groups=groups,
                          plan_memory=plan_memory, backend="torch", **options)
        run = gsr_compile(copy.deepcopy(model), example_inputs=(x, edge_index), groups=groups,
                          plan_memory=plan_memory, backend=backend, **options)
        run.load_state_dict(ref.state_dict())
        launches.clear()
        a = step(ref, (x, edge_index), 1)
        torch_launches = sum(launches.values())
        b = step(run, (x, edge_index), 1)
        results[f"{name}-{'arena' if plan_memory else 'fresh'}"] = {
            "equal": all(torch.equal(u, v) for u, v in zip(a, b)),
            "max_rel": max(float(((u - v).abs().max() / v.abs().max().clamp(min=1e-30)))
                           for u, v in zip(a, b)),
            "torch_launches": torch_launches,
            "launches": dict(launches),
            "explain": [l for l in run.explain().splitlines() if l.startswith("kernels:")],
        }
print("RESULTS" + json.dumps(results))
"""


def test_auto_backend_on_cuda_equals_torch():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # the shared test models (residual_models.py) sit beside this file
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(__file__),
                                                      env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", SCRIPT, "cuda", "auto"], capture_output=True,
                          text=True, env=env, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS")]
    assert lines, f"subprocess failed:\n{proc.stdout}\n{proc.stderr}"
    results = json.loads(lines[-1][len("RESULTS"):])
    for case, r in results.items():
        assert r["torch_launches"] == 0, case
        assert r["launches"].get("_coupling_kernel", 0) > 0, (case, r)
        assert r["explain"] and r["explain"][0].startswith("kernels: triton"), (case, r)
        if "sparse" in case:
            assert r["launches"].get("_group_topk_fwd_kernel", 0) > 0, (case, r)
        if case.startswith("gin"):
            assert r["launches"].get("_sparse_aggregate_fwd_kernel", 0) > 0, (case, r)
        if "sparse" in case:  # the kernels normalize or aggregate in float32, in their own order
            assert r["max_rel"] < 1e-4, (case, r)
        else:
            assert r["equal"], (case, r)
