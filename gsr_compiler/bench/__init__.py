"""``gsr bench``: the tools people use today and GSR, side by side, on the same model and data.

>>> from gsr_compiler.bench import BenchOptions, run_bench
>>> results = run_bench(BenchOptions(quick=True, out="gsr-bench"))

Files, one concept each: :mod:`.baselines` (what is compared), :mod:`.group_add_rev` (the
hand-built PyG ``GroupAddRev`` model), :mod:`.workloads` (the graphs), :mod:`.harness`
(one configuration in a fresh process, failures recorded), :mod:`.quality` (training to a
fixed step budget and scoring), :mod:`.sweeps`, :mod:`.report` (Markdown, JSON, plots),
:mod:`.machine`, :mod:`.options` and :mod:`.run`. See ``docs/bench.md``.
"""
from .baselines import BASELINES, Baseline, ModelSpec
from .harness import Budget, Outcome, measure_configuration, run_isolated
from .options import BenchOptions, resolve_options
from .run import run_bench

__all__ = ["BASELINES", "Baseline", "ModelSpec", "Budget", "Outcome", "measure_configuration",
           "run_isolated", "BenchOptions", "resolve_options", "run_bench"]
