"""The summary at the top of ``results.md``: GSR full against every baseline at the deepest
point where the plain model ran, and its quality against plain's, read off the sweeps.

Memory is the rise of the step above the memory held before it: on CUDA the peak allocated
bytes, on CPU the RSS rise measured with the mmap threshold fixed (what the model needs, see
``docs/memory.md``), with the default allocator's figure beside it. Nothing here is measured
again; every figure comes from the rows of the depth and quality sweeps.
"""
from __future__ import annotations

from typing import Optional

from .report import _fmt_bytes as fmt_bytes
from .report import _fmt_float as fmt_float
from .report import _fmt_seconds as fmt_seconds
from .report import _measurement as measurement
from .report import _rows as rows_of
from .report import _table as table

GSR_FULL = "gsr-full"


def memory_key(cuda: bool) -> str:
    return "cuda_peak_allocated" if cuda else "rss_rise_fixed"


def _deepest_plain_point(rows: list[dict]) -> Optional[str]:
    """The depth-sweep point with the largest depth at which ``plain`` measured."""
    ran = [r for r in rows if r["baseline"] == "plain" and r["outcome"]["status"] == "ok"]
    if not ran:
        return None
    return max(ran, key=lambda r: r["values"]["depth"])["point"]


def _memory_lines(results: dict) -> list[str]:
    rows = rows_of(results, "depth")
    point = _deepest_plain_point(rows)
    if point is None:
        return []
    cuda = str(results["options"]["device"]).startswith("cuda")
    key = memory_key(cuda)
    at_point = [r for r in rows if r["point"] == point]
    plain = next(r for r in at_point if r["baseline"] == "plain")
    plain_memory = measurement(plain, key)
    gsr = next((r for r in at_point if r["baseline"] == GSR_FULL), None)
    gar = next((r for r in at_point if r["baseline"] == "groupaddrev"), None)
    workload = at_point[0].get("workload") or {}
    where = f"{point}, {workload.get('name', '?')} ({workload.get('nodes', 0):,} nodes)"
    memory_title = "peak allocated" if cuda else "RSS rise, fixed mmap threshold"
    header = ["baseline", memory_title, "below plain"]
    if not cuda:
        header.append("RSS rise, default allocator")
    header += ["step time", "/ plain"]
    plain_step = measurement(plain, "step_seconds")
    body = []
    for row in at_point:
        ok = row["outcome"]["status"] == "ok"
        memory = measurement(row, key)
        below = (1 - memory / plain_memory) if ok and memory is not None and plain_memory else None
        step = measurement(row, "step_seconds")
        cells = [f"`{row['baseline']}`" + ("" if ok else f" ({row['outcome']['status']})"),
                 fmt_bytes(memory), "-" if below is None else f"{below:.1%}"]
        if not cuda:
            cells.append(fmt_bytes(measurement(row, "rss_rise")))
        cells += [fmt_seconds(step), fmt_float(step / plain_step if step and plain_step else None)]
        body.append(cells)
    lines = [f"At the deepest point where the plain model ran ({where}):", ""]
    lines += table(header, body) + [""]
    if gsr is None or gsr["outcome"]["status"] != "ok":
        lines.append(f"`{GSR_FULL}` did not run at this point.")
        return lines + [""]
    gsr_memory = measurement(gsr, key)
    others = [r for r in at_point if r is not gsr and r["outcome"]["status"] == "ok"
              and measurement(r, key) is not None]
    lower = [r["baseline"] for r in others if measurement(r, key) <= gsr_memory]
    if plain_memory and gsr_memory is not None:
        lines.append(f"- Memory: `{GSR_FULL}` {fmt_bytes(gsr_memory)} against plain's "
                     f"{fmt_bytes(plain_memory)}, {1 - gsr_memory / plain_memory:.1%} below; "
                     + ("the lowest of all baselines." if not lower else
                        f"not the lowest: {', '.join(f'`{b}`' for b in lower)} used as little "
                        "or less."))
    gsr_step = measurement(gsr, "step_seconds")
    parts = []
    if gsr_step and plain_step:
        parts.append(f"{gsr_step / plain_step:.2f}x the plain model's step")
    if gar is not None and gsr_step and measurement(gar, "step_seconds"):
        parts.append(f"{measurement(gar, 'step_seconds') / gsr_step:.2f}x as fast as "
                     "`groupaddrev`")
    if parts:
        device = "GPU" if cuda else "CPU"
        lines.append(f"- Step time ({device}): `{GSR_FULL}` " + ", ".join(parts) + ".")
    return lines + [""]


def _quality_lines(results: dict) -> list[str]:
    rows = rows_of(results, "quality")
    if not rows:
        return []
    label = results["options"].get("label", "level")
    lines = []
    deltas = []
    for row in rows:
        if row["baseline"] != GSR_FULL or measurement(row, "kendall") is None:
            continue
        plain = next((r for r in rows if r["point"] == row["point"] and r["baseline"] == "plain"),
                     None)
        plain_kendall = measurement(plain, "kendall") if plain else None
        if plain_kendall is not None:
            deltas.append((row["values"]["depth"], measurement(row, "kendall") - plain_kendall))
    if deltas:
        lines.append(f"- Quality (`{label}`, test Kendall, equal steps): `{GSR_FULL}` minus plain "
                     + ", ".join(f"{d:+.3f} at depth {depth}" for depth, d in deltas) + ".")
    scored = [(r["values"]["depth"], measurement(r, "kendall")) for r in rows
              if r["baseline"] == GSR_FULL and measurement(r, "kendall") is not None]
    if len(scored) >= 2:
        (shallow, k_shallow), (deep, k_deep) = min(scored), max(scored)
        lines.append(f"- Depth: `{GSR_FULL}` at depth {deep} scores Kendall {k_deep:.3f}, "
                     f"at depth {shallow} {k_shallow:.3f} ({k_deep - k_shallow:+.3f}).")
    return lines + ([""] if lines else [])


def summary_section(results: dict) -> list[str]:
    """``## Summary`` lines, or none when the sweeps it reads did not run."""
    body = _memory_lines(results) + _quality_lines(results)
    if not body:
        return []
    return ["## Summary", ""] + body
