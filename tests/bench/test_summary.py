"""The summary of results.md reads the right rows: the deepest depth where plain ran, GSR full's
memory and step time against each baseline there, and its Kendall against plain's."""
from __future__ import annotations

from gsr_compiler.bench.report import markdown
from gsr_compiler.bench.summary import summary_section

MIB = 2 ** 20


def row(sweep, depth, baseline, status="ok", **measured):
    quality = {k: measured.pop(k) for k in ("kendall", "pearson") if k in measured}
    return {"sweep": sweep, "point": f"depth {depth}", "values": {"depth": depth},
            "baseline": baseline, "spec": {}, "workload": {"name": "b22_Cg", "nodes": 15539},
            "outcome": {"baseline": baseline, "status": status, "kind": None, "reason": None,
                        "measurement": measured or None, "quality": quality or None,
                        "notes": [], "measured_in": None}}


def results(depth_rows, quality_rows=(), device="cpu"):
    return {"options": {"device": device, "label": "level"},
            "sweeps": {"depth": {"rows": list(depth_rows), "description": ""},
                       **({"quality": {"rows": list(quality_rows), "description": ""}}
                          if quality_rows else {})}}


def mem(rise_fixed, step, rise=None):
    return dict(rss_rise_fixed=rise_fixed * MIB, rss_rise=(rise or rise_fixed) * MIB,
                step_seconds=step)


DEPTH_ROWS = [
    row("depth", 64, "plain", **mem(1000, 2.0)),
    row("depth", 64, "groupaddrev", **mem(60, 3.0)),
    row("depth", 64, "gsr-full", **mem(50, 2.4)),
    # plain fails deeper: the summary must stay at depth 64
    row("depth", 128, "plain", status="failed"),
    row("depth", 128, "gsr-full", **mem(55, 4.8)),
]


def test_memory_and_time_at_the_deepest_point_plain_ran():
    text = "\n".join(summary_section(results(DEPTH_ROWS)))
    assert "depth 64, b22_Cg (15,539 nodes)" in text
    assert "| `gsr-full` | 50.0 MiB | 95.0% |" in text
    assert "95.0% below; the lowest of all baselines." in text
    assert "1.20x the plain model's step, 1.25x as fast as `groupaddrev`" in text
    assert "4.8" not in text  # the depth-128 row is not read


def test_a_baseline_lighter_than_gsr_full_is_named():
    rows = DEPTH_ROWS + [row("depth", 64, "checkpoint", **mem(40, 2.5))]
    text = "\n".join(summary_section(results(rows)))
    assert "not the lowest: `checkpoint` used as little or less." in text


def test_quality_against_plain_and_depth():
    quality = [row("quality", 4, "plain", kendall=0.30), row("quality", 4, "gsr-full", kendall=0.28),
               row("quality", 64, "plain", kendall=0.60), row("quality", 64, "gsr-full", kendall=0.61)]
    text = "\n".join(summary_section(results(DEPTH_ROWS, quality)))
    assert "minus plain -0.020 at depth 4, +0.010 at depth 64." in text
    assert "at depth 64 scores Kendall 0.610, at depth 4 0.280 (+0.330)." in text


def test_no_summary_without_a_plain_row_and_markdown_still_renders():
    only_gsr = [row("depth", 8, "gsr-full", **mem(5, 0.1))]
    assert summary_section(results(only_gsr)) == []
    body = results(only_gsr)
    body.update(command="gsr bench", started="now", seconds=1.0, complete=True, baselines={},
                method=[], machine={"platform": "p", "cpu": "c", "logical_cpus": 1,
                                    "torch_threads": 1, "memory_total_bytes": 1,
                                    "memory_available_bytes": 1, "device": "cpu",
                                    "python": "3", "torch": "t", "torch_geometric": "g",
                                    "triton": None, "gsr_compiler": "0"})
    text = markdown(body, [])
    assert "## Summary" not in text and "## Depth sweep" in text
