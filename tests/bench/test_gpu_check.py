"""benchmarks/gpu_check.py runs between rare GPU windows: its dry run (every step at tiny size,
on the CPU) keeps it from rotting in the meantime."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.py")


def test_dry_run_runs_every_step(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, SCRIPT, "--out", str(tmp_path), "--dry-run"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    steps = results["steps"]
    assert list(steps) == ["env", "tests", "exactness", "kernels", "training_steps"]
    assert {name: s["status"] for name, s in steps.items()} == dict.fromkeys(steps, "ok")
    # the CUDA tests are found (collected, not run, without a GPU)
    assert steps["tests"]["counts"]["collected"] >= 5
    assert all(v == "collected" for v in steps["tests"]["tests"].values())
    # the exactness step compared against storing everything, for both configurations
    for row in steps["exactness"]["results"].values():
        assert row["first_block"] < 1e-3 and row["input"] < 1e-3 and row["within_tolerance"]
    assert {r["kernel"] for r in steps["kernels"]["kernels"]} >= {
        "group_topk fwd + LN + dropout", "sparse_aggregate fwd"}
    rows = steps["training_steps"]["rows"]
    assert {r["model"] for r in rows} == {"plain", "groupaddrev", "gsr-rev", "gsr-full"}
    assert all(r["status"] == "ok" and r["step_ms"] > 0 for r in rows)
    # the summary table is written and printed last
    table = (tmp_path / "results.md").read_text()
    assert "DRY RUN" in table and "| 4 | gsr-full | ok |" in table
    assert done.stdout.rstrip().endswith(table.rstrip().splitlines()[-1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_without_a_gpu_it_refuses_and_says_how_to_check_the_script(tmp_path):
    done = subprocess.run([sys.executable, SCRIPT, "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--dry-run" in done.stdout
    assert not (tmp_path / "out").exists()  # nothing written
