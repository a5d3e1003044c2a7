"""explain(), the rewritten graph, pictures, compare_memory and the depth sweep."""
import json
import os

import torch

from gsr_compiler import compare_memory, gsr_compile
from gsr_compiler.cli import main as gsr_main
from gsr_compiler.models import ResidualGNN
from gsr_compiler.runtime.reversible import ReversibleChain
from gsr_compiler.sweep import plot_depth_sweep

from .models import graph_inputs


def small_model(depth=6, width=16):
    torch.manual_seed(0)
    return ResidualGNN(5, width, 3, depth=depth, conv="sage")


def test_explain_names_chain_depth_width_and_parameters():
    model = small_model()
    x, edge_index, _, _ = graph_inputs(dtype=torch.float32)
    gsr = gsr_compile(model, groups=4, example_inputs=(x, edge_index))
    text = gsr.explain()
    for expected in ("FindResidualChains", "ReversibleRewrite", "6 block(s)", "'blocks.0.norm'",
                     "'blocks.5.conv'", "width 16 = 4 groups x 4", "edge_index", "parameters:",
                     "different function"):
        assert expected in text, expected
    report = gsr.report
    assert report.params_before == sum(p.numel() for p in model.parameters())
    assert report.params_after == sum(p.numel() for p in gsr.parameters())
    assert report.params_after < report.params_before  # G copies at 1/G width: D^2/G weights
    assert report.chains[0].stored_bytes_reversible < report.chains[0].stored_bytes_plain


def test_graph_module_is_the_rewritten_fx_graph(tmp_path):
    model = small_model()
    x, edge_index, _, _ = graph_inputs(dtype=torch.float32)
    gsr = gsr_compile(model, example_inputs=(x, edge_index))
    gm = gsr.graph_module
    assert isinstance(gm, torch.fx.GraphModule)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert any(isinstance(gm.get_submodule(t), ReversibleChain) for t in targets)
    assert not any(str(t).startswith("blocks.") for t in targets)  # the chain replaced them
    readable = gm.print_readable(print_output=False)
    assert "gsr_chain_0" in readable
    for name in ("graph.png", "graph.svg"):
        path = gsr.save_graph(str(tmp_path / name))
        assert os.path.getsize(path) > 1000
    assert sorted(os.listdir(tmp_path)) == ["graph.png", "graph.svg"]  # no temporaries left


def test_compare_memory_in_subprocesses():
    torch.manual_seed(0)
    model = ResidualGNN(5, 32, 1, depth=24, conv="sage")
    x, edge_index, _, _ = graph_inputs(num_nodes=2000, num_edges=6000, dtype=torch.float32)
    y = torch.randn(2000, 1)
    gsr = gsr_compile(model, example_inputs=(x, edge_index))
    result = compare_memory(model, gsr, (x, edge_index), target=y, timing_steps=1)
    assert result.before.error is None and result.after.error is None, str(result)
    assert result.ratio("saved_bytes") < 0.25
    assert result.before.peak_rss > result.before.rss_rise > 0
    assert result.after.rss_rise_fixed is not None and result.before.rss_rise_fixed is not None
    # the plain model needs more than it keeps saved; the compiled one less than the plain
    assert result.before.rss_rise_fixed > result.after.rss_rise_fixed
    text = str(result)
    assert "saved for backward" in text and "RSS rise" in text and "step time" in text


def test_sweep_command_writes_json_and_plot(tmp_path):
    out = tmp_path / "sweep"
    code = gsr_main(["sweep", "--depths", "2,4", "--nodes", "200", "--edges", "600",
                     "--width", "8", "--in-process", "--out", str(out)])
    assert code == 0
    rows = json.loads((out / "depth_sweep.json").read_text())
    assert [r["depth"] for r in rows] == [2, 4]
    assert rows[1]["eager_saved_bytes"] > rows[0]["eager_saved_bytes"]
    # flat but for the few discrete choices recorded for the backward (docs/exactness.md)
    gsr_growth = rows[1]["gsr_saved_bytes"] - rows[0]["gsr_saved_bytes"]
    eager_growth = rows[1]["eager_saved_bytes"] - rows[0]["eager_saved_bytes"]
    assert 0 <= gsr_growth < 0.01 * eager_growth
    assert (out / "depth_sweep.png").stat().st_size > 1000


def test_plot_is_written_atomically(tmp_path):
    path = plot_depth_sweep([{"depth": 8, "eager_saved_bytes": 2**20, "gsr_saved_bytes": 2**18},
                             {"depth": 16, "eager_saved_bytes": 2**21, "gsr_saved_bytes": 2**18}],
                            str(tmp_path / "p.png"))
    assert os.listdir(tmp_path) == ["p.png"] and os.path.getsize(path) > 1000
