"""The options of ``gsr bench``, their two presets (full and ``--quick``), and their checks.

Every option is checked, circuits included, before anything is run or written, so a typo
costs seconds rather than a failed run hours later.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from ..devices import check_device
from .baselines import BASELINES, ModelSpec, check_spec

SWEEPS = ("depth", "width", "size", "quality", "budget")
#: What runs without ``--sweeps``: the budget sweep trains every baseline for minutes, so it
#: runs when asked for.
DEFAULT_SWEEPS = ("depth", "width", "size", "quality")

#: The full run, meant for a GPU or a patient CPU (docs/bench/cpu holds a smaller CPU run).
FULL_PRESET: dict[str, Any] = dict(
    circuit="multiplier", depths=[8, 16, 32, 64, 128, 256, 512, 1024], width=64,
    widths=[16, 32, 64, 128, 256], width_depth=64,
    circuits=["c6288", "b22_Cg", "b17_Cg", "b18_Cg", "b19_Cg"], size_depth=256,
    cone_nodes=100_000, timing_steps=5,
    quality_depths=[4, 16, 64, 256], quality_steps=300, batch_nodes=4096, eval_max_nodes=20_000,
    train=None, test=None, time_budget=1800.0,
    step_budget_gib=1.0, budget_depth=256, budget_train=None, budget_test=None,
    train_seconds=600.0, budget_evals=4,
)

#: ``--quick``: a small circuit, few depths, few steps; a few minutes on a 2-core CPU.
QUICK_PRESET: dict[str, Any] = dict(
    circuit="c6288", depths=[8, 16], width=32, widths=[16, 32], width_depth=8,
    circuits=["c432", "c6288"], size_depth=8, cone_nodes=100_000, timing_steps=2,
    quality_depths=[4, 16], quality_steps=10, batch_nodes=512, eval_max_nodes=None,
    train=["c432", "c880", "c1908"], test=["c499", "c1355"], time_budget=120.0,
    step_budget_gib=1 / 256, budget_depth=16, budget_train=["c432", "c880", "c1908", "c2670"],
    budget_test=["c499", "c1355"], train_seconds=15.0, budget_evals=3,
)

#: Baselines compared for quality by default: the others compute the plain model's function.
DEFAULT_QUALITY_BASELINES = [name for name, b in BASELINES.items() if not b.same_function_as_plain]

#: ``--quick`` measures torch.compile in the depth sweep only: every other point would be a
#: new shape, hence a cold compilation (most of a minute on a 2-core CPU).
QUICK_DEPTH_ONLY = ("torch.compile",)


@dataclass
class BenchOptions:
    """Options of :func:`~gsr_compiler.bench.run.run_bench`; ``None`` takes the preset's value
    (``quick`` picks the preset)."""

    out: str = "gsr-bench"
    quick: bool = False
    device: str = "cpu"
    baselines: Optional[list[str]] = None  # default: all
    sweeps: Optional[list[str]] = None  # default: all of SWEEPS
    conv: str = "sage"
    groups: int = 2
    sparse_k: Optional[int] = None  # default: g/8, g = width/groups
    dropout: float = 0.1
    circuit: Optional[str] = None  # graph of the depth and width sweeps
    depths: Optional[list[int]] = None
    width: Optional[int] = None  # width of the depth, size and quality sweeps
    widths: Optional[list[int]] = None
    width_depth: Optional[int] = None  # depth of the width sweep
    circuits: Optional[list[str]] = None  # the size sweep, smallest first
    size_depth: Optional[int] = None
    cone_nodes: Optional[int] = None  # bigger circuits: one cone sample of this many nodes; 0: off
    timing_steps: Optional[int] = None
    quality_depths: Optional[list[int]] = None
    quality_baselines: Optional[list[str]] = None
    quality_steps: Optional[int] = None
    label: str = "level"
    batch_nodes: Optional[int] = None
    lr: float = 1e-3
    train: Optional[list[str]] = None  # default: the family split (or the quick preset's)
    test: Optional[list[str]] = None
    eval_max_nodes: Optional[int] = None
    memory_budget_gib: Optional[float] = None  # default: 80% of the memory available at start (CPU)
    # the budget sweep
    step_budget_gib: Optional[float] = None  # a training step's measured peak must fit this
    budget_depth: Optional[int] = None
    budget_train: Optional[list[str]] = None  # default: the ITC99 circuits of the family split
    budget_test: Optional[list[str]] = None  # default: the family split's test circuits
    train_seconds: Optional[float] = None  # equal wall clock of training per baseline
    budget_evals: Optional[int] = None  # test scorings over that clock
    time_budget: Optional[float] = None  # seconds per configuration
    threads: Optional[int] = None  # torch threads per measuring process (default: this process's)
    seed: int = 0
    progress: bool = True
    cache_dir: Optional[str] = None
    # resolved by resolve_options
    sweep_baselines: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def spec(self, depth: int, width: Optional[int] = None) -> ModelSpec:
        return ModelSpec(in_channels=16, width=width or self.width, depth=depth, conv=self.conv,
                         dropout=self.dropout, groups=self.groups, sparse_k=self.sparse_k)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _positive_int(flag: str, value: Any, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{flag} must be an integer >= {minimum}, got {value!r}")


def _int_list(flag: str, values: Any) -> list[int]:
    if not values:
        raise ValueError(f"{flag} needs at least one value")
    for v in values:
        _positive_int(f"every value of {flag}", v)
    if len(set(values)) != len(values):
        raise ValueError(f"{flag} lists a value twice: {values}")
    return sorted(values)  # sweeps run smallest first: a baseline stops at its first failure


def _names(flag: str, values: Any, known) -> list[str]:
    if not values:
        raise ValueError(f"{flag} needs at least one value")
    unknown = [v for v in values if v not in known]
    if unknown:
        raise ValueError(f"{flag}: unknown {', '.join(map(repr, unknown))}; choose from "
                         f"{', '.join(known)}")
    return list(dict.fromkeys(values))


def _check_circuits(flag: str, names: list[str]) -> None:
    from ..circuits.loading import resolve_circuit

    for name in names:
        try:
            resolve_circuit(name)
        except LookupError as e:
            raise ValueError(f"{flag}: {e}") from None
        except OSError as e:
            raise ValueError(f"{flag}: {e}") from None


def resolve_options(options: BenchOptions) -> BenchOptions:
    """Fills in the preset, checks every option and returns the resolved copy; raises
    ``ValueError`` with what is wrong and what to do. Writes nothing."""
    preset = QUICK_PRESET if options.quick else FULL_PRESET
    values = {k: (preset[k] if k in preset and getattr(options, k) is None else getattr(options, k))
              for k in (f.name for f in dataclasses.fields(BenchOptions))}
    o = BenchOptions(**values)
    o.notes = []

    o.device = check_device(o.device)
    o.sweeps = _names("--sweeps", o.sweeps if o.sweeps is not None else list(DEFAULT_SWEEPS),
                      SWEEPS)
    given_baselines = o.baselines is not None
    o.baselines = _names("--baselines", o.baselines if given_baselines else list(BASELINES),
                         list(BASELINES))
    if "plain" not in o.baselines:
        o.notes.append("plain is not among the baselines, so no ratios to plain are given")
    o.quality_baselines = _names(
        "--quality-baselines",
        o.quality_baselines if o.quality_baselines is not None
        else [b for b in DEFAULT_QUALITY_BASELINES if b in o.baselines], list(BASELINES))

    for flag, name in (("--depths", "depths"), ("--widths", "widths"),
                       ("--quality-depths", "quality_depths")):
        setattr(o, name, _int_list(flag, getattr(o, name)))
    for flag, name in (("--width", "width"), ("--width-depth", "width_depth"),
                       ("--size-depth", "size_depth"), ("--timing-steps", "timing_steps"),
                       ("--quality-steps", "quality_steps"), ("--batch-nodes", "batch_nodes"),
                       ("--budget-depth", "budget_depth"), ("--budget-evals", "budget_evals")):
        _positive_int(flag, getattr(o, name))
    _positive_int("--groups", o.groups)
    _positive_int("--cone-nodes", o.cone_nodes, minimum=0)
    if o.sparse_k is not None:
        _positive_int("--sparse-k", o.sparse_k)
    if o.eval_max_nodes is not None:
        _positive_int("--eval-max-nodes", o.eval_max_nodes)
    if o.threads is not None:
        _positive_int("--threads", o.threads)
    if not 0.0 <= o.dropout < 1.0:
        raise ValueError(f"--dropout must be in [0, 1), got {o.dropout!r}")
    if not (isinstance(o.lr, (int, float)) and math.isfinite(o.lr) and o.lr > 0):
        raise ValueError(f"--lr must be a positive number, got {o.lr!r}")
    for flag, value in (("--memory-budget", o.memory_budget_gib), ("--time-budget", o.time_budget),
                        ("--step-budget", o.step_budget_gib),
                        ("--train-seconds", o.train_seconds)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"{flag} must be a positive number, got {value!r}")

    # which baselines each sweep runs
    o.sweep_baselines = {}
    left_out: dict[str, list[str]] = {}
    for sweep in o.sweeps:
        names = o.quality_baselines if sweep == "quality" else list(o.baselines)
        if sweep == "budget" and not given_baselines:
            # the ladder: gsr-full already holds the top-k of gsr-sparse
            names = [b for b in names if b != "gsr-sparse"]
        if o.quick and not given_baselines and sweep in ("width", "size", "budget"):
            for b in names:
                if b in QUICK_DEPTH_ONLY:
                    left_out.setdefault(b, []).append(sweep)
            names = [b for b in names if b not in QUICK_DEPTH_ONLY]
        o.sweep_baselines[sweep] = names
    for b, sweeps in left_out.items():
        o.notes.append(f"--quick: {b} is left out of the {' and '.join(sweeps)} sweep(s): each "
                       "new shape is a cold compilation, most of a minute on a small CPU (the "
                       "full run measures it everywhere)")

    # the architecture at every width and depth that will be built
    widths = {o.width}
    if "budget" in o.sweeps:
        check_spec(o.spec(1), o.sweep_baselines["budget"])
    if "width" in o.sweeps:
        widths |= set(o.widths)
    for width in sorted(widths):
        used = sorted({b for s, names in o.sweep_baselines.items() for b in names
                       if width == o.width or s == "width"})
        check_spec(o.spec(1, width), used)

    # data
    if {"depth", "width"} & set(o.sweeps):
        _check_circuits("--circuit", [o.circuit])
    if "size" in o.sweeps:
        if not o.circuits:
            raise ValueError("--circuits needs at least one circuit")
        _check_circuits("--circuits", o.circuits)
    if "quality" in o.sweeps:
        from ..train import LABEL_TARGETS

        if o.label not in LABEL_TARGETS:
            raise ValueError(f"unknown --label {o.label!r}; choose one of "
                             f"{', '.join(LABEL_TARGETS)}")
        if o.train is None or o.test is None:
            from ..circuits import split_by_family

            split = split_by_family()
            o.train = split.train if o.train is None else o.train
            o.test = split.test if o.test is None else o.test
        _check_split("--train", o.train, "--test", o.test)

    if "budget" in o.sweeps:
        _check_budget_sweep(o)

    if os.path.exists(o.out) and not os.path.isdir(o.out):
        raise ValueError(f"--out {o.out} exists and is not a folder; pick another --out")
    return o


def _check_split(train_flag: str, train: list, test_flag: str, test: list) -> None:
    """Both lists name known circuits, at least one each, none in both."""
    for flag, names in ((train_flag, train), (test_flag, test)):
        if not names:
            raise ValueError(f"{flag} needs at least one circuit")
        _check_circuits(flag, names)
    both = sorted(set(train) & set(test))
    if both:
        raise ValueError(f"circuit(s) {', '.join(both)} are in both {train_flag} and {test_flag}")


#: The ITC99 circuits (b01..b22 and their re-syntheses), the budget sweep's training default.
_ITC99 = r"b\d\d(_.*)?"


def _check_budget_sweep(o: BenchOptions) -> None:
    import re

    from ..circuits import split_by_family
    from ..train import LABEL_TARGETS

    if o.label not in LABEL_TARGETS:
        raise ValueError(f"unknown --label {o.label!r}; choose one of {', '.join(LABEL_TARGETS)}")
    if o.budget_train is None or o.budget_test is None:
        split = split_by_family()
        if o.budget_train is None:
            o.budget_train = [c for c in split.train if re.fullmatch(_ITC99, c)]
        if o.budget_test is None:
            o.budget_test = list(split.test)
    _check_split("--budget-train", o.budget_train, "--budget-test", o.budget_test)
