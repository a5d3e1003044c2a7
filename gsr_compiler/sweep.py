"""Memory against depth, for a model and its compiled form, as a table and a PNG plot."""
from __future__ import annotations

import os
import tempfile
from typing import Callable, Sequence

from torch import Tensor, nn

from .memory import compare_memory, default_loss


def depth_sweep(make_model: Callable[[int], nn.Module], compile_model: Callable[[nn.Module], nn.Module],
                depths: Sequence[int], inputs: Sequence[Tensor], target: Tensor | None = None,
                loss_fn: Callable = default_loss, subprocess: bool = True,
                progress: bool = True) -> list[dict]:
    """One :func:`compare_memory` per depth; returns a row of figures per depth."""
    from tqdm import tqdm

    rows = []
    for depth in tqdm(list(depths), desc="depth sweep", disable=not progress):
        model = make_model(depth)
        result = compare_memory(model, compile_model(model), inputs, target, loss_fn,
                                timing_steps=1, subprocess=subprocess)
        row = {"depth": depth}
        for side, m in (("eager", result.before), ("gsr", result.after)):
            for key in ("saved_bytes", "rss_rise", "rss_rise_fixed", "cuda_peak_allocated",
                        "step_seconds", "error"):
                row[f"{side}_{key}"] = getattr(m, key)
        rows.append(row)
    return rows


def plot_depth_sweep(rows: list[dict], path: str, title: str = "") -> str:
    """Writes a PNG of memory against depth (log-log) for both models, atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [("saved_bytes", "saved for backward"), ("rss_rise", "RSS rise of a step"),
              ("rss_rise_fixed", "RSS rise, fixed mmap threshold"),
              ("cuda_peak_allocated", "CUDA peak allocated")]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label in series:
        for side, style in (("eager", "-o"), ("gsr", "--s")):
            points = [(r["depth"], r[f"{side}_{key}"] / 2**20) for r in rows
                      if r.get(f"{side}_{key}") is not None]
            if points:
                ax.plot(*zip(*points), style, label=f"{side}: {label}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("residual blocks")
    ax.set_ylabel("MiB")
    ax.set_title(title or "memory of one training step against depth")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=directory)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
