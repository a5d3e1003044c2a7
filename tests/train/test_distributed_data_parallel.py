"""Data-parallel `gsr train` on 2 gloo ranks (CPU): same parameters on every rank and as one
process running every rank's batch, exact resume, a dead rank stops the others, bad input."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp

from gsr_compiler.cli import main as gsr_main
from gsr_compiler.train import TrainConfig

TINY = ["--train", "c432,c880", "--val", "c17", "--test", "c432g,c499", "--depth", "3",
        "--width", "16", "--batch-nodes", "400", "--no-progress"]
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    # one cache for the whole folder, never the user's; ranks inherit it
    cache = tmp_path_factory.getbasetemp() / "train_cache"
    monkeypatch.setenv("GSR_CACHE_DIR", str(cache))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(out, **kw) -> TrainConfig:
    base = dict(train=["c432", "c880"], val=["c17"], test=["c432g"], depth=3, width=16,
                batch_nodes=400, steps=3, eval_every=2, seed=5, lr=1e-2, out=str(out),
                progress=False)
    base.update(kw)
    return TrainConfig(**base)


# ----------------------------------------------------------------------------- equivalence


def _rank(rank: int, world: int, port: int, cfg: TrainConfig, result_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from gsr_compiler.distributed.data_parallel import train_data_parallel

    result = train_data_parallel(cfg, log=lambda _: None, timeout=120, dtype=torch.float64)
    params = {n: p.detach().clone() for n, p in result.model.named_parameters()}
    torch.save(params, os.path.join(result_dir, f"rank{rank}.pt"))
    torch.save(result.model.state_dict(), os.path.join(result_dir, f"state{rank}.pt"))


def _single_process_union(cfg: TrainConfig, world: int, ranks: list[int]) -> dict:
    """One process: each step, the batch of every rank in ``ranks`` with that rank's random
    stream, gradients averaged over ``world`` (what DDP all-reduces), then clip and Adam."""
    from gsr_compiler import gsr_compile
    from gsr_compiler.distributed.data_parallel import rank_seed
    from gsr_compiler.distributed.sampler import DistributedBatchSchedule
    from gsr_compiler.models import ResidualGNN
    from gsr_compiler.train import _load_circuits, validate_config

    cfg = validate_config(dataclasses.replace(cfg, overwrite=True))  # (the ranks' run is there)
    datas = _load_circuits(cfg.train, cfg, lambda _: None)
    schedule = DistributedBatchSchedule(datas, cfg, world)
    example = schedule(0, 0)
    torch.manual_seed(cfg.seed)
    model = ResidualGNN(datas[0].x.shape[1], cfg.width, 1, cfg.depth, conv=cfg.conv,
                        dropout=cfg.dropout).double()
    if cfg.gsr:
        model = gsr_compile(model, groups=cfg.groups, sparse_k=cfg.sparse_k,
                            example_inputs=(example.x.double(), example.edge_index))
    params = list(model.parameters())
    optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    streams = {}
    for r in ranks:
        torch.manual_seed(rank_seed(cfg.seed, r))
        streams[r] = torch.get_rng_state()
    model.train()
    for step in range(cfg.steps):
        total = [torch.zeros_like(p) for p in params]
        for r in ranks:
            torch.set_rng_state(streams[r])
            b = schedule(step, r)
            pred = model(b.x.double(), b.edge_index).squeeze(-1)
            loss = torch.nn.functional.mse_loss(pred[b.mask], b.target.double()[b.mask])
            for t, g in zip(total, torch.autograd.grad(loss, params)):
                t.add_(g)
            streams[r] = torch.get_rng_state()
        for p, t in zip(params, total):
            p.grad = t / world
        if cfg.clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        optimizer.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


MODES = {"plain": dict(), "gsr-dropout": dict(gsr=True, sparse_k=2, dropout=0.3)}


@pytest.mark.parametrize("mode", MODES.values(), ids=MODES.keys())
def test_two_ranks_equal_one_process_running_both_ranks_batches(tmp_path, mode):
    cfg = _config(tmp_path / "run", **mode)
    mp.start_processes(_rank, args=(2, _free_port(), cfg, str(tmp_path)), nprocs=2,
                       start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0].keys() == ranks[1].keys()
    for name in ranks[0]:
        assert ranks[0][name].dtype == torch.float64
        assert torch.equal(ranks[0][name], ranks[1][name]), name  # identical on every rank
    union = _single_process_union(cfg, 2, [0, 1])
    assert union.keys() == ranks[0].keys()
    for name, value in union.items():
        torch.testing.assert_close(ranks[0][name], value, rtol=1e-9, atol=1e-12, msg=name)
    # the check can fail: rank 0's batches alone lead elsewhere
    alone = _single_process_union(cfg, 2, [0])
    assert any(not torch.allclose(alone[n], union[n], rtol=1e-6, atol=0) for n in union)
    # the checkpoint holds the same parameters and both ranks' random states
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and [r["rank"] for r in ckpt["ranks"]] == [0, 1]
    assert not torch.equal(ckpt["ranks"][0]["rng"]["torch"], ckpt["ranks"][1]["rng"]["torch"])
    state = torch.load(tmp_path / "state1.pt", weights_only=True)
    assert ckpt["model"].keys() == state.keys()
    for name, value in ckpt["model"].items():
        assert torch.equal(value, state[name]), name


def test_sampler_epoch_scores_every_node_and_deals_different_batches(tmp_path):
    from gsr_compiler.distributed.sampler import DistributedBatchSchedule
    from gsr_compiler.train import _load_circuits, validate_config

    cfg = validate_config(_config(tmp_path / "run"))
    datas = _load_circuits(cfg.train, cfg, lambda _: None)
    schedule = DistributedBatchSchedule(datas, cfg, 2)
    for epoch in (0, 1):
        for counts in schedule.covered_nodes(epoch):
            assert counts.min() >= 1  # every cone of these circuits fits 400 nodes
    for step in range(3):
        a, b = schedule(step, 0), schedule(step, 1)
        assert a.num_nodes <= 400 and b.num_nodes <= 400
        assert a.x.shape != b.x.shape or not torch.equal(a.x, b.x)
    again = DistributedBatchSchedule(datas, cfg, 2)
    assert torch.equal(again(2, 1).x, schedule(2, 1).x)  # a function of (seed, step, rank)
    other = DistributedBatchSchedule(datas, _config_validated(tmp_path, seed=6), 2)
    assert [other.batch(g).num_nodes for g in range(6)] != \
        [schedule.batch(g).num_nodes for g in range(6)]


def _config_validated(tmp_path, **kw):
    from gsr_compiler.train import validate_config

    return validate_config(_config(tmp_path / "run", **kw))


# ----------------------------------------------------------------------------- resume


def _state(path):
    ckpt = torch.load(path, weights_only=True)
    return ckpt


def _run(*argv: str) -> int:
    return gsr_main(["train", *TINY, *argv])


def test_resume_under_two_ranks_is_exact_and_another_count_is_refused(tmp_path, capsys):
    single = ["--gsr", "--dropout", "0.2", "--eval-every", "2", "--seed", "3"]
    common = [*single, "--nproc", "2"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert _run("--steps", "5", "--out", str(whole), *common) == 0
    assert _run("--steps", "2", "--out", str(part), *common) == 0
    assert _run("--steps", "5", "--out", str(part), "--resume", *common) == 0
    a, b = _state(whole / "checkpoint.pt"), _state(part / "checkpoint.pt")
    assert a["step"] == b["step"] == 5 and a["world_size"] == b["world_size"] == 2
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for k in a["optimizer"]["state"]:
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(a["optimizer"]["state"][k][key], b["optimizer"]["state"][k][key])
    for ra, rb in zip(a["ranks"], b["ranks"]):
        assert ra["next_batch"] == rb["next_batch"] == 5 * 2 + ra["rank"]
        assert torch.equal(ra["rng"]["torch"], rb["rng"]["torch"])

    # torchrun starting `gsr train` (no --nproc) is the same run, bit for bit
    via_torchrun = tmp_path / "torchrun"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "gsr_compiler.cli", "train", *TINY, "--steps", "5", "--out", str(via_torchrun),
         *single], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # metrics computed, printed and written once, by rank 0
    assert proc.stdout.count("[gsr train finished") == 1
    assert proc.stdout.count("  average ") == 1 and proc.stdout.count("c432g ") == 1
    metrics = json.loads((via_torchrun / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and set(metrics["test"]["per_circuit"]) == {"c432g", "c499"}
    assert [row["step"] for row in metrics["val_history"]] == [2, 4, 5]
    c = _state(via_torchrun / "checkpoint.pt")
    assert c["world_size"] == 2
    for name in a["model"]:
        assert torch.equal(a["model"][name], c["model"][name]), name

    # another number of ranks, or one process: refused, nothing written
    before = (part / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    for other in (["--nproc", "1"], ["--nproc", "3"]):
        assert _run("--steps", "6", "--out", str(part), "--resume", *single, *other) == 2
        err = capsys.readouterr().err
        assert "written by 2 ranks" in err and "--nproc 2" in err
    assert _run("--steps", "6", "--out", str(part), "--resume", *single) == 2
    assert "2 data-parallel ranks" in capsys.readouterr().err
    assert (part / "checkpoint.pt").read_bytes() == before
    # and a single-process checkpoint is not resumed by ranks
    one = tmp_path / "one"
    assert _run("--steps", "1", "--out", str(one), *single) == 0
    assert _run("--steps", "2", "--out", str(one), "--resume", *single, "--nproc", "2") == 2
    assert "single-process" in capsys.readouterr().err


# ----------------------------------------------------------------------------- failures


def _rank_processes(root_pid: int) -> list[int]:
    """The ranks below ``root_pid``: processes the launcher spawned (not its resource tracker)."""
    found, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                kids = [int(k) for k in f.read().split()]
        except OSError:
            continue
        for kid in kids:
            try:
                with open(f"/proc/{kid}/cmdline", "rb") as f:
                    cmdline = f.read()
            except OSError:
                continue
            if b"spawn_main" in cmdline and b"resource_tracker" not in cmdline:
                found.append(kid)
            todo.append(kid)
    return sorted(found)


def _wait_for(path, proc, limit=240.0):
    deadline = time.monotonic() + limit
    while not os.path.exists(path):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.2)


def _gsr(*argv, env=None):
    return subprocess.Popen([sys.executable, "-m", "gsr_compiler.cli", "train", *TINY, *argv],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)


def test_killed_rank_stops_the_run_with_a_clear_error_and_the_checkpoint_survives(tmp_path):
    out = tmp_path / "run"
    proc = _gsr("--gsr", "--steps", "100000", "--checkpoint-every", "2", "--eval-every", "0",
                "--nproc", "2", "--dist-timeout", "30", "--out", str(out))
    try:
        _wait_for(out / "checkpoint.pt", proc)
        ranks = _rank_processes(proc.pid)
        assert len(ranks) == 2, ranks
        os.kill(ranks[-1], signal.SIGKILL)
        killed = time.monotonic()
        _, err = proc.communicate(timeout=60)
        assert time.monotonic() - killed < 60
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, err
    assert "data-parallel training failed: rank" in err and "(killed by SIGKILL)" in err, err
    assert "--resume" in err
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] >= 2 and ckpt["step"] % 2 == 0 and ckpt["world_size"] == 2


def test_rank_that_loses_its_peer_stops_by_itself_within_the_timeout(tmp_path):
    # Two ranks each under their own agent (as on two machines): nobody kills the survivor,
    # its process group notices the lost peer.
    out = tmp_path / "run"
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                   WORLD_SIZE="2", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                   TORCHELASTIC_RUN_ID="separate-agents", PYTHONPATH=REPO)
        procs.append(_gsr("--gsr", "--steps", "100000", "--checkpoint-every", "2",
                          "--eval-every", "0", "--dist-timeout", "20", "--out", str(out),
                          env=env))
    try:
        _wait_for(out / "checkpoint.pt", procs[0])
        procs[1].kill()
        killed = time.monotonic()
        _, err = procs[0].communicate(timeout=60)
        assert time.monotonic() - killed < 60
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
    assert procs[0].returncode == 2, err
    assert "gsr train: error: rank 0 stopped at step" in err
    assert "collective with the other ranks failed" in err and "--resume" in err
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] >= 2 and ckpt["world_size"] == 2


# ----------------------------------------------------------------------------- bad input

BAD = {
    "zero ranks": (["--nproc", "0"], "--nproc must be an integer >= 1"),
    "negative ranks": (["--nproc", "-2"], "--nproc must be an integer >= 1"),
    "more ranks than batches": (["--nproc", "7"], "7 ranks need at least 7 different batches"),
    "more ranks than circuit bins": (["--nproc", "3", "--full-graphs", "--batch-nodes", "4000"],
                                     "circuit bins"),
    "no GPU per rank": (["--nproc", "2", "--device", "cuda"], "GPU"),
    "bad timeout": (["--nproc", "2", "--dist-timeout", "0"], "--dist-timeout"),
    "timeout without ranks": (["--dist-timeout", "5"], "data-parallel runs"),
    "bad option": (["--nproc", "2", "--depth", "0"], "--depth"),
}


@pytest.mark.parametrize("argv, message", BAD.values(), ids=BAD.keys())
def test_bad_input_errors_before_any_rank_starts(tmp_path, argv, message, capsys, monkeypatch):
    if "cuda" in argv and torch.cuda.device_count() >= 2:
        pytest.skip("this machine has 2 GPUs")
    import torch.distributed.launcher.api as launcher

    def no_launch(*a, **k):
        raise AssertionError("a rank was started")

    monkeypatch.setattr(launcher, "elastic_launch", no_launch)
    out = tmp_path / "run"
    assert _run("--steps", "2", "--out", str(out), *argv) == 2
    err = capsys.readouterr().err
    assert "error" in err and message in err, err
    assert not out.exists()
