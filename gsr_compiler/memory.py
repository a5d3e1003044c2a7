"""Measuring the memory of a training step honestly.

Three views, because none alone tells the truth:

* bytes autograd saves for backward (each storage counted once, parameters
  excluded), counted with ``torch.autograd.graph.saved_tensors_hooks``;
* peak memory of the step: on CUDA ``max_memory_allocated`` and ``max_memory_reserved``;
  on CPU the peak RSS in a fresh subprocess, and its rise above the RSS held before
  the step. glibc keeps freed heap memory for deep models (its mmap threshold grows),
  so the CPU figures are taken twice: with the default allocator (what users see) and
  with ``MALLOC_MMAP_THRESHOLD_`` fixed (what the model needs);
* step time, the median of several steps after a warm-up.

A step is forward, loss and backward.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from .report import format_bytes

FIXED_MMAP_THRESHOLD = 131072


@dataclass
class StepMeasurement:
    """Memory and time of one training step of one model."""

    saved_bytes: int = 0
    step_seconds: float = float("nan")
    peak_rss: int | None = None
    rss_rise: int | None = None
    peak_rss_fixed: int | None = None
    rss_rise_fixed: int | None = None
    cuda_peak_allocated: int | None = None
    cuda_peak_reserved: int | None = None
    cuda_rise_allocated: int | None = None
    error: str | None = None


def default_loss(output: Tensor, target: Tensor | None) -> Tensor:
    if target is None:
        return output.float().square().mean()
    if target.dtype in (torch.int64, torch.int32):
        return nn.functional.cross_entropy(output, target)
    return nn.functional.mse_loss(output.reshape(target.shape), target)


def _parameter_storages(model: nn.Module) -> set[int]:
    ptrs = set()
    for t in list(model.parameters()) + list(model.buffers()):
        ptrs.add(t.untyped_storage().data_ptr())
    return ptrs


def _input_storages(inputs: Sequence) -> set[int]:
    """The storages of the step's input tensors (and of a PyG ``Data``'s tensors)."""
    ptrs = set()
    for item in inputs:
        values = item.to_dict().values() if hasattr(item, "to_dict") else [item]
        for t in values:
            if isinstance(t, Tensor):
                ptrs.update(p.untyped_storage().data_ptr() for p in _dense_parts(t))
    return ptrs


def saved_bytes_of_step(model: nn.Module, inputs: Sequence, target=None,
                        loss_fn: Callable = default_loss) -> int:
    """Bytes autograd keeps for backward during one forward, each storage once,
    parameters, buffers and the step's inputs excluded (the caller holds those either way:
    keeping them costs nothing). Runs backward afterwards to free the graph."""
    exclude = _parameter_storages(model) | _input_storages(inputs)
    seen: dict[int, int] = {}

    def pack(t: Tensor):
        for part in _dense_parts(t):
            storage = part.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in exclude and ptr != 0:
                seen[ptr] = max(seen.get(ptr, 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(model(*inputs), target)
    loss.backward()
    return sum(seen.values())


def _dense_parts(t: Tensor) -> tuple[Tensor, ...]:
    """The strided tensors holding ``t``'s data: ``t`` itself, or a sparse tensor's indices
    and values (sparse tensors have no storage of their own)."""
    if t.layout in (torch.sparse_csr, torch.sparse_bsr):
        return t.crow_indices(), t.col_indices(), t.values()
    if t.layout in (torch.sparse_csc, torch.sparse_bsc):
        return t.ccol_indices(), t.row_indices(), t.values()
    if t.layout == torch.sparse_coo:
        return t._indices(), t._values()
    return (t,)


def _zero_grads(model: nn.Module) -> None:
    for p in model.parameters():
        if p.grad is not None:
            p.grad.zero_()


def _step(model, inputs, target, loss_fn) -> None:
    loss = loss_fn(model(*inputs), target)
    loss.backward()


def _rss_and_peak() -> tuple[int, int]:
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, kb = line.split()[:2]
                values[key] = int(kb) * 1024
    return values["VmRSS:"], values["VmHWM:"]


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def measure_step(model: nn.Module, inputs: Sequence, target=None,
                 loss_fn: Callable = default_loss, timing_steps: int = 3,
                 count_saved: bool = True) -> StepMeasurement:
    """Measures a step in this process (call it in a fresh process for CPU RSS).

    ``timing_steps=0`` skips the timing (``step_seconds`` stays NaN) and
    ``count_saved=False`` skips counting saved bytes, for a run that only wants the
    peak memory (e.g. the second, fixed-mmap-threshold run on CPU).
    """
    result = StepMeasurement()
    model.train()
    _step(model, inputs, target, loss_fn)  # warm-up: lazy compilation, grads allocated
    _zero_grads(model)
    device = next((t.device for t in inputs if isinstance(t, Tensor)), torch.device("cpu"))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        _step(model, inputs, target, loss_fn)
        torch.cuda.synchronize(device)
        result.cuda_peak_allocated = torch.cuda.max_memory_allocated(device)
        result.cuda_peak_reserved = torch.cuda.max_memory_reserved(device)
        result.cuda_rise_allocated = result.cuda_peak_allocated - before
    elif os.path.exists("/proc/self/status"):
        rss_before, _ = _rss_and_peak()
        if _reset_peak_rss():
            _step(model, inputs, target, loss_fn)
            _, peak = _rss_and_peak()
            result.peak_rss, result.rss_rise = peak, peak - rss_before
    _zero_grads(model)
    times = []
    for _ in range(max(timing_steps, 0)):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        _step(model, inputs, target, loss_fn)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
        _zero_grads(model)
    if times:
        result.step_seconds = statistics.median(times)
    if count_saved:
        result.saved_bytes = saved_bytes_of_step(model, inputs, target, loss_fn)
        _zero_grads(model)
    return result


def _import_path() -> list[str]:
    """The caller's module search path, so that the child imports the same packages (and
    the modules beside the caller's script) but never the script itself."""
    return [p if p else os.getcwd() for p in sys.path]


def _save_payload(payload: tuple, path: str) -> None:
    """Writes model, inputs, target and loss to ``path``. With cloudpickle, what is defined in
    the caller's ``__main__`` (a model class or a lambda loss in a script) is pickled by value,
    so the child never has to run the script to find it; the rest by reference, as usual."""
    try:
        import cloudpickle
    except ImportError:  # pragma: no cover - cloudpickle is a dependency
        cloudpickle = None
    if cloudpickle is not None:
        torch.save(payload, path, pickle_module=cloudpickle)
    else:
        torch.save(payload, path)


def measure_step_in_subprocess(model: nn.Module, inputs: Sequence, target=None,
                               loss_fn: Callable = default_loss, timing_steps: int = 3,
                               mmap_threshold: int | None = None) -> StepMeasurement:
    """Runs :func:`measure_step` in a fresh Python process (``gsr_compiler.memory_child``).

    The model travels through a temporary file, not a pipe, and the child is a new
    interpreter that does not import the caller's script: this works from a script without
    an ``if __name__ == "__main__":`` guard. When the child dies without a result (killed by
    the out-of-memory killer, a crash), the measurement carries the error at once.
    """
    with tempfile.TemporaryDirectory(prefix="gsr-measure-") as tmp:
        payload = os.path.join(tmp, "step.pt")
        result = os.path.join(tmp, "result.json")
        log = os.path.join(tmp, "stderr.txt")
        _save_payload((model, list(inputs), target, loss_fn), payload)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(_import_path()))
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
        if mmap_threshold is not None:
            env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
        with open(log, "wb") as err:
            code = subprocess.run(
                [sys.executable, "-m", "gsr_compiler.memory_child", payload, result,
                 str(timing_steps)],
                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
            ).returncode
        if os.path.exists(result):
            with open(result) as f:
                return StepMeasurement(**json.load(f))
        with open(log, errors="replace") as f:
            tail = f.read()[-2000:].strip()
    why = "; killed by a signal, often the out-of-memory killer" if code < 0 else ""
    return StepMeasurement(error=f"the measuring subprocess died (exit code {code}{why})"
                           + (f":\n{tail}" if tail else ""))


@dataclass
class MemoryComparison:
    """One training step of a model and its compiled form, side by side."""

    names: tuple[str, str]
    before: StepMeasurement
    after: StepMeasurement
    notes: list[str] = field(default_factory=list)

    ROWS = [
        ("saved for backward", "saved_bytes", True),
        ("peak RSS", "peak_rss", True),
        ("RSS rise in step", "rss_rise", True),
        (f"peak RSS, mmap threshold {FIXED_MMAP_THRESHOLD}", "peak_rss_fixed", True),
        (f"RSS rise, mmap threshold {FIXED_MMAP_THRESHOLD}", "rss_rise_fixed", True),
        ("CUDA peak allocated", "cuda_peak_allocated", True),
        ("CUDA peak reserved", "cuda_peak_reserved", True),
        ("CUDA rise allocated", "cuda_rise_allocated", True),
        ("step time (median)", "step_seconds", False),
    ]

    def ratio(self, attr: str) -> float | None:
        a, b = getattr(self.before, attr), getattr(self.after, attr)
        if a is None or b is None or not a:
            return None
        return b / a

    def rows(self) -> list[tuple[str, str, str, str]]:
        out = []
        for label, attr, is_bytes in self.ROWS:
            a, b = getattr(self.before, attr), getattr(self.after, attr)
            if a is None and b is None:
                continue
            fmt = format_bytes if is_bytes else (lambda s: f"{s * 1000:.1f} ms")
            ratio = self.ratio(attr)
            out.append((label, "-" if a is None else fmt(a), "-" if b is None else fmt(b),
                        "-" if ratio is None else f"{ratio:.3f}"))
        return out

    def __str__(self) -> str:
        header = ("", self.names[0], self.names[1], f"{self.names[1]}/{self.names[0]}")
        rows = [header] + self.rows()
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                           enumerate(zip(r, widths))) for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        for m, name in ((self.before, self.names[0]), (self.after, self.names[1])):
            if m.error:
                lines.append(f"{name} failed: {m.error}")
        return "\n".join(lines + self.notes)


def _measure(model, inputs, target, loss_fn, timing_steps, in_subprocess: bool
             ) -> StepMeasurement:
    on_cuda = any(isinstance(t, Tensor) and t.is_cuda for t in inputs)
    if on_cuda or not in_subprocess:
        return measure_step(model, inputs, target, loss_fn, timing_steps)
    m = measure_step_in_subprocess(model, inputs, target, loss_fn, timing_steps)
    if m.error is None:
        fixed = measure_step_in_subprocess(model, inputs, target, loss_fn, 1,
                                           mmap_threshold=FIXED_MMAP_THRESHOLD)
        m.peak_rss_fixed, m.rss_rise_fixed = fixed.peak_rss, fixed.rss_rise
    return m


def compare_memory(model: nn.Module, gsr_model: nn.Module, inputs: Sequence | Tensor,
                   target: Tensor | None = None, loss_fn: Callable = default_loss,
                   timing_steps: int = 3, subprocess: bool = True,
                   names: tuple[str, str] = ("eager", "gsr")) -> MemoryComparison:
    """Runs one training step of each model and compares their memory and time.

    On CPU each model is measured in fresh subprocesses (model, inputs and loss are
    pickled to it; ``subprocess=False`` measures in this process, where RSS figures
    are polluted by earlier allocations). On CUDA it is measured in this process.
    """
    inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    before = _measure(model, inputs, target, loss_fn, timing_steps, subprocess)
    after = _measure(gsr_model, inputs, target, loss_fn, timing_steps, subprocess)
    notes = []
    if not subprocess:
        notes.append("measured in-process: RSS includes earlier allocations of this process")
    if target is None:
        notes.append("loss: mean of squared outputs (no target given)")
    return MemoryComparison(names, before, after, notes)
