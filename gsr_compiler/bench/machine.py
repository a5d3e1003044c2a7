"""What the benchmark ran on: machine, CPU, memory, GPU and library versions."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata


def cpu_name() -> str:
    """The CPU model as the kernel reports it (``/proc/cpuinfo``), else what Python knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def source_commit() -> str | None:
    """The git commit of the gsr_compiler source that runs, when it is a clean git checkout
    (with ``+dirty`` when it has local changes); None for an installed wheel."""
    package_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", package_dir, *args], capture_output=True,
                                  text=True, timeout=10, check=True).stdout.strip()
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".")
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def machine_info(device: str = "cpu", threads: int | None = None) -> dict:
    """A record of the machine and the software, for the results files."""
    import psutil
    import torch

    info = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu_name(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": threads or torch.get_num_threads(),
        "memory_total_bytes": psutil.virtual_memory().total,
        "memory_available_bytes": psutil.virtual_memory().available,
        "device": device,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_geometric": _version("torch_geometric"),
        "triton": _version("triton"),
        "gsr_compiler": _version("gsr-compiler"),
        "gsr_compiler_commit": source_commit(),
        "numpy": _version("numpy"),
    }
    if device.startswith("cuda"):
        index = torch.device(device).index or 0
        props = torch.cuda.get_device_properties(index)
        info.update(gpu=props.name, gpu_memory_bytes=props.total_memory,
                    cuda=torch.version.cuda)
    return info


def describe_machine(info: dict) -> list[str]:
    """Lines for the Markdown header."""
    gib = 2 ** 30
    lines = [
        f"Machine: {info['platform']}; CPU: {info['cpu']} ({info['logical_cpus']} logical "
        f"CPUs, {info['torch_threads']} torch thread(s) per measuring process); memory "
        f"{info['memory_total_bytes'] / gib:.1f} GiB ({info['memory_available_bytes'] / gib:.1f} "
        "GiB available at start)",
    ]
    if info.get("gpu"):
        lines.append(f"GPU: {info['gpu']}, {info['gpu_memory_bytes'] / gib:.1f} GiB, "
                     f"CUDA {info.get('cuda')}")
    else:
        lines.append(f"Device: {info['device']} (no GPU used: times are CPU times)")
    lines.append(f"Versions: Python {info['python']}, torch {info['torch']}, torch_geometric "
                 f"{info['torch_geometric']}, triton {info['triton'] or 'not installed'}, "
                 f"gsr_compiler {info['gsr_compiler']}"
                 + (f" (commit {info['gsr_compiler_commit']})"
                    if info.get("gsr_compiler_commit") else ""))
    return lines
