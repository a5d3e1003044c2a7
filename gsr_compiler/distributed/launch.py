"""Starting data-parallel ranks: ``gsr train --nproc N`` on one machine, or under ``torchrun``.

``--nproc N`` hands the ranks to torch's own elastic launcher
(:func:`torch.distributed.launcher.api.elastic_launch`, what ``torchrun --standalone`` runs):
a c10d rendezvous on a free localhost port, no restarts, and the agent stops every rank when
one fails. Everything that can be checked is checked here first, so that a bad option stops the
command before any process starts or any file is written.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import uuid
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record

from ..train import TrainConfig, _load_checkpoint, _load_circuits, _resume_path, validate_config
from .data_parallel import (DEFAULT_TIMEOUT, RankFailure, check_resume_world_size,
                            train_data_parallel)
from .sampler import DistributedBatchSchedule, check_world_size

__all__ = ["launched_by_torchrun", "check_nproc", "check_timeout", "preflight",
           "launch_data_parallel", "torchrun_rank"]


def launched_by_torchrun() -> bool:
    """True in a process that ``torchrun`` (or any torch elastic agent) started."""
    return dist.is_torchelastic_launched()


def check_nproc(nproc: object, device: str = "cpu") -> int:
    """``--nproc`` as an int >= 1 that this machine can hold; ``ValueError`` otherwise."""
    if not isinstance(nproc, int) or isinstance(nproc, bool) or nproc < 1:
        raise ValueError(f"--nproc must be an integer >= 1 (the number of ranks), got {nproc!r}")
    if str(device).startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if nproc > count:
            fix = f"use --nproc {count} or --device cpu" if count else "use --device cpu"
            raise ValueError(f"--nproc {nproc} --device cuda needs one GPU per rank, and this "
                             f"machine has {count}; {fix}")
        if str(device) != "cuda":
            raise ValueError(f"--device {device}: with --nproc each rank takes GPU LOCAL_RANK; "
                             "pass --device cuda without an index")
    return nproc


def preflight(cfg: TrainConfig, world_size: int) -> TrainConfig:
    """Every check a data-parallel run makes before it trains, in this process: options,
    the checkpoint and its number of ranks, enough batches for ``world_size`` ranks. Loads
    the training circuits (cached for the ranks); writes nothing to ``cfg.out``."""
    cfg = validate_config(cfg)
    resume = _resume_path(cfg)
    if resume is not None:
        checkpoint = _load_checkpoint(resume)
        check_resume_world_size(checkpoint, resume, world_size)
    datas = _load_circuits(cfg.train, cfg, lambda _: None)
    check_world_size(DistributedBatchSchedule(datas, cfg, world_size), world_size)
    return cfg


@record
def _rank_main(options: dict, timeout: float) -> None:
    """One rank (``@record`` hands its error to the launcher, which names the rank)."""
    try:
        train_data_parallel(TrainConfig(**options), timeout=timeout)
    except (ValueError, LookupError, OSError) as e:
        print(f"gsr train: rank {os.environ.get('RANK', '?')}: error: {e}", file=sys.stderr,
              flush=True)
        raise


def check_timeout(timeout: Optional[float]) -> float:
    """``--dist-timeout`` in seconds (None: the default); ``ValueError`` unless positive."""
    if timeout is None:
        return DEFAULT_TIMEOUT
    if not (isinstance(timeout, (int, float)) and timeout > 0):
        raise ValueError(f"--dist-timeout must be > 0 seconds, got {timeout!r}")
    return float(timeout)


def launch_data_parallel(cfg: TrainConfig, nproc: int,
                         timeout: Optional[float] = None) -> None:
    """Trains ``cfg`` on ``nproc`` ranks on this machine (gloo on CPU, NCCL with
    ``--device cuda``). Raises ``ValueError`` before starting anything when an option is bad,
    :class:`~.data_parallel.RankFailure` (an ``OSError``) naming the failed ranks when one
    fails."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    check_nproc(nproc, cfg.device)
    timeout = check_timeout(timeout)
    cfg = preflight(cfg, nproc)
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"gsr-train-{uuid.uuid4().hex}",
        rdzv_backend="c10d", rdzv_endpoint="localhost:0",  # a free port, as torchrun --standalone
        max_restarts=0, monitor_interval=0.1, start_method="spawn")
    # threads per rank: the machine's cores shared out, unless the user set them
    env_threads = os.environ.get("OMP_NUM_THREADS")
    if env_threads is None:
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    try:
        elastic_launch(config, _rank_main)(dataclasses.asdict(cfg), timeout)
    except ChildFailedError as e:
        failed = ", ".join(f"rank {rank} ({_describe(f)})"
                           for rank, f in sorted(e.failures.items()))
        raise RankFailure(f"data-parallel training failed: {failed}; the last checkpoint in "
                           f"{cfg.out} (if any) is intact, continue with --resume") from None
    finally:
        if env_threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)


def _describe(failure) -> str:
    if failure.exitcode is not None and failure.exitcode < 0:
        import signal

        try:
            return f"killed by {signal.Signals(-failure.exitcode).name}"
        except ValueError:
            return f"killed by signal {-failure.exitcode}"
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message", "")
    first = (str(message).strip().splitlines() or [f"exit code {failure.exitcode}"])[0]
    return first if len(first) < 400 else first[:400] + "..."


def torchrun_rank(cfg: TrainConfig, timeout: Optional[float] = None) -> None:
    """A rank started by ``torchrun`` (``gsr train`` under torchrun)."""
    train_data_parallel(cfg, timeout=check_timeout(timeout))
