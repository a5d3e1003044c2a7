"""``gsr bench`` end to end at a tiny size: Markdown, JSON and PNGs written, atomically,
with the machine and versions, and a failing baseline kept in the table."""
from __future__ import annotations

import json

import pytest

from gsr_compiler.bench import baselines as baselines_module
from gsr_compiler.cli import main as gsr_main

from .failing import BROKEN

TINY = ["--quick", "--no-progress", "--width", "8", "--depths", "1,2", "--circuit", "c432",
        "--widths", "8,16", "--width-depth", "1", "--circuits", "c17,c432", "--size-depth", "1",
        "--quality-depths", "1,2", "--quality-steps", "2", "--batch-nodes", "200",
        "--train", "c432,c880", "--test", "c499", "--timing-steps", "1", "--threads", "1"]


def test_writes_markdown_json_and_plots(tmp_path, monkeypatch, capsys):
    # a baseline that fails is part of the run: it must show up as failed, not vanish
    monkeypatch.setitem(baselines_module.BASELINES, "broken", BROKEN)
    out = tmp_path / "bench"
    assert gsr_main(["bench", *TINY, "--out", str(out), "--baselines", "plain,gsr-rev,broken",
                     "--quality-baselines", "plain,gsr-rev,broken"]) == 0
    names = {p.name for p in out.iterdir()}
    assert names == {"results.md", "results.json", "memory_vs_depth.png", "time_vs_depth.png",
                     "memory_vs_width.png", "memory_vs_nodes.png", "quality_vs_depth.png"}
    for name in names:
        if name.endswith(".png"):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    results = json.loads((out / "results.json").read_text())
    assert results["complete"] is True
    machine = results["machine"]
    for key in ("cpu", "torch", "torch_geometric", "triton", "python", "logical_cpus"):
        assert key in machine
    assert set(results["sweeps"]) == {"depth", "width", "size", "quality"}
    depth_rows = results["sweeps"]["depth"]["rows"]
    assert [(r["point"], r["baseline"], r["outcome"]["status"]) for r in depth_rows] == [
        ("depth 1", "plain", "ok"), ("depth 1", "gsr-rev", "ok"), ("depth 1", "broken", "failed"),
        ("depth 2", "plain", "ok"), ("depth 2", "gsr-rev", "ok"),
        ("depth 2", "broken", "not run")]
    quality = results["sweeps"]["quality"]["rows"]
    for row in quality:
        if row["baseline"] != "broken":
            assert -1 <= row["outcome"]["quality"]["kendall"] <= 1
    size_rows = results["sweeps"]["size"]["rows"]
    assert [r["workload"]["name"] for r in size_rows[::3]] == ["c17", "c432"]

    text = (out / "results.md").read_text()
    assert f"torch {machine['torch']}" in text and machine["cpu"] in text
    for title in ("## Depth sweep", "## Width sweep", "## Circuit size sweep",
                  "## Quality after a fixed number of steps", "## Plots"):
        assert title in text
    assert "| 1 | `broken` | **failed**: exception" in text
    assert "this baseline is broken on purpose" in text
    assert "![memory vs depth](memory_vs_depth.png)" in text
    assert "gsr bench --quick" in text  # the command that reproduces it
    assert "finished in" in capsys.readouterr().out


@pytest.mark.parametrize("argv, words", [
    (["--baselines", "plain,eager"], "unknown 'eager'"),
    (["--depths", "8,x"], "comma-separated integers"),
    (["--depths", "0,8"], "--depths must be an integer >= 1"),
    (["--sweeps", "depth,speed"], "unknown 'speed'"),
    (["--width", "9"], "not divisible by --groups 2"),
    (["--sparse-k", "9"], "--sparse-k 9 must be in 1..4"),
    (["--groups", "1"], "at least 2 groups"),
    (["--circuit", "c4320"], "c432"),
    (["--circuits", "c17,nope.v"], "not found"),
    (["--test", "c432"], "both --train and --test"),
    (["--label", "delay"], "unknown --label"),
    (["--device", "cuda:99"], "--device cuda:99"),
    (["--device", "tpu"], "cpu or cuda"),
    (["--time-budget", "-1"], "--time-budget must be a positive number"),
    (["--memory-budget", "0"], "--memory-budget must be a positive number"),
    (["--dropout", "1.5"], "--dropout"),
    (["--cone-nodes", "-5"], "--cone-nodes"),
], ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_bad_options_exit_2_and_write_nothing(tmp_path, capsys, argv, words):
    out = tmp_path / "bench"
    assert gsr_main(["bench", *TINY, "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert "gsr bench: error:" in err and words in err, err
    assert not out.exists()


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    out = tmp_path / "results.md"
    out.write_text("mine")
    assert gsr_main(["bench", *TINY, "--out", str(out)]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert out.read_text() == "mine"
