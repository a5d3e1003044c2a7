"""Data-parallel ``gsr train``: one process per rank, ``DistributedDataParallel`` around the
compiled model (``docs/distributed.md``).

Each rank traces and compiles the model on the same example batch with the same seed, then
wraps it in DDP. The reversible chain's custom ``autograd.Function`` takes the chain's
parameters as inputs and returns their gradients from its backward, so autograd accumulates
them through the parameters' own ``AccumulateGrad`` nodes, where DDP's reducer hooks sit: every
parameter is all-reduced, in buckets, during the backward; none stays rank-local (checked by
the tests against one process that runs every rank's batch). Every parameter gets a gradient
each step, so ``find_unused_parameters`` stays off (DDP raises if one ever did not).

Seeds: the model is initialized from ``seed`` on every rank (and DDP broadcasts rank 0's
parameters anyway); batches come from :class:`~.sampler.DistributedBatchSchedule`, seeded by
``(seed, epoch)`` and dealt out by global index; rank ``r``'s torch random stream (dropout, and
the per-block seeds the reversible backward replays) starts from :func:`rank_seed`.

Evaluation is split by circuit over the ranks and gathered, so metrics are computed once and
written once by rank 0, as are checkpoints (atomically), which hold every rank's random state.
"""
from __future__ import annotations

import dataclasses
import datetime
import math
import os
import time
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..train import (CHECKPOINT, LABEL_TARGETS, METRICS, SCATTER, TrainConfig, TrainResult,
                     _atomic_write, _check_writable, _describe_compile, _dump_json, _jsonable,
                     _load_checkpoint, _load_circuits, _remove_partials, _resume_path,
                     _rng_state, _rng_untouched, _set_rng_state, _unusable, evaluate,
                     save_scatter, train_step, validate_config)
from .sampler import DistributedBatchSchedule, check_world_size

__all__ = ["DEFAULT_TIMEOUT", "RankFailure", "rank_seed", "train_data_parallel",
           "check_resume_world_size", "shutdown"]

#: Process-group timeout (seconds): a collective that waits longer for a rank raises.
DEFAULT_TIMEOUT = 300.0


class RankFailure(ConnectionError):
    """A collective failed: another rank died, hangs, or lost its connection."""


def rank_seed(seed: int, rank: int) -> int:
    """Seed of rank ``rank``'s torch random stream: 63 bits of
    ``numpy.random.SeedSequence([seed, 1, rank])``, independent across ranks and of the
    batch stream (which uses ``(seed, epoch, 2)``)."""
    words = np.random.SeedSequence([seed, 1, rank]).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def check_resume_world_size(checkpoint: dict, path: str, world_size: int) -> None:
    """Refuses a checkpoint written by another number of ranks (``ValueError``)."""
    saved = checkpoint.get("world_size")
    if saved is None:
        raise ValueError(f"--resume {path} was written by a single-process gsr train; resume it "
                         "without --nproc/torchrun (batches and random streams are per rank)")
    if saved != world_size:
        raise ValueError(f"--resume {path} was written by {saved} ranks and this run has "
                         f"{world_size}: each rank's batches and random stream continue only "
                         f"with the same number of ranks; resume with --nproc {saved} (or "
                         f"torchrun with {saved} processes in all)")
    ranks = checkpoint.get("ranks")
    if not (isinstance(ranks, list) and len(ranks) == world_size and all(
            isinstance(r, dict) and isinstance(r.get("rng"), dict) for r in ranks)):
        raise _unusable(path, f"its 'ranks' is not a list of {world_size} per-rank states")


# ----------------------------------------------------------------------------- process group


def _device(cfg_device: str, local_rank: int) -> torch.device:
    if cfg_device == "cpu":
        return torch.device("cpu")
    if cfg_device != "cuda":
        raise ValueError(f"--device {cfg_device}: data-parallel runs map rank to GPU LOCAL_RANK "
                         "themselves; pass --device cuda without an index")
    if local_rank >= torch.cuda.device_count():
        raise ValueError(f"local rank {local_rank} has no GPU: only "
                         f"{torch.cuda.device_count()} CUDA device(s) on this machine; start at "
                         "most that many processes per machine")
    return torch.device("cuda", local_rank)


def _init(cfg: TrainConfig, timeout: float) -> tuple[int, int, torch.device, bool]:
    """rank, world size, this rank's device; initializes the default process group from the
    environment torchrun sets (unless the caller already did)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _device(cfg.device, local_rank)
    created = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
        created = True
    return dist.get_rank(), dist.get_world_size(), device, created


def _on_rank0(rank: int, fn: Callable[[], Any]) -> Any:
    """Runs ``fn`` on rank 0 and gives every rank its result, or raises its error on every
    rank (so that a bad option stops all ranks, not just the one that saw it)."""
    box: list[Any] = [None]
    if rank == 0:
        try:
            box[0] = ("ok", fn())
        except (ValueError, LookupError, OSError) as e:
            box[0] = ("error", e)
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


# ----------------------------------------------------------------------------- evaluation


class _InDtype(nn.Module):
    """The model, fed features in its own dtype (evaluation reads float32 features)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.dtype), edge_index)


def _evaluate_shared(model: nn.Module, datas: list, cfg: TrainConfig, device: torch.device,
                     rank: int, world: int, keep_predictions: bool = False
                     ) -> tuple[dict, dict]:
    """:func:`~gsr_compiler.train.evaluate`, each rank scoring every ``world``-th circuit; the
    same result on every rank."""
    from ..circuits import average_metrics

    mine = list(range(rank, len(datas), world))
    with _rng_untouched(device):
        result, preds = evaluate(model, [datas[i] for i in mine], cfg, device, keep_predictions)
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, (mine, result["per_circuit"], preds))
    per_index: dict[int, tuple[str, Any]] = {}
    all_preds: dict = {}
    for indices, per, pr in parts:
        for i, (name, m) in zip(indices, per.items()):
            per_index[i] = (name, m)
        all_preds.update(pr)
    per = dict(per_index[i] for i in range(len(datas)))
    preds_ordered = {name: all_preds[name] for name in per} if keep_predictions else {}
    return {"per_circuit": per, "average": average_metrics(per) if per else {}}, preds_ordered


# ----------------------------------------------------------------------------- training


def _build(cfg: TrainConfig, in_channels: int, example, device: torch.device,
           dtype: torch.dtype) -> nn.Module:
    """``train._build_model`` in ``dtype``: compiled with ``example_inputs`` before DDP wraps
    it, so DDP sees the rewritten parameters."""
    from ..models import ResidualGNN

    torch.manual_seed(cfg.seed)
    model = ResidualGNN(in_channels, cfg.width, 1, cfg.depth, conv=cfg.conv,
                        dropout=cfg.dropout).to(device=device, dtype=dtype)
    if cfg.gsr:
        from .. import gsr_compile

        model = gsr_compile(model, groups=cfg.groups, sparse_k=cfg.sparse_k,
                            example_inputs=(example.x, example.edge_index))
    return model


def _cast(batch, device: torch.device, dtype: torch.dtype):
    batch = batch.to(device)
    batch.x, batch.target = batch.x.to(dtype), batch.target.to(dtype)
    return batch


def _collective_failed(e: BaseException, rank: int, step: int, checkpoint_path: str
                       ) -> RankFailure:
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
    last = ""
    if os.path.isfile(checkpoint_path):
        last = f"; the last checkpoint, {checkpoint_path}, is intact: continue with --resume"
    return RankFailure(f"rank {rank} stopped at step {step + 1}: a collective with the other "
                       f"ranks failed ({reason}); another rank died, hung or lost its "
                       f"connection{last}")


def train_data_parallel(cfg: TrainConfig, log: Callable[[str], None] = print,
                        timeout: float = DEFAULT_TIMEOUT, dtype: torch.dtype = torch.float32,
                        loaded: Optional[dict] = None) -> TrainResult:
    """Runs one rank of a data-parallel ``gsr train``; every rank calls it (``torchrun`` or
    ``gsr train --nproc N`` start them). Returns the result on every rank: the trained model
    (the same on all), and on rank 0 only the metrics (the other ranks' ``metrics`` is empty).

    ``timeout``: seconds a collective waits for the other ranks before raising.
    ``dtype``: of parameters and features (float64 for exactness checks).
    """
    from tqdm import tqdm

    # Every rank checks the options before any collective (all stop on the same error); the
    # --out folder and checkpoint only rank 0 checks, reads and writes (other machines may not
    # see them), and its verdict is handed to all.
    options = validate_config(dataclasses.replace(cfg, resume=None, overwrite=True))
    rank, world, device, created = _init(options, timeout)
    try:
        cfg = _on_rank0(rank, lambda: validate_config(cfg))
        return _run(cfg, rank, world, device, log if rank == 0 else (lambda _: None), dtype,
                    loaded, tqdm)
    finally:
        if created and dist.is_initialized():
            shutdown()


def shutdown() -> None:
    """Destroys the default process group once every rank is done with it.

    gloo's worker threads drop the tensors of a finished collective after it completes, which
    needs the GIL; the process group's destructor joins those threads while holding the GIL.
    Seen here (torch 2.13): a rank hung at exit after an ``all_gather_object``. A barrier, then
    a short sleep that releases the GIL, lets them finish first."""
    try:
        dist.barrier()
        time.sleep(0.1)
    except (RuntimeError, dist.DistError):
        pass  # a peer is gone: nothing left to wait for
    dist.destroy_process_group()


def _run(cfg, rank, world, device, log, dtype, loaded, tqdm) -> TrainResult:
    resume = _resume_path(cfg)

    def read_checkpoint() -> Optional[dict]:
        if resume is None:
            return None
        checkpoint = _load_checkpoint(resume)
        check_resume_world_size(checkpoint, resume, world)
        saved = checkpoint["config"]
        differ = [f"{k}: checkpoint {saved.get(k)!r}, now {v!r}"
                  for k, v in cfg.run_defining().items() if saved.get(k) != v]
        if differ:
            raise ValueError(f"--resume {resume} was made with other options:\n  "
                             + "\n  ".join(differ))
        if checkpoint["step"] > cfg.steps:
            raise ValueError(f"--resume {resume} is at step {checkpoint['step']}, beyond "
                             f"--steps {cfg.steps}")
        return checkpoint

    # rank 0 reads it (the other machines may not see the file) and hands it to all
    checkpoint = _on_rank0(rank, read_checkpoint)

    def prepare_out() -> list[str]:
        _check_writable(cfg.out)
        return _remove_partials(cfg.out, (CHECKPOINT, METRICS, SCATTER)) \
            if os.path.isdir(cfg.out) else []

    for path in _on_rank0(rank, prepare_out):
        log(f"removed {path}, left by a write that was interrupted")

    target_name, _ = LABEL_TARGETS[cfg.label]
    log(f"task: {cfg.label} (regress {target_name}); model: {cfg.depth} x {cfg.conv}, width "
        f"{cfg.width}, {_describe_compile(cfg)}; data parallel on {world} rank(s), "
        f"{'NCCL on GPU LOCAL_RANK' if device.type == 'cuda' else 'gloo on CPU'}")
    log("loading train circuits")
    train_data = _load_circuits(cfg.train, cfg, log, loaded)
    log("loading validation circuits" if cfg.val else "no validation circuits")
    val_data = _load_circuits(cfg.val, cfg, log, loaded)
    log("loading test circuits")
    test_data = _load_circuits(cfg.test, cfg, log, loaded)

    schedule = DistributedBatchSchedule(train_data, cfg, world)
    check_world_size(schedule, world)  # same data on every rank: same verdict
    if rank == 0:
        os.makedirs(cfg.out, exist_ok=True)
    start = checkpoint["step"] if checkpoint else 0
    # the same example on every rank: identical traces and parameters
    example = _cast(schedule.batch(schedule.global_index(start, 0)), device, dtype)
    model = _build(cfg, train_data[0].x.shape[1], example, device, dtype)
    optimizer_params = list(model.parameters())
    history: list[dict] = []
    train_seconds = 0.0
    if checkpoint:
        try:
            model.load_state_dict(checkpoint["model"])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise _unusable(resume, f"its saved state does not fit this model ({reason})") from e
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                  else None)
    optimizer = torch.optim.Adam(optimizer_params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if checkpoint:
        try:
            optimizer.load_state_dict(checkpoint["optimizer"])
            _set_rng_state(checkpoint["ranks"][rank]["rng"], device)
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise _unusable(resume, f"its saved state does not fit this model ({reason})") from e
        history = checkpoint["history"]
        train_seconds = checkpoint["train_seconds"]
        log(f"resumed {resume} at step {start} on {world} ranks")
    else:
        torch.manual_seed(rank_seed(cfg.seed, rank))  # this rank's dropout stream
    num_params = sum(p.numel() for p in model.parameters())
    log(f"{num_params:,} parameters; {cfg.steps - start} step(s) to go, {world} batches of up "
        f"to {cfg.batch_nodes} nodes per step "
        f"({'whole circuits' if cfg.full_graphs else 'cone samples'}), "
        f"{schedule.batches_per_epoch(0)} batches in the first epoch")

    checkpoint_path = os.path.join(cfg.out, CHECKPOINT)
    every_ckpt = cfg.checkpoint_every or cfg.eval_every or cfg.steps
    step = start

    def save_checkpoint(done: int) -> None:
        mine = {"rank": rank, "next_batch": schedule.global_index(done, rank),
                "rng": _rng_state(device)}
        ranks: list[Any] = [None] * world
        dist.all_gather_object(ranks, mine)
        if rank != 0:
            return
        state = {"version": 1, "config": cfg.run_defining(), "step": done,
                 "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "rng": ranks[0]["rng"], "history": history, "train_seconds": train_seconds,
                 "world_size": world, "ranks": ranks}
        _atomic_write(checkpoint_path, lambda tmp: torch.save(state, tmp))

    def validate() -> Optional[dict]:
        if not val_data:
            return None
        result, _ = _evaluate_shared(scored, val_data, cfg, device, rank, world)
        return _jsonable(result["average"])

    scored = model if dtype == torch.float32 else _InDtype(model, dtype)
    loss_value, val_pearson = float("nan"), None
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="train",
               unit="step", disable=not cfg.progress or rank != 0, dynamic_ncols=True)
    window: list[float] = []
    try:
        for step in bar:
            tick = time.perf_counter()
            batch = _cast(schedule(step, rank), device, dtype)
            local = train_step(ddp, optimizer, batch, cfg.clip)
            # the mean loss over ranks: every rank sees the same value (and stops together on NaN)
            total = torch.tensor([local], dtype=torch.float64, device=device)
            dist.all_reduce(total)
            loss_value = float(total.item()) / world
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"loss is {loss_value} at step {step + 1}; lower --lr "
                                         "or keep --clip on")
            train_seconds += time.perf_counter() - tick
            window.append(loss_value)
            done = step + 1
            if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps:
                row = {"step": done, "loss": float(np.mean(window)),
                       "train_seconds": train_seconds}
                window = []
                val = validate()
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
        log(f"evaluating on {len(test_data)} test circuit(s), split over {world} rank(s)")
        tick = time.perf_counter()
        test, preds = _evaluate_shared(scored, test_data, cfg, device, rank, world,
                                       keep_predictions=True)
        eval_seconds = time.perf_counter() - tick
    except dist.DistError as e:
        raise _collective_failed(e, rank, step, checkpoint_path) from e
    except RuntimeError as e:  # gloo reports a lost peer as a plain RuntimeError
        text = str(e)
        if not any(w in text for w in ("Gloo", "gloo", "NCCL", "Connection", "Timed out",
                                        "timed out", "connection")):
            raise
        raise _collective_failed(e, rank, step, checkpoint_path) from e

    checkpoint_path_, metrics_path, scatter_path = (checkpoint_path,
                                                    os.path.join(cfg.out, METRICS),
                                                    os.path.join(cfg.out, SCATTER))
    if rank != 0:  # rank 0 prints and writes; the model is the same on every rank
        return TrainResult({}, cfg.out, checkpoint_path_, metrics_path, scatter_path, model)
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
        "target": target_name,
        "steps": cfg.steps,
        "parameters": num_params,
        "world_size": world,
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
    _atomic_write(metrics_path, lambda tmp: _dump_json(metrics, tmp))
    save_scatter(preds, test["per_circuit"], scatter_path,
                 f"{cfg.label}: {cfg.depth} x {cfg.conv}, width {cfg.width}"
                 f"{', ' + _describe_compile(cfg) if cfg.gsr else ''}, {cfg.steps} steps, "
                 f"{world} ranks")
    log(f"wrote {checkpoint_path}, {metrics_path}, {scatter_path}")
    return TrainResult(metrics, cfg.out, checkpoint_path, metrics_path, scatter_path, model)
