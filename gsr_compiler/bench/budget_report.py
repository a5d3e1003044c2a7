"""The budget sweep in ``results.md`` (a table) and ``budget_sweep.png`` (test Kendall against
training seconds, and the epoch time, per baseline). Nothing is measured here."""
from __future__ import annotations

import os
from typing import Optional

from .report import _fmt_bytes, _fmt_float, _fmt_seconds, _rows, _status_cell, _table

BUDGET_PLOT = "budget_sweep.png"


def _value(row: dict, *keys: str):
    value = row["outcome"].get(keys[0]) or {}
    for key in keys[1:]:
        value = (value or {}).get(key) if isinstance(value, dict) else None
    return value


def _plain(rows: list[dict]) -> Optional[dict]:
    return next((r for r in rows if r["baseline"] == "plain" and r["outcome"]["status"] == "ok"),
                None)


def budget_section(results: dict) -> list[str]:
    rows = _rows(results, "budget")
    info = results["sweeps"]["budget"]
    plain = _plain(rows)
    plain_epoch = _value(plain, "measurement", "epoch_seconds") if plain else None
    plain_kendall = _value(plain, "quality", "kendall") if plain else None
    header = ["baseline", "result", "largest batch (nodes)", "measured peak", "probes",
              "batches / epoch", "nodes scorable", "nodes computed / scored",
              "s / batch (batches timed)", "epoch time", "plain's epoch / this",
              "test Kendall", "Kendall - plain", "trained (s, epochs)"]
    footnotes: list[str] = []
    body = []
    for row in rows:
        m = row["outcome"].get("measurement") or {}
        q = row["outcome"].get("quality") or {}
        epoch = m.get("epoch") or {}
        probes = (m.get("search") or {}).get("probes") or []
        per_batch = m.get("seconds_per_batch")
        epoch_seconds = m.get("epoch_seconds")
        kendall = q.get("kendall")
        body.append([
            f"`{row['baseline']}`", _status_cell(row, footnotes),
            f"{m['batch_nodes']:,}" if m.get("batch_nodes") else "-",
            _fmt_bytes(m.get("peak_bytes")), str(len(probes)),
            f"{epoch['batches']:,}" if epoch else "-",
            f"{epoch['covered_share']:.1%}" if epoch else "-",
            _fmt_float(epoch.get("recompute_factor"), 2) if epoch else "-",
            f"{_fmt_seconds(per_batch)} ({m.get('timed_batches')})" if per_batch else "-",
            _fmt_seconds(epoch_seconds),
            _fmt_float(plain_epoch / epoch_seconds, 2) if plain_epoch and epoch_seconds else "-",
            _fmt_float(kendall),
            _fmt_float(kendall - plain_kendall) if kendall is not None
            and plain_kendall is not None and row["baseline"] != "plain" else "-",
            f"{q['train_seconds']:.0f}, {q['epochs']:.2f}" if q else "-",
        ])
    lines = ["## Equal memory budget: largest batch, epoch time, quality after equal time", "",
             info["description"], "",
             "Largest batch: the batch size was grown from 32 nodes (doubling) and bisected to "
             "within 10%, each size measured on the epoch's largest batch in a fresh process; "
             "the accepted size was measured to fit. An epoch scores every node of the "
             "training circuits once; nodes whose fan-in cone is larger than the batch cannot be "
             "scored (`nodes scorable`), and shared cones are computed again in each batch that "
             "needs them (`nodes computed / scored`). Epoch time: batches per epoch times the "
             "mean seconds per batch over the timed batches (every step after the first, which "
             "holds lazy compilation), so it is extrapolated when fewer batches were timed than "
             "an epoch has. Test Kendall: at the end of the training clock (the last step ends "
             "past it by at most one step; the seconds trained are in the last column).", ""]
    lines += _table(header, body)
    lines += [""] + [f"[{i}] {text}" for i, text in enumerate(footnotes, 1)] + [""]
    lines += ["Test Kendall over the training clock (seconds: Kendall):", ""]
    for row in rows:
        curve = _value(row, "quality", "curve") or []
        if curve:
            points = ", ".join(f"{p['train_seconds']:.0f} s: {p['kendall']:.3f}" for p in curve)
            lines.append(f"- `{row['baseline']}`: {points}")
    lines.append("")
    return lines


def budget_plot(out: str, results: dict) -> Optional[str]:
    from .report import _figure, _save, _style

    rows = _rows(results, "budget")
    if not rows:
        return None
    fig, (curve_ax, epoch_ax) = _figure(2, "equal memory budget; "
                                           + results["sweeps"]["budget"]["description"])
    names, epochs = [], []
    for row in rows:
        name = row["baseline"]
        curve = _value(row, "quality", "curve") or []
        batch = _value(row, "measurement", "batch_nodes")
        label = f"{name} ({batch:,} nodes)" if batch else \
            f"{name} ({row['outcome'].get('kind') or row['outcome']['status']})"
        if curve:
            curve_ax.plot([p["train_seconds"] for p in curve], [p["kendall"] for p in curve],
                          label=label, **_style(name))
        else:
            curve_ax.plot([], [], label=label, **_style(name))
        seconds = _value(row, "measurement", "epoch_seconds")
        if seconds:
            names.append(name)
            epochs.append(seconds)
    curve_ax.set_xlabel("training wall clock (s)")
    curve_ax.set_ylabel("test Kendall")
    curve_ax.grid(True, alpha=0.3)
    curve_ax.legend(fontsize=6, loc="best")
    if epochs:
        epoch_ax.barh(range(len(epochs)), epochs, color=[_style(n)["color"] for n in names])
        epoch_ax.set_yticks(range(len(epochs)))
        epoch_ax.set_yticklabels(names, fontsize=7)
        epoch_ax.set_xscale("log")
    epoch_ax.set_xlabel("one epoch (s, every node scored once)")
    epoch_ax.grid(True, axis="x", which="both", alpha=0.3)
    return _save(fig, os.path.join(out, BUDGET_PLOT))
