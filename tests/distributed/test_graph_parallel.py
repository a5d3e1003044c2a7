"""Graph-parallel full-graph training equals the single-process model.

Each case compiles a ResidualGNN (pre-norm, reversible chain) on the c880 circuit in
float64, runs two SGD steps in one process, then the same on 2 and 3 gloo ranks (spawned, one
thread each) and compares every output row and every parameter gradient at both steps. Dropout
is on in most cases: the single process then uses the node-id-keyed masks
(``use_row_keyed_dropout`` with ``arange(N)``) that the ranks use; the case without dropout
compares against the compiled model as it is. The bytes each rank exchanged are checked against
the formula of docs/distributed.md. SAGE, GAT and GIN layers; METIS, BFS and level partitions.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from gsr_compiler import GSRCompileError
from gsr_compiler.circuits import load_circuit
from gsr_compiler.distributed.graph_parallel import check_graph_parallel_model
from gsr_compiler.distributed.halo import message_passing_layers
from gsr_compiler.distributed.partition import (GraphPartitionError, metis_available,
                                                partition_graph)
from gsr_compiler.distributed.row_dropout import use_row_keyed_dropout

from .graph_parallel_worker import build, loss_of, run_rank, sgd_step

DEPTH, WIDTH, K = 4, 16, 4
CASES = {
    # name: (GSRConfig options, dropout, partition method, conv)
    "dense_dropout": ({}, 0.2, "metis" if metis_available() else "bfs", "sage"),
    "sparse_dropout": ({"sparse_k": K}, 0.2, "level", "sage"),
    "sparse_no_dropout": ({"sparse_k": K}, 0.0, "bfs", "sage"),
    "two_stream_dropout": ({"coupling": "two-stream"}, 0.2, "bfs", "sage"),
    "dense_plain": ({}, 0.0, "level", "sage"),
    "gat_dropout": ({}, 0.2, "bfs", "gat"),  # softmax over each node's incoming edges
    "gin_sparse_dropout": ({"sparse_k": K}, 0.2, "bfs", "gin"),
    "float32_dropout": ({}, 0.2, "bfs", "sage"),  # float32: to rounding
    # GCN's symmetric normalization reads the whole graph's degrees of the halo sources
    "gcn_dropout": ({}, 0.2, "level", "gcn"),
    "gcn_sparse_dropout": ({"sparse_k": K}, 0.2, "bfs", "gcn"),
}
TOLERANCE = {"float32_dropout": 1e-5}


@pytest.fixture(scope="module")
def circuit():
    data = load_circuit("c880", labels=("level",))
    g = torch.Generator().manual_seed(3)
    return {"x": data.x.double(), "edge_index": data.edge_index,
            "y": torch.randn(data.num_nodes, 2, generator=g, dtype=torch.float64)}


def _case(circuit: dict, name: str, world: int) -> tuple[dict, list]:
    options, dropout, method, conv = CASES[name]
    dtype = torch.float32 if name.startswith("float32") else torch.float64
    case = dict(model_seed=1, in_channels=circuit["x"].shape[1], width=WIDTH, out_channels=2,
                depth=DEPTH, conv=conv, dropout=dropout, dtype=dtype, config=options,
                step_seed=11, steps=2, lr=0.05, data=circuit)
    circuit = {k: v.to(dtype) if v.is_floating_point() else v for k, v in circuit.items()}
    n = circuit["x"].shape[0]
    gsr = build(case)
    gsr(circuit["x"], circuit["edge_index"])  # compile on the whole graph
    if dropout:
        assert use_row_keyed_dropout(gsr, torch.arange(n)) > 0
    case["state"] = {k: v.clone() for k, v in gsr.state_dict().items()}
    case["parts"] = partition_graph(circuit["edge_index"], n, world, method).parts
    reference = []
    for step in range(case["steps"]):
        torch.manual_seed(case["step_seed"] + step)
        out = gsr(circuit["x"], circuit["edge_index"])
        gsr.zero_grad(set_to_none=True)
        loss_of(out, circuit["y"], n).backward()
        reference.append((out.detach().clone(),
                          {k: p.grad.clone() for k, p in gsr.named_parameters()}))
        sgd_step(gsr, case["lr"])
    return case, reference


@pytest.fixture(scope="module", params=[2, 3], ids=["2ranks", "3ranks"])
def runs(request, circuit, tmp_path_factory):
    world = request.param
    workdir = tmp_path_factory.mktemp(f"graph_parallel_{world}")
    references = {}
    for name in CASES:
        case, references[name] = _case(circuit, name, world)
        torch.save(case, workdir / f"{name}.pt")
    env_threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        mp.spawn(run_rank, args=(world, str(workdir / "store"), str(workdir), list(CASES)),
                 nprocs=world, join=True)
    finally:
        if env_threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env_threads
    results = {name: [torch.load(workdir / f"{name}.rank{r}.pt", weights_only=False)
                      for r in range(world)] for name in CASES}
    return world, references, results


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.mark.parametrize("name", list(CASES))
def test_outputs_and_gradients_equal_single_process(runs, name):
    world, references, results = runs
    ranks = results[name]
    owned = torch.cat([r["owned"] for r in ranks])
    assert torch.equal(owned.sort().values, torch.arange(owned.numel()))  # each node once
    for step, (ref_out, ref_grads) in enumerate(references[name]):
        out = torch.empty_like(ref_out)
        for r in ranks:
            out[r["owned"]] = r["outputs"][step]
        tolerance = TOLERANCE.get(name, 1e-6)
        assert _relative(out, ref_out) < tolerance, (name, step)
        for r in ranks:  # every rank holds the summed gradient
            assert set(r["grads"][step]) == set(ref_grads)
            for key, g in ref_grads.items():
                assert _relative(r["grads"][step][key], g) < tolerance, (name, step, key)


def _row_bytes(name: str) -> tuple[int, int]:
    """Bytes of one exchanged row of a message-passing layer's input, and of its gradient, for
    one block (summed over the block's branches)."""
    options = CASES[name][0]
    size = 4 if name.startswith("float32") else 8
    if "sparse_k" in options:  # G=2 branches, each one top-k group: k values + k uint8
        return 2 * K * (size + 1), 2 * K * size
    # grouped: G=2 branches of width D/2; two-stream: one branch per block at full width
    return WIDTH * size, WIDTH * size


@pytest.mark.parametrize("name", list(CASES))
def test_bytes_exchanged_match_formula(runs, name):
    # Per step, each message-passing layer in a reversible chain exchanges its halo in the
    # forward and again in the backward recompute, and sends halo gradients back once.
    _, _, results = runs
    row, grad_row = _row_bytes(name)
    for r in results[name]:
        for stats in r["stats"]:
            h, s = r["halo"], r["sent_rows"]
            assert stats["bytes_received"] == DEPTH * (2 * h * row + s * grad_row)
            assert stats["bytes_sent"] == DEPTH * (2 * s * row + h * grad_row)
    assert max(r["halo"] for r in results[name]) > 0  # edges are cut: the exchange runs


def test_reports_name_each_rank(runs):
    world, _, results = runs
    for name, ranks in results.items():
        table = ranks[0]["describe"].splitlines()
        assert table[0] == f"graph-parallel: {sum(r['owned'].numel() for r in ranks)} nodes on " \
            f"{world} ranks"
        for rank, r in enumerate(ranks):  # one line per rank: owned, halo, ..., bytes
            cells = table[2 + rank].split()
            assert cells[:3] == [str(rank), str(r["owned"].numel()), str(r["halo"])]
            assert f"{r['owned'].numel()} of" in r["explain"] and "reversible" in r["explain"]


def test_cases_exercise_dropout_and_sparse_layers(circuit):
    # The comparisons above must be able to fail: dropout changes the outputs, and the sparse
    # cases run the compressed layers (which exchange compressed rows).
    n = circuit["x"].shape[0]
    outs = []
    for dropout in (0.0, 0.2):
        case = dict(model_seed=1, in_channels=circuit["x"].shape[1], width=WIDTH, out_channels=2,
                    depth=DEPTH, conv="sage", dropout=dropout, dtype=torch.float64,
                    config={"sparse_k": K})
        gsr = build(case)
        gsr(circuit["x"], circuit["edge_index"])
        use_row_keyed_dropout(gsr, torch.arange(n))
        torch.manual_seed(0)
        outs.append(gsr(circuit["x"], circuit["edge_index"]).detach())
        kinds = {type(m).__name__ for _, m in message_passing_layers(gsr)}
        assert "CompressedSAGEConv" in kinds, kinds
    assert _relative(outs[0], outs[1]) > 1e-3


def test_row_keyed_masks_do_not_depend_on_the_partition():
    from gsr_compiler.distributed.row_dropout import row_keyed_dropout

    x = torch.ones(50, 6, dtype=torch.float64)
    whole = row_keyed_dropout(x, 0.5, torch.arange(50), seed=7)
    rows = torch.tensor([3, 17, 41, 8])
    assert torch.equal(row_keyed_dropout(x[rows], 0.5, rows, seed=7), whole[rows])
    assert 0.3 < float((whole == 0).double().mean()) < 0.7
    big = row_keyed_dropout(torch.ones(4000, 50), 0.1, torch.arange(4000), seed=1)
    assert abs(float((big == 0).double().mean()) - 0.1) < 0.005  # Bernoulli(0.1): sd 0.0013


def test_graph_smaller_than_ranks_is_refused_up_front():
    edge_index = torch.tensor([[0, 1], [1, 2]])
    with pytest.raises(GraphPartitionError, match="fewer than the 4 ranks"):
        partition_graph(edge_index, 3, 4)
    with pytest.raises(GraphPartitionError, match="positive integer"):
        partition_graph(edge_index, 3, 0)


@pytest.mark.parametrize("method", ["bfs", "level", "contiguous"]
                         + (["metis"] if metis_available() else []))
@pytest.mark.parametrize("world", [2, 3, 4])
def test_partition_covers_every_edge_once(circuit, method, world):
    ei = circuit["edge_index"]
    n = circuit["x"].shape[0]
    part = partition_graph(ei, n, world, method)
    sizes = part.sizes()
    assert sum(sizes) == n and min(sizes) > 0
    if method != "metis":
        assert max(sizes) - min(sizes) <= 1
    locals_ = [part.local(ei, r) for r in range(world)]
    seen = torch.cat([g.edge_ids for g in locals_])
    assert torch.equal(seen.sort().values, torch.arange(ei.shape[1]))
    for g in locals_:
        ids = torch.cat([g.owned, g.halo])
        assert torch.equal(ids[g.edge_index], ei[:, g.edge_ids])  # local ids map back
        assert int(g.edge_index[1].max()) < g.num_owned
        assert not set(g.halo.tolist()) & set(g.owned.tolist())
    for r in range(world):  # what r sends to q is what q receives from r, in q's order
        for q in range(world):
            assert locals_[r].send_counts[q] == locals_[q].recv_counts[r]
            start = sum(locals_[r].send_counts[:q])
            sent = locals_[r].owned[locals_[r].send_index[start:start + locals_[r].send_counts[q]]]
            first = sum(locals_[q].recv_counts[:r])
            assert torch.equal(sent, locals_[q].halo[first:first + locals_[q].recv_counts[r]])


def test_bad_partition_arguments():
    ei = torch.tensor([[0, 1, 2], [1, 2, 0]])
    with pytest.raises(GraphPartitionError, match="method="):
        partition_graph(ei, 3, 2, "spectral")
    with pytest.raises(GraphPartitionError, match="needs a DAG"):
        partition_graph(ei, 3, 2, "level")
    with pytest.raises(GraphPartitionError, match="outside"):
        partition_graph(torch.tensor([[0], [5]]), 3, 2)


def test_layers_a_rank_cannot_run_alone_are_named():
    import torch_geometric.nn as pyg
    from torch import nn

    class WithBatchNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = pyg.SAGEConv(4, 4)
            self.bn = nn.BatchNorm1d(4)

    class WithAPPNP(nn.Module):
        def __init__(self):
            super().__init__()
            self.prop = pyg.APPNP(K=3, alpha=0.1)

    with pytest.raises(GSRCompileError, match="'bn'.*all nodes"):
        check_graph_parallel_model(WithBatchNorm())
    with pytest.raises(GSRCompileError, match="'prop'.*K hops"):
        check_graph_parallel_model(WithAPPNP())
    check_graph_parallel_model(build(dict(model_seed=0, in_channels=3, width=8, out_channels=1,
                                          depth=2, conv="sage", dropout=0.1,
                                          dtype=torch.float32, config={})))


# -- gsr train --graph-parallel N ---------------------------------------------------------------


def _gsr_train(monkeypatch, capsys, *argv):
    import subprocess

    from gsr_compiler import cli

    def no_launch(*args, **kwargs):
        raise AssertionError("a process was started")

    monkeypatch.setattr(subprocess, "run", no_launch)
    code = cli.main(["train", *argv])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--graph-parallel", "50", "--train", "c17", "--gsr"], "fewer than the 50 ranks"),
    (["--graph-parallel", "0", "--train", "c880", "--gsr"], "positive integer"),
    (["--graph-parallel", "2", "--train", "c880,c432", "--gsr"], "one circuit"),
    (["--graph-parallel", "2", "--train", "c880", "--gsr", "--resume"], "--resume"),
    (["--graph-parallel", "2", "--train", "c880", "--dropout", "0.1"], "use --gsr"),
    (["--graph-parallel", "2", "--train", "c880", "--gsr", "--partition", "spectral"],
     "spectral"),
    (["--graph-parallel", "2", "--train", "no_such_circuit", "--gsr"], "no_such_circuit"),
])
def test_cli_refuses_bad_runs_before_starting_processes(monkeypatch, capsys, tmp_path, argv,
                                                        message):
    out = tmp_path / "run"
    code, err = _gsr_train(monkeypatch, capsys, *argv, "--out", str(out))
    assert code == 2 and message in err, err
    assert not out.exists()


def test_cli_refuses_data_parallel_flags_with_graph_parallel(tmp_path):
    from gsr_compiler.cli import build_parser
    from gsr_compiler.distributed.train_graph_parallel import run_from_cli

    args = build_parser().parse_args(["train", "--graph-parallel", "2", "--train", "c880",
                                      "--gsr", "--out", str(tmp_path / "run")])
    args.nproc = 2  # the data-parallel flag, where the parser has it
    with pytest.raises(ValueError, match="--nproc"):
        run_from_cli(args)
    assert not (tmp_path / "run").exists()


def test_cli_trains_one_circuit_on_two_ranks(tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "run"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run(
        [sys.executable, "-m", "gsr_compiler.cli", "train", "--graph-parallel", "2", "--train",
         "c880", "--gsr", "--depth", "4", "--width", "16", "--steps", "12", "--eval-every", "6",
         "--lr", "0.01", "--dropout", "0.1", "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "383 nodes on 2 ranks" in proc.stdout and "step 12/12" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["ranks"] == 2 and len(metrics["losses"]) == 12
    assert metrics["losses"][-1] < metrics["losses"][0]
    state = torch.load(out / "model.pt", weights_only=True)
    assert any("blocks" in k for k in state)


def test_splitmix64_matches_its_definition():
    from gsr_compiler.distributed.row_dropout import splitmix64

    def reference(seed: int, i: int) -> int:
        mask = (1 << 64) - 1
        z = (seed + (i + 1) * 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    counters = torch.tensor([0, 1, 2, 7, 12345, 2**40 + 3])
    for seed in (0, 123456789, 2**62 + 5):
        got = [int(v) & ((1 << 64) - 1) for v in splitmix64(counters, seed)]
        assert got == [reference(seed, int(i)) for i in counters]
