"""Predicted vs measured CPU peak of a training step over a grid of configurations.

For each configuration (depth, width, groups, sparse_k, circuit; plain or GSR) the step peak is
predicted from the compiled graph (``gsr_model.predict_peak()``, ``peak.plain_predictor``) and
the RSS rise of one training step is measured after a warm-up step with
``MALLOC_MMAP_THRESHOLD_=131072``, all configurations one after another in one fresh process
(``gsr_compiler.memory_batch``). Prints the table, the median and the worst relative error, and
writes them as markdown with ``--out``.

    python benchmarks/bench_peak_prediction.py --out docs/bench/prediction/results.md
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from gsr_compiler import gsr_compile  # noqa: E402
from gsr_compiler.circuits import load_circuit  # noqa: E402
from gsr_compiler.memory_batch import measure_rss_rises  # noqa: E402
from gsr_compiler.models import ResidualGNN  # noqa: E402
from gsr_compiler.peak import plain_predictor  # noqa: E402

# (form, depth, width, groups, sparse_k, circuit)
GRID = [
    ("plain", 4, 32, None, None, "square"),
    ("plain", 8, 64, None, None, "sqrt"),
    ("plain", 4, 128, None, None, "multiplier"),
    ("plain", 16, 32, None, None, "c6288"),
    ("gsr", 8, 64, 2, None, "square"),
    ("gsr", 32, 64, 2, None, "square"),
    ("gsr", 8, 128, 2, None, "multiplier"),
    ("gsr", 16, 128, 4, None, "multiplier"),
    ("gsr", 8, 64, 4, None, "sqrt"),
    ("gsr", 8, 64, 2, 16, "sqrt"),
    ("gsr", 16, 128, 2, 32, "multiplier"),
    ("gsr", 8, 128, 4, 8, "square"),
    ("gsr", 64, 32, 2, None, "sqrt"),
    ("gsr", 16, 32, 2, 8, "square"),
]


def build(form: str, depth: int, width: int, groups, k, circuit: str, loaded: dict):
    """``(model to measure, inputs, target, predicted RSS rise, (N, E))``."""
    data = loaded.get(circuit)
    if data is None:
        data = loaded[circuit] = load_circuit(circuit, labels=("level",))
    x, edge_index = data.x.float(), data.edge_index
    target = data.level_norm.float().unsqueeze(-1)
    torch.manual_seed(0)
    model = ResidualGNN(x.shape[1], width, 1, depth, dropout=0.0)
    if form == "plain":
        predicted = plain_predictor(model, (x, edge_index)).predict().rss_rise
        return model, (x, edge_index), target, predicted, (x.shape[0], edge_index.shape[1])
    gsr_model = gsr_compile(model, groups=groups, sparse_k=k, example_inputs=(x, edge_index))
    return (gsr_model, (x, edge_index), target, gsr_model.predict_peak().rss_rise,
            (x.shape[0], edge_index.shape[1]))


def run(grid=GRID) -> list[dict]:
    loaded: dict = {}
    cases, rows = [], []
    for form, depth, width, groups, k, circuit in grid:
        model, inputs, target, predicted, (N, E) = build(form, depth, width, groups, k, circuit,
                                                         loaded)
        cases.append((model, inputs, target))
        rows.append({"form": form, "depth": depth, "width": width, "groups": groups,
                     "sparse_k": k, "circuit": circuit, "nodes": N, "edges": E,
                     "predicted": predicted})
    measured = measure_rss_rises(cases)
    for row, m in zip(rows, measured):
        row["measured"] = m
        row["error"] = None if not m else (row["predicted"] - m) / m
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| form | depth | width | groups | k | circuit (N, E) | predicted | measured | error |",
             "|---|--:|--:|--:|--:|---|--:|--:|--:|"]
    for r in rows:
        err = "-" if r["error"] is None else f"{100 * r['error']:+.1f}%"
        meas = "-" if not r["measured"] else f"{r['measured'] / 2**20:.1f} MiB"
        lines.append(f"| {r['form']} | {r['depth']} | {r['width']} | {r['groups'] or '-'} | "
                     f"{r['sparse_k'] or '-'} | {r['circuit']} ({r['nodes']:,}, {r['edges']:,}) | "
                     f"{r['predicted'] / 2**20:.1f} MiB | {meas} | {err} |")
    errors = [abs(r["error"]) for r in rows if r["error"] is not None]
    lines.append("")
    lines.append(f"median |error| {100 * statistics.median(errors):.1f}%, worst "
                 f"{100 * max(errors):.1f}% over {len(errors)} configurations")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the table as markdown here")
    args = parser.parse_args()
    start = time.perf_counter()
    rows = run()
    text = table(rows)
    print(text)
    seconds = time.perf_counter() - start
    print(f"[{seconds:.0f} s]")
    if args.out:
        with open(args.out, "w") as f:
            f.write("# Predicted vs measured CPU peak of a training step\n\n")
            f.write("Command: `OMP_NUM_THREADS=1 python benchmarks/bench_peak_prediction.py "
                    f"--out {args.out}`\n\n")
            f.write(f"Machine: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
                    f"torch {torch.__version__}, one thread per step, shared with other work "
                    "(RSS figures move by a few percent between runs).\n\n")
            f.write("Measured: RSS rise of one training step (forward, MSE loss, backward) after "
                    "a warm-up step, `MALLOC_MMAP_THRESHOLD_=131072`, all configurations one after "
                    "another in one fresh process (`gsr_compiler.memory_batch`). Predicted: "
                    "the activations term of `predict_peak()` (what is not resident before the "
                    "step), from the compiled graph at the circuit's size; ResidualGNN "
                    "(pre-norm SAGE blocks, dropout 0), circuits from the bundled netlists.\n\n")
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
