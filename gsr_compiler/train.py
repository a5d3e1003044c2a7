"""``gsr train``: train a deep residual GNN on real circuits, evaluate it on held-out ones.

The task is per-node regression of one circuit label (:mod:`gsr_compiler.circuits`):

==================  =========================  ======================
``--label``         regression target          cone direction
==================  =========================  ======================
``level``           ``level_norm`` (level/depth)  fan-in
``reverse_level``   ``reverse_level_norm``      fan-out
``prob``            ``prob``                    fan-in
``toggle``          ``toggle``                  fan-in
==================  =========================  ======================

Circuits are split by family (:func:`~gsr_compiler.circuits.split_by_family`: the deep
EPFL arithmetic circuits are the test set) unless ``train``/``val``/``test`` lists are
given. Each step trains on one batch of at most ``batch_nodes`` nodes: cone samples
(:class:`~gsr_compiler.circuits.ConeSampler`, whose every node keeps its exact label)
packed together, or whole circuits with ``full_graphs=True``. The batch of step ``s`` is a
pure function of ``(seed, s)``, and checkpoints hold the model, the optimizer, the step and
the torch random state, so ``resume`` continues a run exactly where it stopped.

Outputs in ``out``: ``checkpoint.pt`` (written atomically), ``metrics.json`` (test metrics
per circuit and averaged, validation history, timings) and ``scatter.png`` (predicted vs
true on each test circuit). See ``docs/training.md``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import re
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["TrainConfig", "TrainResult", "LABEL_TARGETS", "train", "validate_config"]

#: ``--label`` -> the ``Data`` attribute regressed, and the cone direction that keeps it exact.
LABEL_TARGETS: dict[str, tuple[str, str]] = {
    "level": ("level_norm", "fanin"),
    "reverse_level": ("reverse_level_norm", "fanout"),
    "prob": ("prob", "fanin"),
    "toggle": ("toggle", "fanin"),
}

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"
SCATTER = "scatter.png"
CHECKPOINT_VERSION = 1

# Options that define the run: a checkpoint may only be resumed with the same values.
# (steps, eval_every, checkpoint_every, device, out and progress may change on resume.)
_RUN_DEFINING = ("label", "conv", "depth", "width", "groups", "gsr", "sparse_k", "dropout", "lr",
                 "weight_decay", "clip", "batch_nodes", "full_graphs", "train", "seed",
                 "memory_budget")


@dataclass
class TrainConfig:
    """Options of :func:`train` (the ``gsr train`` flags, same names)."""

    label: str = "level"
    conv: str = "sage"
    depth: int = 16
    width: int = 32
    groups: int = 2
    gsr: bool = False
    sparse_k: Optional[int] = None  # with gsr: GSRConfig.sparse_k (None: dense ReLU)
    dropout: float = 0.0
    steps: int = 200
    lr: float = 1e-3
    weight_decay: float = 0.0
    clip: Optional[float] = 1.0  # gradient-norm clipping; None or 0: off
    batch_nodes: int = 4096
    full_graphs: bool = False
    train: Optional[list[str]] = None  # None: split_by_family() sides
    val: Optional[list[str]] = None
    test: Optional[list[str]] = None
    eval_every: int = 50  # 0: validate only at the end
    eval_max_nodes: Optional[int] = None  # bigger eval circuits: scored on cone samples
    checkpoint_every: Optional[int] = None  # default: eval_every (or only at the end)
    seed: int = 0
    device: str = "cpu"
    out: str = "gsr-train"
    resume: Optional[str] = None  # a checkpoint path, or "auto" for <out>/checkpoint.pt
    overwrite: bool = False
    progress: bool = True
    cache_dir: Optional[str] = None
    memory_budget: Optional[str] = None  # bytes a step may use ("6GiB"): sizes the batches

    def run_defining(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in _RUN_DEFINING}


@dataclass
class TrainResult:
    """What :func:`train` returns (``metrics`` is what ``metrics.json`` holds)."""

    metrics: dict
    out_dir: str
    checkpoint: str
    metrics_path: str
    scatter_path: Optional[str]
    model: nn.Module = field(repr=False)


# ----------------------------------------------------------------------------- options


def _positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"--{name.replace('_', '-')} must be an integer >= {minimum}, "
                         f"got {value!r}")


def _circuit_names(names: Optional[Sequence[str]], side: str) -> Optional[list[str]]:
    if names is None:
        return None
    from .circuits.loading import resolve_circuit

    names = [str(n) for n in names]
    if not names and side != "val":
        raise ValueError(f"--{side} needs at least one circuit")
    for name in names:
        resolve_circuit(name)  # UnknownCircuitError (near matches) / FileNotFoundError
    return names


def _resume_path(cfg: TrainConfig) -> Optional[str]:
    if cfg.resume is None:
        return None
    return os.path.join(cfg.out, CHECKPOINT) if cfg.resume == "auto" else cfg.resume


def validate_config(cfg: TrainConfig) -> TrainConfig:
    """Checks every option and resolves the circuit split; raises ``ValueError``,
    ``LookupError`` or ``OSError`` with a clear message. Writes nothing."""
    from .circuits import split_by_family
    from .models import CONVS

    if cfg.label not in LABEL_TARGETS:
        raise ValueError(f"unknown label {cfg.label!r}; choose one of {', '.join(LABEL_TARGETS)}")
    if cfg.conv not in CONVS:
        raise ValueError(f"unknown conv {cfg.conv!r}; choose one of {', '.join(CONVS)}")
    for name in ("depth", "width", "steps", "batch_nodes"):
        _positive_int(name, getattr(cfg, name))
    _positive_int("eval_every", cfg.eval_every, minimum=0)
    if cfg.checkpoint_every is not None:
        _positive_int("checkpoint_every", cfg.checkpoint_every)
    if cfg.eval_max_nodes is not None:
        _positive_int("eval_max_nodes", cfg.eval_max_nodes)
    if not (isinstance(cfg.lr, (int, float)) and math.isfinite(cfg.lr) and cfg.lr > 0):
        raise ValueError(f"--lr must be a positive number, got {cfg.lr!r}")
    if not (math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0):
        raise ValueError(f"--weight-decay must be >= 0, got {cfg.weight_decay!r}")
    if cfg.clip is not None and not (math.isfinite(cfg.clip) and cfg.clip >= 0):
        raise ValueError(f"--clip must be >= 0 (0: no clipping), got {cfg.clip!r}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"--dropout must be in [0, 1), got {cfg.dropout!r}")
    if cfg.gsr:
        from .config import GSRConfig

        GSRConfig(groups=cfg.groups)  # GSRCompileError (a clear message) for groups < 2
        if cfg.width % cfg.groups:
            raise ValueError(f"--width {cfg.width} is not divisible by --groups {cfg.groups}: "
                             "each reversible group gets width/groups channels")
    branch_width = cfg.width // cfg.groups if cfg.gsr else cfg.width
    if cfg.sparse_k is not None:
        if not cfg.gsr:
            raise ValueError("--sparse-k needs --gsr: the group top-k replaces the ReLU inside "
                             "reversible blocks")
        _positive_int("sparse_k", cfg.sparse_k)
        if cfg.sparse_k > branch_width:
            raise ValueError(f"--sparse-k {cfg.sparse_k} must be in 1..{branch_width} (the width "
                             f"of one reversible group, width/groups)")
    if cfg.conv == "gat" and branch_width % 4:
        raise ValueError(f"--conv gat uses 4 heads, so the branch width ({branch_width}"
                         f"{' = width/groups' if cfg.gsr else ''}) must be a multiple of 4")
    from .devices import check_device
    from .train_budget import validate_budget

    device = check_device(cfg.device)
    validate_budget(cfg.memory_budget)

    # the circuit split
    train_names = _circuit_names(cfg.train, "train")
    val_names = _circuit_names(cfg.val, "val")
    test_names = _circuit_names(cfg.test, "test")
    if train_names is None or test_names is None:
        split = split_by_family()
        train_names = split.train if train_names is None else train_names
        test_names = split.test if test_names is None else test_names
        if val_names is None and cfg.train is None and cfg.test is None:
            val_names = split.val
    sides = {"train": train_names, "val": val_names or [], "test": test_names}
    for a, b in (("train", "test"), ("train", "val")):
        both = sorted(set(sides[a]) & set(sides[b]))
        if both:
            raise ValueError(f"circuit(s) {', '.join(both)} are in both --{a} and --{b}")

    # the output folder
    resume = _resume_path(cfg)
    existing = os.path.join(cfg.out, CHECKPOINT)
    if resume is not None:
        if not os.path.isfile(resume):
            raise FileNotFoundError(f"--resume: no checkpoint at {resume}")
    elif os.path.exists(existing) and not cfg.overwrite:
        raise ValueError(f"{cfg.out} already holds a run ({existing}); pass --resume to continue "
                         "it or --overwrite to start over")
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise ValueError(f"--out {cfg.out} exists and is not a folder")

    return dataclasses.replace(cfg, train=list(sides["train"]), val=list(sides["val"]),
                               test=list(sides["test"]), device=device,
                               clip=cfg.clip if cfg.clip else None)


# ----------------------------------------------------------------------------- batches


@dataclass
class _Batch:
    x: Tensor
    edge_index: Tensor
    target: Tensor
    mask: Tensor

    @property
    def num_nodes(self) -> int:
        return int(self.x.shape[0])

    def to(self, device: torch.device) -> "_Batch":
        return _Batch(*(t.to(device, non_blocking=True) for t in
                        (self.x, self.edge_index, self.target, self.mask)))


def _pack(parts: Sequence[tuple[Tensor, Tensor, Tensor, Tensor]]) -> _Batch:
    """Disjoint union of graphs (x, edge_index, target, mask)."""
    if len(parts) == 1:
        return _Batch(*parts[0])
    offsets = np.cumsum([0] + [p[0].shape[0] for p in parts[:-1]])
    return _Batch(
        torch.cat([p[0] for p in parts]),
        torch.cat([p[1] + int(o) for p, o in zip(parts, offsets)], dim=1),
        torch.cat([p[2] for p in parts]),
        torch.cat([p[3] for p in parts]),
    )


def _graph(data, target: str, mask=None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    mask = torch.ones(data.num_nodes, dtype=torch.bool) if mask is None else mask
    return data.x.float(), data.edge_index, getattr(data, target).float(), mask


class _BatchSchedule:
    """Batch of step ``s`` as a pure function of ``(seed, s)``: resuming needs no sampler state."""

    def __init__(self, datas: list, cfg: TrainConfig) -> None:
        from .circuits import ConeSampler

        self.datas, self.seed, self.budget = datas, cfg.seed, cfg.batch_nodes
        self.target, direction = LABEL_TARGETS[cfg.label]
        sizes = np.array([d.num_nodes for d in datas], dtype=np.float64)
        if cfg.full_graphs:
            self.sampler = None
            # whole circuits, packed largest first into batches of at most batch_nodes
            # (a circuit bigger than that is a batch of its own); batch order shuffled per epoch
            bins: list[list[int]] = []
            room: list[int] = []
            for i in np.argsort(-sizes, kind="stable"):
                n = int(sizes[i])
                j = next((j for j, r in enumerate(room) if r >= n), None)
                if j is None:
                    bins.append([int(i)])
                    room.append(self.budget - n)
                else:
                    bins[j].append(int(i))
                    room[j] -= n
            self.bins = [_pack([_graph(datas[i], self.target) for i in b]) for b in bins]
        else:
            self.sampler = ConeSampler(datas, cfg.batch_nodes, direction=direction,
                                       shuffle=False, seed=cfg.seed)
            self.weights = sizes / sizes.sum()  # every node equally likely

    def __call__(self, step: int) -> _Batch:
        rng = np.random.default_rng([self.seed, step])
        if self.sampler is None:
            epoch, i = divmod(step, len(self.bins))
            order = np.random.default_rng([self.seed, epoch, 1]).permutation(len(self.bins))
            return self.bins[int(order[i])]
        # Circuits in a random order weighted by size, each at most once per batch: a circuit
        # that fits what is left of the budget whole, a bigger one as a cone sample of that
        # size. Stops when the budget is (nearly) full or after 8 circuits that did not fit.
        self.sampler.rng = rng
        order = rng.choice(len(self.datas), size=len(self.datas), replace=False, p=self.weights)
        parts, total, misses = [], 0, 0
        try:
            for i in order:
                left = self.budget - total
                if left < 32 or misses >= 8:
                    break
                self.sampler.max_nodes = left
                try:
                    sample = self.sampler.sample(int(i))
                except ValueError:  # no cone of this circuit fits in what is left
                    misses += 1
                    continue
                parts.append(_graph(sample, self.target, sample.score_mask))
                total += sample.num_nodes
        finally:
            self.sampler.max_nodes = self.budget
        return _pack(parts)


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def predict(model: nn.Module, data, cfg: TrainConfig, device: torch.device
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(pred, target, scored)`` for every node of one circuit.

    The full graph in one forward pass, or, for circuits bigger than ``eval_max_nodes``,
    fixed cone samples covering the circuit (``scored`` marks nodes whose whole cone was in
    a sample; the deepest nodes of very deep circuits may be left out).
    """
    from .circuits import ConeSampler

    target_name, direction = LABEL_TARGETS[cfg.label]
    target = getattr(data, target_name).float().numpy()
    model.eval()
    if cfg.eval_max_nodes is None or data.num_nodes <= cfg.eval_max_nodes:
        pred = model(data.x.float().to(device), data.edge_index.to(device))
        return pred.squeeze(-1).float().cpu().numpy(), target, np.ones(target.size, bool)
    pred = np.zeros(target.size, np.float32)
    scored = np.zeros(target.size, bool)
    sampler = ConeSampler(data, cfg.eval_max_nodes, direction=direction, shuffle=False,
                          seed=cfg.seed + 12345)
    for sample in sampler:
        out = model(sample.x.float().to(device), sample.edge_index.to(device))
        keep = sample.score_mask.numpy()
        nodes = sample.n_id.numpy()[keep]
        pred[nodes] = out.squeeze(-1).float().cpu().numpy()[keep]
        scored[nodes] = True
    return pred, target, scored


def evaluate(model: nn.Module, datas: list, cfg: TrainConfig, device: torch.device,
             keep_predictions: bool = False) -> tuple[dict, dict]:
    """Metrics per circuit and their average; optionally the predictions too."""
    from .circuits import average_metrics, regression_metrics

    per, preds = {}, {}
    for data in datas:
        pred, target, scored = predict(model, data, cfg, device)
        if not np.isfinite(pred[scored]).all():
            raise FloatingPointError(f"the model predicts NaN/inf on {data.name}")
        per[data.name] = regression_metrics(pred, target, scored)
        if keep_predictions:
            preds[data.name] = (pred[scored], target[scored])
    return {"per_circuit": per, "average": average_metrics(per) if per else {}}, preds


def _jsonable(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None  # strict JSON has no NaN
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "as_dict"):
        return _jsonable(value.as_dict())
    return value


# ----------------------------------------------------------------------------- files


def _partial_affixes(path: str) -> tuple[str, str]:
    """Prefix and suffix of the temporary file an atomic write of ``path`` goes through."""
    return f".{os.path.basename(path)}.", os.path.splitext(path)[1]


def _umask() -> int:
    mask = os.umask(0)  # the only way to read the umask is to set it
    os.umask(mask)
    return mask


def _atomic_write(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, fsync, then ``os.replace``."""
    folder = os.path.dirname(os.path.abspath(path))
    prefix, suffix = _partial_affixes(path)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=suffix)
    try:
        try:
            # mkstemp creates the file 0600; the result should follow the umask, as open() does
            os.fchmod(fd, 0o666 & ~_umask())
        finally:
            os.close(fd)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _remove_partials(folder: str, names: Sequence[str]) -> list[str]:
    """Removes the temporary files that atomic writes of ``names`` left in ``folder`` when the
    process was killed mid-way (only names of that pattern: mkstemp adds 8 of [a-z0-9_])."""
    patterns = [re.compile(re.escape(prefix) + "[a-z0-9_]{8}" + re.escape(suffix))
                for prefix, suffix in map(_partial_affixes, names)]
    removed = []
    for entry in sorted(os.listdir(folder)):
        path = os.path.join(folder, entry)
        if any(p.fullmatch(entry) for p in patterns) and os.path.isfile(path):
            os.unlink(path)
            removed.append(path)
    return removed


def _check_writable(folder: str) -> None:
    """Creates and removes a file in ``folder`` (or, when it does not exist yet, in the nearest
    folder above it, where it will be created), so that a folder that cannot hold the outputs
    stops the run before training, not at its first checkpoint. Leaves nothing behind: a bad
    circuit found later must not leave an empty output folder."""
    where = os.path.abspath(folder)
    while not os.path.exists(where) and os.path.dirname(where) != where:
        where = os.path.dirname(where)
    doing = "creating a file in it" if where == os.path.abspath(folder) else \
        f"creating it (a file in {where})"
    try:
        if not os.path.isdir(where):
            raise NotADirectoryError(20, f"{where} is not a folder")
        # named like the checkpoint's temporary file: if killed here, the next start removes it
        prefix, suffix = _partial_affixes(CHECKPOINT)
        fd, probe = tempfile.mkstemp(dir=where, prefix=prefix, suffix=suffix)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OSError(f"--out {folder} cannot be written: {doing} failed ({e.strerror or e}); "
                      "choose a folder you can create files in") from e


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# What a checkpoint holds: key -> (test, what it must be). Checked before resuming from one.
_CHECKPOINT_ENTRIES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "version": (_is_int, "an integer"),
    "config": (lambda v: isinstance(v, dict), "a dict of options"),
    "step": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "model": (lambda v: isinstance(v, dict), "a model state_dict"),
    "optimizer": (lambda v: isinstance(v, dict) and isinstance(v.get("state"), dict)
                  and isinstance(v.get("param_groups"), list), "an optimizer state_dict"),
    "rng": (lambda v: isinstance(v, dict) and isinstance(v.get("torch"), Tensor)
            and v["torch"].dtype == torch.uint8, "a dict holding the torch random state"),
    "history": (lambda v: isinstance(v, list) and all(isinstance(r, dict) for r in v),
                "a list of dicts"),
    "train_seconds": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
                      "a number"),
}


def _unusable(path: str, what: str) -> ValueError:
    return ValueError(f"--resume {path}: {what}; it is not a usable gsr train checkpoint. Resume "
                      "from another checkpoint, or start over with --overwrite instead of --resume")


def _load_checkpoint(path: str) -> dict:
    """The checkpoint at ``path``, its structure checked; a ``ValueError`` that names the file
    and what is wrong otherwise. Only tensors and plain values are loaded
    (``weights_only=True``): loading a checkpoint must not run code."""
    with open(path, "rb") as f:  # an unreadable file: OSError, which names it
        empty = os.fstat(f.fileno()).st_size == 0
        archive = zipfile.is_zipfile(f)
    if empty:
        raise _unusable(path, "the file is empty")
    if not archive:  # torch.save writes a zip archive; a cut-off one lacks its directory
        raise _unusable(path, "it is not a torch.save archive (the file is truncated, or is "
                              "another kind of file)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if isinstance(e, pickle.UnpicklingError) and reason.startswith("Weights only"):
            raise _unusable(path, "it holds more than tensors and plain values (it is "
                                  "corrupted, or was not written by gsr train), and nothing "
                                  "else is loaded since that could run code") from e
        raise _unusable(path, f"it cannot be read, it is corrupted ({reason})") from e
    if not isinstance(checkpoint, dict):
        raise _unusable(path, f"it holds a {type(checkpoint).__name__}, not a dict")
    missing = [k for k in _CHECKPOINT_ENTRIES if k not in checkpoint]
    if missing:
        raise _unusable(path, f"it lacks {', '.join(map(repr, missing))}")
    for key, (ok, what) in _CHECKPOINT_ENTRIES.items():
        if not ok(checkpoint[key]):
            value = checkpoint[key]
            got = repr(value) if isinstance(value, (int, float, str)) else \
                f"a {type(value).__name__}"
            raise _unusable(path, f"its {key!r} is not {what} (it is {got})")
    if checkpoint["version"] != CHECKPOINT_VERSION:
        raise _unusable(path, f"it is of version {checkpoint['version']}; this gsr train reads "
                              f"version {CHECKPOINT_VERSION}")
    return checkpoint


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _rng_untouched(device: torch.device):
    """Evaluation must not move the training random stream (the first ``eval()`` call of a
    compiled model traces and initializes layers): resumed runs stay exact."""
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    return torch.random.fork_rng(devices=cuda)


def save_scatter(preds: dict, metrics: dict, path: str, title: str) -> str:
    """Predicted vs true per test circuit, one panel each (PNG, written atomically)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(preds)
    cols = min(3, max(1, len(names)))
    rows = max(1, math.ceil(len(names) / cols))
    fig = Figure(figsize=(4 * cols, 3.6 * rows + 0.5), dpi=100)
    FigureCanvasAgg(fig)
    rng = np.random.default_rng(0)
    for k, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, k + 1)
        pred, true = preds[name]
        if true.size > 20_000:  # keep the file small; the metrics use every node
            pick = rng.choice(true.size, 20_000, replace=False)
            pred, true = pred[pick], true[pick]
        ax.scatter(true, pred, s=2, alpha=0.25, linewidths=0, rasterized=True)
        if true.size:
            lo, hi = float(min(true.min(), pred.min())), float(max(true.max(), pred.max()))
            ax.plot([lo, hi], [lo, hi], color="gray", lw=0.8, ls="--")
        m = metrics[name]
        ax.set_title(f"{name}: r={m.pearson:.3f}, tau={m.kendall:.3f}", fontsize=9)
        ax.set_xlabel("true", fontsize=8)
        ax.set_ylabel("predicted", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path


# ----------------------------------------------------------------------------- training


def _build_model(cfg: TrainConfig, in_channels: int, example: _Batch,
                 device: torch.device) -> nn.Module:
    from .models import ResidualGNN

    torch.manual_seed(cfg.seed)
    model = ResidualGNN(in_channels, cfg.width, 1, cfg.depth, conv=cfg.conv,
                        dropout=cfg.dropout).to(device)
    if cfg.gsr:
        from . import gsr_compile

        # example_inputs compiles now, so the optimizer sees the rewritten parameters
        model = gsr_compile(model, groups=cfg.groups, sparse_k=cfg.sparse_k,
                            example_inputs=(example.x, example.edge_index))
    return model


def _describe_compile(cfg: TrainConfig) -> str:
    if not cfg.gsr:
        return "plain"
    sparse = f", sparse_k={cfg.sparse_k}" if cfg.sparse_k is not None else ""
    return f"gsr_compile groups={cfg.groups}{sparse}"


def _load_circuits(names: Sequence[str], cfg: TrainConfig, log,
                   loaded: Optional[dict] = None) -> list:
    from .circuits import load_circuit

    datas = []
    for name in names:
        key = (name, cfg.label)
        data = loaded.get(key) if loaded is not None else None
        if data is None:
            data = load_circuit(name, labels=(cfg.label,), cache_dir=cfg.cache_dir)
            if loaded is not None:
                loaded[key] = data
        datas.append(data)
    if names:
        log(f"  {len(names)} circuit(s), {sum(d.num_nodes for d in datas):,} nodes")
    return datas


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: _Batch,
               clip: Optional[float]) -> float:
    """One optimizer step on ``batch``: mean squared error over its scored nodes, gradient
    norm clipped to ``clip`` (None or 0: off). Returns the loss."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    pred = model(batch.x, batch.edge_index).squeeze(-1)
    loss = torch.nn.functional.mse_loss(pred[batch.mask], batch.target[batch.mask])
    loss.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    return loss.item()


def train(cfg: TrainConfig, log: Callable[[str], None] = print,
          loaded: Optional[dict] = None) -> TrainResult:
    """Trains (or resumes) a run; writes the checkpoint, ``metrics.json`` and ``scatter.png``.

    ``loaded``: an optional dict ``{(circuit, label): Data}`` reused and filled across calls
    (a script that trains many models loads each circuit once).
    """
    from tqdm import tqdm

    cfg = validate_config(cfg)
    device = torch.device(cfg.device)
    resume = _resume_path(cfg)
    checkpoint = None
    if resume is not None:
        checkpoint = _load_checkpoint(resume)
        saved = checkpoint["config"]
        differ = [f"{k}: checkpoint {saved.get(k)!r}, now {v!r}"
                  for k, v in cfg.run_defining().items() if saved.get(k) != v]
        if differ:
            raise ValueError(f"--resume {resume} was made with other options:\n  "
                             + "\n  ".join(differ))
        if checkpoint["step"] > cfg.steps:
            raise ValueError(f"--resume {resume} is at step {checkpoint['step']}, beyond "
                             f"--steps {cfg.steps}")
        if checkpoint.get("world_size", 1) != 1:  # docs/distributed.md
            raise ValueError(f"--resume {resume} was written by {checkpoint['world_size']} "
                             "data-parallel ranks; resume it with --nproc "
                             f"{checkpoint['world_size']} (batches and random streams are per "
                             "rank)")
    _check_writable(cfg.out)
    if os.path.isdir(cfg.out):
        for path in _remove_partials(cfg.out, (CHECKPOINT, METRICS, SCATTER)):
            log(f"removed {path}, left by a write that was interrupted")

    target_name, _ = LABEL_TARGETS[cfg.label]
    log(f"task: {cfg.label} (regress {target_name}); model: {cfg.depth} x {cfg.conv}, width "
        f"{cfg.width}, {_describe_compile(cfg)}; "
        f"device {device}")
    log("loading train circuits")
    train_data = _load_circuits(cfg.train, cfg, log, loaded)
    log("loading validation circuits" if cfg.val else "no validation circuits")
    val_data = _load_circuits(cfg.val, cfg, log, loaded)
    log("loading test circuits")
    test_data = _load_circuits(cfg.test, cfg, log, loaded)

    os.makedirs(cfg.out, exist_ok=True)  # the circuits loaded: the run will write here
    schedule = _BatchSchedule(train_data, cfg)
    start = checkpoint["step"] if checkpoint else 0
    model = _build_model(cfg, train_data[0].x.shape[1], schedule(start).to(device), device)
    guard = None
    if cfg.memory_budget is not None:  # batches sized to the budget (train_budget.py)
        from .train_budget import fit_batches_to_budget

        sized, guard = fit_batches_to_budget(model, cfg, schedule(start), train_data, log)
        schedule = _BatchSchedule(train_data, sized)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    history: list[dict] = []
    train_seconds = 0.0
    if checkpoint:
        try:
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            _set_rng_state(checkpoint["rng"], device)
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise _unusable(resume, f"its saved state does not fit this model ({reason})") from e
        history = checkpoint["history"]
        train_seconds = checkpoint["train_seconds"]
        log(f"resumed {resume} at step {start}")
    else:
        torch.manual_seed(cfg.seed + 1)  # the stream dropout draws from
    num_params = sum(p.numel() for p in model.parameters())
    log(f"{num_params:,} parameters; {cfg.steps - start} step(s) to go, batches of up to "
        f"{schedule.budget} nodes ({'whole circuits' if schedule.sampler is None else 'cone samples'})")

    checkpoint_path = os.path.join(cfg.out, CHECKPOINT)
    every_ckpt = cfg.checkpoint_every or cfg.eval_every or cfg.steps

    def save_checkpoint(step: int) -> None:
        state = {"version": CHECKPOINT_VERSION, "config": cfg.run_defining(), "step": step,
                 "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "rng": _rng_state(device), "history": history, "train_seconds": train_seconds}
        _atomic_write(checkpoint_path, lambda tmp: torch.save(state, tmp))

    def validate(step: int) -> Optional[dict]:
        if not val_data:
            return None
        with _rng_untouched(device):
            result, _ = evaluate(model, val_data, cfg, device)
        return _jsonable(result["average"])

    loss_value, val_pearson = float("nan"), None
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="train",
               unit="step", disable=not cfg.progress, dynamic_ncols=True)
    window: list[float] = []
    for step in bar:
        tick = time.perf_counter()
        batch = schedule(step).to(device)
        if guard is not None:
            guard(step, batch)  # refuses a step predicted to exceed the budget
        loss_value = train_step(model, optimizer, batch, cfg.clip)
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"loss is {loss_value} at step {step + 1}; lower --lr or "
                                     "keep --clip on")
        train_seconds += time.perf_counter() - tick
        window.append(loss_value)
        done = step + 1
        if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps:
            row = {"step": done, "loss": float(np.mean(window)), "train_seconds": train_seconds}
            window = []
            val = validate(done)
            if val is not None:
                row["val"] = val
                val_pearson = val.get("pearson")
            history.append(row)
        if done % every_ckpt == 0 or done == cfg.steps:
            save_checkpoint(done)
        postfix = {"loss": f"{loss_value:.4f}", "nodes": batch.num_nodes}
        if val_pearson is not None:
            postfix["val_r"] = f"{val_pearson:.3f}"
        bar.set_postfix(postfix)
    bar.close()
    if start == cfg.steps:
        log("the checkpoint is already at --steps; evaluating it")

    log(f"evaluating on {len(test_data)} test circuit(s)"
        + (f" (cone samples for circuits over {cfg.eval_max_nodes} nodes)"
           if cfg.eval_max_nodes else " (full graphs)"))
    tick = time.perf_counter()
    test, preds = evaluate(model, test_data, cfg, device, keep_predictions=True)
    eval_seconds = time.perf_counter() - tick
    metrics, metrics_path, scatter_path = write_test_report(
        cfg, test, preds, history, log, target=target_name, parameters=num_params,
        train_seconds=train_seconds, eval_seconds=eval_seconds, device=device)
    if hasattr(model, "precision_report"):  # compiled with --gsr
        log("exactness of the last backward: " + model.precision_report().replace("\n", "; "))
    log(f"wrote {checkpoint_path}, {metrics_path}, {scatter_path}")
    return TrainResult(metrics, cfg.out, checkpoint_path, metrics_path, scatter_path, model)


def write_test_report(cfg: TrainConfig, test: dict, preds: dict, history: list,
                      log: Callable[[str], None], *, target: str, parameters: int,
                      train_seconds: float, eval_seconds: float, device: torch.device,
                      extra: Optional[dict] = None, title_suffix: str = ""
                      ) -> tuple[dict, str, str]:
    """Logs the test metrics, writes ``metrics.json`` (atomically) and the scatter plot;
    returns the metrics and the two paths. ``extra``: more top-level metrics entries."""
    for name, m in test["per_circuit"].items():
        log(f"  {name:12s} pearson {m.pearson:6.3f}  spearman {m.spearman:6.3f}  kendall "
            f"{m.kendall:6.3f}  r2 {m.r2:7.3f}  mae {m.mae:.4f}  ({m.n:,} nodes)")
    avg = test["average"]
    log(f"  {'average':12s} pearson {avg['pearson']:6.3f}  spearman {avg['spearman']:6.3f}  "
        f"kendall {avg['kendall']:6.3f}  r2 {avg['r2']:7.3f}  mae {avg['mae']:.4f}")
    config_record = {k: v for k, v in dataclasses.asdict(cfg).items()
                     if k not in ("progress", "overwrite")}
    metrics = _jsonable({
        "config": config_record,
        "target": target,
        "steps": cfg.steps,
        "parameters": parameters,
        **(extra or {}),
        "evaluation": ("full graphs" if cfg.eval_max_nodes is None else
                       f"full graphs up to {cfg.eval_max_nodes} nodes, cone samples beyond"),
        "test": {"average": test["average"],
                 "per_circuit": {k: v.as_dict() for k, v in test["per_circuit"].items()}},
        "val_history": history,
        "final_loss": history[-1]["loss"] if history else None,
        "train_seconds": train_seconds,
        "test_eval_seconds": eval_seconds,
        "device": str(device),
        "torch": torch.__version__,
    })
    metrics_path = os.path.join(cfg.out, METRICS)
    _atomic_write(metrics_path, lambda tmp: _dump_json(metrics, tmp))
    scatter_path = os.path.join(cfg.out, SCATTER)
    save_scatter(preds, test["per_circuit"], scatter_path,
                 f"{cfg.label}: {cfg.depth} x {cfg.conv}, width {cfg.width}"
                 f"{', ' + _describe_compile(cfg) if cfg.gsr else ''}, {cfg.steps} steps"
                 + title_suffix)
    return metrics, metrics_path, scatter_path


def _dump_json(obj, path: str) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, allow_nan=False)
        f.write("\n")
