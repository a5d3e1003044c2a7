"""The fresh process in which ``compare_memory`` measures one CPU training step.

Started by ``memory.measure_step_in_subprocess`` as ``python -m gsr_compiler.memory_child
PAYLOAD RESULT TIMING_STEPS``: a new interpreter that never imports the caller's script
(``multiprocessing``'s spawn re-runs the script as ``__mp_main__``, which, without an
``if __name__ == "__main__":`` guard, runs the whole script again). It loads the model,
inputs, target and loss from the file PAYLOAD, measures with ``memory.measure_step`` and
writes the result (or the error) as JSON to RESULT.
"""
from __future__ import annotations

import json
import os
import sys


def main(argv: list[str]) -> int:
    payload, result_path, timing_steps = argv[0], argv[1], int(argv[2])
    try:
        import torch

        from gsr_compiler.memory import measure_step

        threads = os.environ.get("GSR_CHILD_THREADS")
        if threads:
            torch.set_num_threads(int(threads))
        try:
            model, inputs, target, loss_fn = torch.load(payload, weights_only=False)
        except Exception as e:
            raise RuntimeError(
                f"the model could not be loaded in the measuring process ({type(e).__name__}: "
                f"{e}); its classes and loss function must be importable there, or picklable "
                "by value with cloudpickle installed, or pass subprocess=False") from e
        os.unlink(payload)  # the file is no longer needed; keep the page cache out of it
        from dataclasses import asdict
        result = asdict(measure_step(model, inputs, target, loss_fn, timing_steps))
    except BaseException as e:  # reported to the parent, which never waits on a dead child
        result = {"error": f"{type(e).__name__}: {e}"}
    with open(result_path + ".part", "w") as f:
        json.dump(result, f)
    os.replace(result_path + ".part", result_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
