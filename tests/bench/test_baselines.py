"""Every baseline builds and runs a training step at a tiny size, in a fresh process."""
from __future__ import annotations

import math
from dataclasses import fields

import pytest
import torch

from gsr_compiler.bench.baselines import (BASELINES, CheckpointedResidualGNN, DeepGCNResidualGNN,
                                          ModelSpec, gsr_options)
from gsr_compiler.bench.harness import Budget, measure_configuration
from gsr_compiler.config import GSRConfig

from .failing import TINY_SPEC


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.slow) if n == "torch.compile" else n for n in BASELINES])
def test_each_baseline_measures_one_step(name, tiny_workload):
    outcome = measure_configuration(BASELINES[name], TINY_SPEC, tiny_workload, timing_steps=1,
                                    budget=Budget(seconds=300, memory_bytes=4 << 30), threads=1)
    assert outcome.status == "ok", outcome.reason
    m = outcome.measurement
    assert m["saved_bytes"] > 0
    assert math.isfinite(m["step_seconds"]) and m["step_seconds"] > 0
    assert m["parameters"] > 0
    assert m["peak_rss"] > 0 and m["rss_rise"] is not None
    assert m["peak_rss_fixed"] > 0 and m["rss_rise_fixed"] is not None, outcome.notes


def _plain_and(cls, seed=0):
    torch.manual_seed(seed)
    spec = ModelSpec(in_channels=16, width=8, depth=3)
    plain = spec.plain()
    other = cls(plain) if cls is CheckpointedResidualGNN else cls(spec)
    if cls is DeepGCNResidualGNN:  # same parameter names: blocks.i.norm / blocks.i.conv
        other.load_state_dict(plain.state_dict())
    return plain, other


@pytest.mark.parametrize("cls", [CheckpointedResidualGNN, DeepGCNResidualGNN])
def test_same_function_as_plain(cls, tiny_workload):
    """checkpoint and deepgcn claim the plain model's function: outputs and gradients agree."""
    plain, other = _plain_and(cls)
    x, edge_index = tiny_workload.inputs
    for model in (plain, other):
        model.train()
        torch.manual_seed(1)  # the same dropout masks
        model(x, edge_index).square().mean().backward()
    torch.manual_seed(1)
    plain.eval(), other.eval()
    assert torch.allclose(plain(x, edge_index), other(x, edge_index), atol=1e-6)
    grads = {n: p.grad for n, p in plain.named_parameters()}
    for n, p in other.named_parameters():
        assert torch.allclose(p.grad, grads[n.removeprefix("model.")], atol=1e-5), n


def test_gsr_ladder_options():
    spec = ModelSpec(in_channels=16, width=64, depth=4)
    assert spec.top_k == 4  # g/8 of the group width 32
    full = gsr_options("gsr-full", spec)
    assert full["sparse_k"] == 4 and full["groups"] == 2
    known = {f.name for f in fields(GSRConfig)}
    for name in ("plan_memory", "backend"):
        assert (name in full) == (name in known)
        described = BASELINES["gsr-full"].describe(spec)
        assert (name in described)
    if "plan_memory" in known:
        assert full["plan_memory"] is True
        assert gsr_options("gsr-rev", spec)["plan_memory"] is False
    assert "sparse_k" not in gsr_options("gsr-rev", spec)
    assert gsr_options("gsr-sparse", ModelSpec(16, 64, 4, sparse_k=7))["sparse_k"] == 7
    assert gsr_options("plain", spec) is None
    GSRConfig(**full)  # a valid configuration


def test_cli_help_lists_every_baseline(capsys):
    from gsr_compiler.cli import main

    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines at hyphens
    for name in BASELINES:
        assert name in text
