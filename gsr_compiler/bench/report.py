"""The results folder: ``results.json`` (everything), ``results.md`` (tables) and PNG plots.

Every file is written atomically (a temporary file beside it, then ``os.replace``), so an
interrupted run leaves either the previous file or the new one, never half of one.
"""
from __future__ import annotations

import json
import math
import os
from typing import Callable, Optional

from ..report import format_bytes
from ..train import _atomic_write, _jsonable
from .baselines import BASELINES

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"

#: Plot files per sweep; written when the sweep has rows.
PLOTS = {
    "depth": ("memory_vs_depth.png", "time_vs_depth.png"),
    "width": ("memory_vs_width.png",),
    "size": ("memory_vs_nodes.png",),
    "quality": ("quality_vs_depth.png",),
    "budget": ("budget_sweep.png",),
}

_SWEEP_TITLES = {"depth": "Depth sweep", "width": "Width sweep", "size": "Circuit size sweep",
                 "quality": "Quality after a fixed number of steps"}
_X_OF_SWEEP = {"depth": "depth", "width": "width", "size": "circuit", "quality": "depth"}


# ----------------------------------------------------------------------------- files


def write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
    _atomic_write(path, write)


def write_json(path: str, results: dict) -> None:
    write_text(path, json.dumps(_jsonable(results), indent=1, allow_nan=False) + "\n")


def write_results(out: str, results: dict, plots: bool = True) -> list[str]:
    """Writes ``results.json``, ``results.md`` and (``plots``) the PNGs; returns the paths."""
    os.makedirs(out, exist_ok=True)
    paths = [os.path.join(out, RESULTS_JSON), os.path.join(out, RESULTS_MD)]
    write_json(paths[0], results)
    pictures = []
    if plots:
        pictures = write_plots(out, results)
    write_text(paths[1], markdown(results, [os.path.basename(p) for p in pictures]))
    return paths + pictures


# ----------------------------------------------------------------------------- values


def _rows(results: dict, sweep: str) -> list[dict]:
    return results.get("sweeps", {}).get(sweep, {}).get("rows", [])


def _measurement(row: dict, key: str) -> Optional[float]:
    outcome = row["outcome"]
    if outcome["status"] != "ok":
        return None
    source = outcome.get("quality") if key in ("pearson", "kendall", "final_loss",
                                               "train_seconds") else outcome.get("measurement")
    value = (source or {}).get(key)
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return None
    return value


def _plain_row(rows: list[dict], row: dict) -> Optional[dict]:
    return next((r for r in rows if r["point"] == row["point"] and r["baseline"] == "plain"),
                None)


def ratio_to_plain(rows: list[dict], row: dict, key: str) -> Optional[float]:
    """``row``'s value of ``key`` over the plain model's at the same point, if both exist."""
    plain = _plain_row(rows, row)
    mine = _measurement(row, key)
    base = _measurement(plain, key) if plain is not None else None
    if mine is None or not base:
        return None
    return mine / base


def _x_value(sweep: str, row: dict) -> Optional[float]:
    if sweep == "size":
        return (row.get("workload") or {}).get("nodes")
    return row["values"].get(_X_OF_SWEEP[sweep])


# ----------------------------------------------------------------------------- Markdown


def _fmt_bytes(value) -> str:
    return "-" if value is None else format_bytes(value)


def _fmt_seconds(value) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"


def _fmt_ratio(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _fmt_float(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return lines


def _memory_columns(cuda: bool) -> list[tuple[str, str, Callable, bool]]:
    """(header, measurement key, formatter, with a ratio column)."""
    if cuda:
        memory = [("CUDA peak allocated", "cuda_peak_allocated", _fmt_bytes, True),
                  ("CUDA peak reserved", "cuda_peak_reserved", _fmt_bytes, True),
                  ("reserved / allocated", "reserved_over_allocated", _fmt_ratio, False)]
    else:
        memory = [("peak RSS", "peak_rss", _fmt_bytes, False),
                  ("RSS rise", "rss_rise", _fmt_bytes, True),
                  ("RSS rise, fixed mmap threshold", "rss_rise_fixed", _fmt_bytes, True)]
    return memory + [("saved for backward", "saved_bytes", _fmt_bytes, True),
                     ("step time", "step_seconds", _fmt_seconds, True),
                     ("build + first step", "setup_seconds", _fmt_seconds, False)]


def _status_cell(row: dict, footnotes: list[str]) -> str:
    outcome = row["outcome"]
    if outcome["status"] == "ok":
        # a configuration two sweeps share is measured once; say where
        cell = f"ok (as in {outcome['measured_in']})" if outcome.get("measured_in") else "ok"
        notes = outcome.get("notes") or []
        if notes:
            footnotes.append(f"{row['baseline']} at {row['point']}: " + "; ".join(notes))
            cell += f" [{len(footnotes)}]"
        return cell
    reason = (outcome.get("reason") or "").strip()
    first_line = reason.splitlines()[0] if reason else ""
    if len(first_line) > 300:
        first_line = first_line[:300] + " ..."
    footnotes.append(f"{row['baseline']} at {row['point']}: {first_line}")
    kind = f": {outcome['kind']}" if outcome.get("kind") else ""
    return f"**{outcome['status']}**{kind} [{len(footnotes)}]"


def _memory_section(results: dict, sweep: str) -> list[str]:
    rows = _rows(results, sweep)
    info = results["sweeps"][sweep]
    cuda = str(results["options"]["device"]).startswith("cuda")
    columns = _memory_columns(cuda)
    header = [_X_OF_SWEEP[sweep], "baseline", "result"]
    for title, _, _, with_ratio in columns:
        header.append(title)
        if with_ratio:
            header.append("/ plain")
    footnotes: list[str] = []
    body = []
    for row in rows:
        m = dict(row["outcome"].get("measurement") or {})
        if m.get("build_seconds") is not None and m.get("first_step_seconds") is not None:
            m["setup_seconds"] = m["build_seconds"] + m["first_step_seconds"]
        if m.get("cuda_peak_allocated") and m.get("cuda_peak_reserved") is not None:
            m["reserved_over_allocated"] = m["cuda_peak_reserved"] / m["cuda_peak_allocated"]
        point = str(row["values"].get(_X_OF_SWEEP[sweep], row["point"]))
        if sweep == "size" and row.get("workload"):
            w = row["workload"]
            point = f"{point} ({w['nodes']:,} nodes{', cone sample' if w['sampled'] else ''})"
        cells = [point, f"`{row['baseline']}`", _status_cell(row, footnotes)]
        ok = row["outcome"]["status"] == "ok"
        for _, key, fmt, with_ratio in columns:
            cells.append(fmt(m.get(key)) if ok else "-")
            if with_ratio:
                cells.append(_fmt_ratio(ratio_to_plain(rows, row, key)) if ok else "-")
        body.append(cells)
    lines = [f"## {_SWEEP_TITLES[sweep]}", "", info["description"], ""]
    lines += _table(header, body)
    lines += [""] + [f"[{i}] {text}" for i, text in enumerate(footnotes, 1)]
    lines += ["", "Where each baseline stopped:", ""] + _stops(rows, sweep) + [""]
    return lines


def _stops(rows: list[dict], sweep: str) -> list[str]:
    lines = []
    for name in dict.fromkeys(r["baseline"] for r in rows):
        mine = [r for r in rows if r["baseline"] == name]
        failed = next((r for r in mine if r["outcome"]["status"] == "failed"), None)
        ran = [r["point"] for r in mine if r["outcome"]["status"] == "ok"]
        if failed is None:
            lines.append(f"- `{name}`: ran at every point ({', '.join(ran)})")
            continue
        reason = (failed["outcome"].get("reason") or "").splitlines()
        reason = reason[0][:300] if reason else ""
        last = f"last fit: {ran[-1]}" if ran else "did not fit at any point"
        lines.append(f"- `{name}`: stopped at {failed['point']} ({failed['outcome']['kind']}; "
                     f"{last}): {reason}")
    return lines


def _quality_section(results: dict) -> list[str]:
    rows = _rows(results, "quality")
    info = results["sweeps"]["quality"]
    header = ["depth", "baseline", "result", "test Pearson", "test Kendall", "Kendall - plain",
              "final train loss", "train time"]
    footnotes: list[str] = []
    body = []
    for row in rows:
        ok = row["outcome"]["status"] == "ok"
        kendall = _measurement(row, "kendall")
        plain = _plain_row(rows, row)
        plain_kendall = _measurement(plain, "kendall") if plain else None
        delta = kendall - plain_kendall if kendall is not None and plain_kendall is not None \
            else None
        body.append([str(row["values"]["depth"]), f"`{row['baseline']}`",
                     _status_cell(row, footnotes),
                     _fmt_float(_measurement(row, "pearson")), _fmt_float(kendall),
                     _fmt_float(delta) if ok and row["baseline"] != "plain" else "-",
                     _fmt_float(_measurement(row, "final_loss"), 5),
                     _fmt_seconds(_measurement(row, "train_seconds"))])
    lines = [f"## {_SWEEP_TITLES['quality']}", "", info["description"], ""]
    lines += _table(header, body)
    lines += [""] + [f"[{i}] {text}" for i, text in enumerate(footnotes, 1)]
    lines += ["", "Where each baseline stopped:", ""] + _stops(rows, "quality") + [""]
    return lines


def markdown(results: dict, pictures: list[str]) -> str:
    """The results as Markdown: what ran where, what was compared, the tables, the plots."""
    from .machine import describe_machine
    from .summary import summary_section

    lines = ["# gsr bench results", ""]
    status = "complete" if results.get("complete") else \
        f"incomplete ({results.get('stopped_because') or 'still running'})"
    lines += [f"Command: `{results['command']}`  ",
              f"Started {results['started']}, {results.get('seconds', 0) / 60:.1f} min, "
              f"{status}  "]
    lines += [line + "  " for line in describe_machine(results["machine"])]
    lines += [""] + summary_section(results)
    lines += ["## Baselines", ""]
    lines += _table(["baseline", "what it is"],
                    [[f"`{name}`", text] for name, text in results["baselines"].items()])
    lines += ["", "## How it is measured", ""] + [f"- {m}" for m in results["method"]] + [""]
    for note in results.get("notes", []):
        lines.append(f"Note: {note}  ")
    lines.append("")
    for sweep in ("depth", "width", "size"):
        if sweep in results.get("sweeps", {}):
            lines += _memory_section(results, sweep)
    if "quality" in results.get("sweeps", {}):
        lines += _quality_section(results)
    if "budget" in results.get("sweeps", {}):
        from .budget_report import budget_section

        lines += budget_section(results)
    if pictures:
        lines += ["## Plots", ""] + [f"![{p[:-4].replace('_', ' ')}]({p})" for p in pictures]
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plots


_COLORS = {"plain": "black", "checkpoint": "C0", "deepgcn": "C9", "groupaddrev": "C4",
           "torch.compile": "C8", "gsr-rev": "C1", "gsr-sparse": "C2", "gsr-full": "C3"}


def _style(name: str) -> dict:
    names = list(BASELINES)
    index = names.index(name) if name in names else len(names)
    gsr = name.startswith("gsr")
    return {"color": _COLORS.get(name, f"C{index % 10}"), "marker": "os^vDPX*"[index % 8],
            "linestyle": "-" if gsr else "--", "linewidth": 2.2 if gsr else 1.4}


def _series(rows: list[dict], sweep: str, key: str):
    """Per baseline: the points (x, value) and a legend suffix saying where it stopped."""
    out = {}
    for name in dict.fromkeys(r["baseline"] for r in rows):
        mine = [r for r in rows if r["baseline"] == name]
        points = [(_x_value(sweep, r), _measurement(r, key)) for r in mine]
        points = [(x, y) for x, y in points if x is not None and y is not None]
        failed = next((r for r in mine if r["outcome"]["status"] == "failed"), None)
        suffix = f" (failed at {failed['point']}: {failed['outcome']['kind']})" if failed else ""
        out[name] = (points, suffix)
    return out


def _figure(panels: int, title: str):
    import textwrap

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2 * panels, 4.6), dpi=110)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, panels, i + 1) for i in range(panels)]
    fig.suptitle("\n".join(textwrap.wrap(title, 60 * panels)), fontsize=9)
    return fig, axes


def _save(fig, path: str) -> str:
    fig.tight_layout()
    _atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path


def _draw(ax, rows, sweep, key, scale: float, ylabel: str, xlabel: str, log_y: bool = True,
          legend: bool = False) -> None:
    for name, (points, suffix) in _series(rows, sweep, key).items():
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, [y / scale for y in ys], label=f"{name}{suffix}", **_style(name))
        elif suffix:  # a baseline that never ran still appears in the legend
            ax.plot([], [], label=f"{name}{suffix}", **_style(name))
    xs = sorted({x for x in (_x_value(sweep, r) for r in rows) if x is not None})
    if len(xs) > 1:
        ax.set_xscale("log", base=2)
    if xs and sweep != "size":
        ax.set_xticks(xs)
        ax.set_xticklabels([str(x) for x in xs], fontsize=7)
    if log_y and ax.lines and any(len(line.get_xdata()) for line in ax.lines):
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    if legend:
        ax.legend(fontsize=6, loc="best")


def _memory_keys(cuda: bool) -> list[tuple[str, str]]:
    if cuda:
        return [("cuda_peak_allocated", "CUDA peak allocated (MiB)"),
                ("cuda_peak_reserved", "CUDA peak reserved (MiB)"),
                ("saved_bytes", "saved for backward (MiB)")]
    return [("rss_rise", "RSS rise of a step (MiB)"),
            ("rss_rise_fixed", "RSS rise, fixed mmap threshold (MiB)"),
            ("saved_bytes", "saved for backward (MiB)")]


def write_plots(out: str, results: dict) -> list[str]:
    """The PNGs of the sweeps that have rows; returns their paths."""
    cuda = str(results["options"]["device"]).startswith("cuda")
    sweeps = results.get("sweeps", {})
    paths = []
    xlabels = {"depth": "residual blocks (depth)", "width": "channels (width)",
               "size": "nodes in the step's graph"}
    for sweep in ("depth", "width", "size"):
        rows = _rows(results, sweep)
        if not rows:
            continue
        keys = _memory_keys(cuda)
        fig, axes = _figure(len(keys),
                            f"memory of one training step; {sweeps[sweep]['description']}")
        for i, (ax, (key, label)) in enumerate(zip(axes, keys)):
            _draw(ax, rows, sweep, key, 2 ** 20, label, xlabels[sweep], legend=i == 0)
        paths.append(_save(fig, os.path.join(out, PLOTS[sweep][0])))
        if sweep == "depth":
            fig, axes = _figure(2, f"time of one training step; {sweeps[sweep]['description']}")
            _draw(axes[0], rows, sweep, "step_seconds", 1e-3, "step time (ms, median)",
                  xlabels[sweep], legend=True)
            ratio_rows = []
            for r in rows:  # the ratio to plain, drawn as a measurement of its own
                value = ratio_to_plain(rows, r, "step_seconds")
                copy = json.loads(json.dumps(r))
                if copy["outcome"]["status"] == "ok":
                    copy["outcome"]["measurement"] = {"step_time_ratio": value}
                ratio_rows.append(copy)
            _draw(axes[1], ratio_rows, sweep, "step_time_ratio", 1.0, "step time / plain",
                  xlabels[sweep], log_y=True)
            paths.append(_save(fig, os.path.join(out, PLOTS[sweep][1])))
    rows = _rows(results, "quality")
    if rows:
        fig, axes = _figure(2, f"test quality; {sweeps['quality']['description']}")
        for i, (ax, key) in enumerate(zip(axes, ("pearson", "kendall"))):
            _draw(ax, rows, "quality", key, 1.0, f"test {key.capitalize()}",
                  "residual blocks (depth)", log_y=False, legend=i == 0)
        paths.append(_save(fig, os.path.join(out, PLOTS["quality"][0])))
    from .budget_report import budget_plot

    budget = budget_plot(out, results)
    if budget:
        paths.append(budget)
    return paths
