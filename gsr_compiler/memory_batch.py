"""The RSS rise of several training steps, measured one after another in one fresh process.

A check over a grid of configurations (``benchmarks/bench_peak_prediction.py``, the prediction
tests) would spend most of its time starting interpreters if every configuration had its own,
as ``compare_memory`` does. With ``MALLOC_MMAP_THRESHOLD_`` fixed, glibc returns every freed
block above the threshold at once, so one configuration's step leaves nothing behind that the
next could reuse and hide: each step is measured as in :func:`gsr_compiler.memory.measure_step`
(a warm-up step, then the RSS rise of one step), the model is dropped and the heap trimmed
before the next. Run ``python -m gsr_compiler.memory_batch PAYLOAD RESULT`` through
:func:`measure_rss_rises`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Sequence

from .memory import FIXED_MMAP_THRESHOLD, _import_path, _save_payload

__all__ = ["measure_rss_rises"]


def measure_rss_rises(cases: Sequence[tuple], mmap_threshold: int = FIXED_MMAP_THRESHOLD,
                      threads: int = 1) -> list:
    """RSS rise in bytes of one training step of each ``(model, inputs, target)``, in order,
    in one fresh process (None for a case that failed); raises when the process dies."""
    with tempfile.TemporaryDirectory(prefix="gsr-measure-") as tmp:
        payload, result = os.path.join(tmp, "cases.pt"), os.path.join(tmp, "result.json")
        _save_payload(tuple(cases), payload)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(_import_path()),
                   MALLOC_MMAP_THRESHOLD_=str(mmap_threshold), OMP_NUM_THREADS=str(threads))
        done = subprocess.run([sys.executable, "-m", "gsr_compiler.memory_batch", payload, result],
                              env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if not os.path.exists(result):
            raise RuntimeError(f"the measuring process died (exit code {done.returncode}):\n"
                               + done.stderr[-2000:])
        with open(result) as f:
            return json.load(f)


def _main(payload: str, result: str) -> int:
    import ctypes
    import gc

    import torch

    from .memory import measure_step

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cases = list(torch.load(payload, weights_only=False))
    os.unlink(payload)
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except OSError:  # pragma: no cover - not glibc
        trim = None
    rises = []
    for i in range(len(cases)):
        model, inputs, target = cases[i]
        try:
            m = measure_step(model, list(inputs), target, timing_steps=0, count_saved=False)
            rises.append(m.rss_rise)
        except Exception:
            rises.append(None)
        cases[i] = None
        del model, inputs, target
        gc.collect()
        if trim is not None:
            trim(0)
    with open(result, "w") as f:
        json.dump(rises, f)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1], sys.argv[2]))
