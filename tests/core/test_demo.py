"""`gsr demo` end to end at a tiny size on a real bundled circuit."""
from gsr_compiler.cli import main as gsr_main


def test_demo_runs_on_a_bundled_circuit(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GSR_CACHE_DIR", str(tmp_path / "cache"))
    code = gsr_main(["demo", "--circuit", "c432", "--depth", "6", "--width", "8", "--steps", "3",
                     "--no-memory", "--out", str(tmp_path / "out")])
    assert code == 0
    out = capsys.readouterr().out
    assert "circuit c432" in out and "logic depth" in out
    assert "6 block(s)" in out and "Pearson" in out
    # the default group top-k: half of each group of 8 / 2 groups = 4 channels
    assert "group top-k, k=2 of g=4" in out
    # what the last backward recorded and measured, after training
    assert "exactness of the last backward" in out and "choices recorded" in out
    assert (tmp_path / "out" / "rewritten_graph.png").exists()


def test_demo_unknown_circuit_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GSR_CACHE_DIR", str(tmp_path / "cache"))
    code = gsr_main(["demo", "--circuit", "c643", "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert "c643" in err and "c432" in err  # names the input and a near match
