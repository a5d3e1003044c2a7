"""`gsr train` end to end at a tiny size: outputs, exact resume, clear errors that write nothing."""
from __future__ import annotations

import json
import os
import stat
import tempfile

import numpy as np
import pytest
import torch

from gsr_compiler.cli import main as gsr_main

TINY = ["--train", "c432,c880", "--val", "c17", "--test", "c432g,c499", "--depth", "4",
        "--width", "8", "--batch-nodes", "400", "--no-progress"]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    # one cache for the whole folder (each circuit parsed once), never the user's
    cache = tmp_path_factory.getbasetemp() / "train_cache"
    monkeypatch.setenv("GSR_CACHE_DIR", str(cache))


def run(*argv: str) -> int:
    return gsr_main(["train", *TINY, *argv])


@pytest.mark.parametrize("mode", [["--gsr"], ["--gsr", "--sparse-k", "0"], [],
                                  ["--full-graphs", "--label", "prob"]],
                         ids=["gsr", "gsr-dense", "plain", "plain-full-graphs-prob"])
def test_writes_metrics_scatter_and_checkpoint(tmp_path, mode, capsys):
    out = tmp_path / "run"
    assert run("--steps", "3", "--eval-every", "2", "--out", str(out), *mode) == 0
    assert {p.name for p in out.iterdir()} == {"checkpoint.pt", "metrics.json", "scatter.png"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["test"]["per_circuit"]) == {"c432g", "c499"}
    for m in [*metrics["test"]["per_circuit"].values(), metrics["test"]["average"]]:
        for key in ("pearson", "spearman", "kendall", "r2", "mae"):
            assert isinstance(m[key], float), key
    assert metrics["config"]["gsr"] is ("--gsr" in mode)
    # --gsr defaults to the group top-k with half of each group (width 8 / 2 groups / 2)
    assert metrics["config"]["sparse_k"] == ((None if "0" in mode else 2) if "--gsr" in mode
                                             else None)
    assert [row["step"] for row in metrics["val_history"]] == [2, 3]
    assert "val" in metrics["val_history"][0]
    assert (out / "scatter.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "average" in printed
    # a compiled run says what its last backward recorded and measured
    assert ("exactness of the last backward" in printed) is ("--gsr" in mode)


def _state(out):
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    return ckpt["step"], ckpt["model"], ckpt["optimizer"]["state"]


@pytest.mark.parametrize("mode", [["--gsr"], []], ids=["gsr", "plain"])
def test_resume_matches_an_uninterrupted_run(tmp_path, mode):
    # dropout on, so the random stream must be restored too; validation in between
    common = ["--dropout", "0.2", "--eval-every", "2", "--seed", "3", *mode]
    other_seed = ["--dropout", "0.2", "--eval-every", "2", "--seed", "4", *mode]
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert run("--steps", "6", "--out", str(whole), *common) == 0
    assert run("--steps", "3", "--out", str(part), *common) == 0
    assert run("--steps", "6", "--out", str(part), "--resume", *common) == 0
    step_a, model_a, opt_a = _state(whole)
    step_b, model_b, opt_b = _state(part)
    assert step_a == step_b == 6
    assert model_a.keys() == model_b.keys()
    for name in model_a:
        assert torch.equal(model_a[name], model_b[name]), name
    for k in opt_a:
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt_a[k][key], opt_b[k][key])
    # (and the comparison can fail: another seed gives other parameters)
    other = tmp_path / "other"
    assert run("--steps", "6", "--out", str(other), *other_seed) == 0
    _, model_c, _ = _state(other)
    assert any(not torch.equal(model_a[k], model_c[k]) for k in model_a)


BAD = {
    "unknown conv": (["--conv", "sagee"], "sagee"),
    "zero depth": (["--depth", "0"], "--depth"),
    "width not divisible by groups": (["--gsr", "--width", "9"], "divisible"),
    "one group": (["--gsr", "--groups", "1"], "groups"),
    "negative lr": (["--lr", "-1"], "--lr"),
    "sparse-k without gsr": (["--sparse-k", "2"], "--gsr"),
    "sparse-k above the group width": (["--gsr", "--sparse-k", "5"], "1..4"),
    "unknown circuit": (["--test", "c4320"], "c432"),
    "train and test overlap": (["--test", "c432"], "both"),
    "missing checkpoint": (["--resume"], "no checkpoint"),
}


@pytest.mark.parametrize("argv, message", BAD.values(), ids=BAD.keys())
def test_bad_option_errors_and_writes_nothing(tmp_path, argv, message, capsys):
    out = tmp_path / "run"
    assert run("--steps", "2", "--out", str(out), *argv) == 2
    err = capsys.readouterr().err
    assert "error" in err and message in err
    assert not out.exists()


def test_empty_netlist_is_a_clear_error(tmp_path, capsys):
    empty = tmp_path / "empty.bench"
    empty.write_text("")
    out = tmp_path / "run"
    assert run("--steps", "2", "--out", str(out), "--val", str(empty)) == 2
    err = capsys.readouterr().err
    assert f"error: {empty}: circuit 'empty' has no gates" in err
    assert not out.exists()


def test_cuda_unavailable_is_a_clear_error(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    out = tmp_path / "run"
    assert run("--steps", "2", "--out", str(out), "--device", "cuda") == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert not out.exists()


def test_unknown_label_is_rejected_by_the_parser(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run("--label", "delay", "--out", str(tmp_path / "run"))
    assert "delay" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_used_folder_needs_resume_or_overwrite_and_resume_checks_options(tmp_path, capsys):
    out = tmp_path / "run"
    assert run("--steps", "2", "--out", str(out)) == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    assert run("--steps", "2", "--out", str(out)) == 2
    assert "--resume" in capsys.readouterr().err
    assert run("--steps", "4", "--out", str(out), "--resume", "--width", "16") == 2
    assert "width" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_outputs_follow_the_umask(tmp_path):
    out = tmp_path / "run"
    old = os.umask(0o027)
    try:
        assert run("--steps", "1", "--out", str(out)) == 0
        with open(tmp_path / "plain", "w"):  # what a normal open() makes under this umask
            pass
    finally:
        os.umask(old)
    expected = stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    for name in ("checkpoint.pt", "metrics.json", "scatter.png"):
        assert stat.S_IMODE((out / name).stat().st_mode) == expected, name


def test_partial_files_of_an_interrupted_write_are_removed_at_the_next_start(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    # what a write killed before its os.replace leaves: _atomic_write's mkstemp names
    partials = []
    for name in ("checkpoint.pt", "metrics.json", "scatter.png"):
        fd, partial = tempfile.mkstemp(dir=out, prefix=f".{name}.",
                                       suffix=os.path.splitext(name)[1])
        os.close(fd)
        partials.append(os.path.basename(partial))
    others = [".checkpoint.pt.notes", "checkpoint.pt.bak", ".checkpoint.pt.abc.pt", ".data.pt"]
    for name in others:
        (out / name).write_text("not ours")
    assert run("--steps", "1", "--out", str(out)) == 0
    assert {p.name for p in out.iterdir()} == {"checkpoint.pt", "metrics.json", "scatter.png",
                                               *others}
    log = capsys.readouterr().out
    assert all(partial in log for partial in partials)


def _unwritable_folder(tmp_path) -> str:
    """An existing folder in which creating a file fails (root ignores a folder's mode, but
    procfs refuses new files to everyone)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    for folder in (str(locked), "/proc/self"):
        try:
            fd, probe = tempfile.mkstemp(dir=folder)
        except OSError:
            return folder
        os.close(fd)
        os.unlink(probe)
    pytest.skip("no folder here refuses new files")


@pytest.mark.parametrize("where", ["folder under a file", "unwritable folder"])
def test_out_that_cannot_be_written_stops_before_loading_circuits(tmp_path, where, monkeypatch,
                                                                   capsys):
    if where == "folder under a file":
        (tmp_path / "file").write_text("")
        out = str(tmp_path / "file" / "run")
    else:
        out = _unwritable_folder(tmp_path)
    import gsr_compiler.circuits

    def load_circuit(*args, **kwargs):
        raise AssertionError("circuits were loaded before --out was found unwritable")

    monkeypatch.setattr(gsr_compiler.circuits, "load_circuit", load_circuit)
    assert run("--steps", "2", "--out", out) == 2
    assert f"--out {out} cannot be written" in capsys.readouterr().err


class _RunsCode:
    def __reduce__(self):  # unpickling this calls print: what weights_only=True must refuse
        return print, ("unpickling ran code",)


def _without(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


# a checkpoint that is not usable -> (its content from a good checkpoint, what the error says)
UNUSABLE = {
    "truncated": (lambda good, raw: raw[: len(raw) // 2], "truncated"),
    "garbage": (lambda good, raw: np.random.default_rng(0).bytes(4096), "not a torch.save"),
    "empty": (lambda good, raw: b"", "empty"),
    "json": (lambda good, raw: b'{"step": 2}\n', "not a torch.save"),
    "no config": (lambda good, raw: _without(good, "config"), "lacks 'config'"),
    "a list": (lambda good, raw: [good], "holds a list"),
    "code in it": (lambda good, raw: {**good, "extra": _RunsCode()}, "more than tensors"),
    "step not a number": (lambda good, raw: {**good, "step": "2"}, "'step' is not an integer"),
    "rng not a tensor": (lambda good, raw: {**good, "rng": {"torch": [1, 2]}}, "'rng'"),
    "model without a parameter": (lambda good, raw: {**good, "model": _without(
        good["model"], next(iter(good["model"])))}, "does not fit this model"),
}


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GSR_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "train_cache"))
        out = tmp_path_factory.mktemp("good")
        assert run("--steps", "2", "--out", str(out)) == 0
    return out / "checkpoint.pt"


@pytest.mark.parametrize("make, message", UNUSABLE.values(), ids=UNUSABLE.keys())
def test_unusable_checkpoint_is_a_clear_error_and_changes_nothing(tmp_path, good_checkpoint,
                                                                   make, message, capsys):
    raw = good_checkpoint.read_bytes()
    content = make(torch.load(good_checkpoint, weights_only=True), raw)
    out = tmp_path / "run"
    out.mkdir()
    path = out / "checkpoint.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    before = path.read_bytes()
    capsys.readouterr()
    assert run("--steps", "3", "--out", str(out), "--resume") == 2
    captured = capsys.readouterr()
    assert f"--resume {path}: " in captured.err and message in captured.err
    assert "not a usable gsr train checkpoint" in captured.err
    assert "unpickling ran code" not in captured.out
    assert [p.name for p in out.iterdir()] == ["checkpoint.pt"]
    assert path.read_bytes() == before
