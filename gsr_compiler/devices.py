"""Checking a ``--device`` option before anything runs."""
from __future__ import annotations

import torch


def check_device(device: str) -> str:
    """``device`` as a string, checked: ``cpu``, or ``cuda[:N]`` with CUDA present and N in
    range. Raises ``ValueError`` saying what to change."""
    device = str(device)
    if not (device == "cpu" or device.startswith("cuda")):
        raise ValueError(f"--device must be cpu or cuda[:N], got {device!r}")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available on this machine (torch "
                             f"{torch.__version__}); use --device cpu")
        try:
            index = torch.device(device).index
        except RuntimeError as e:
            raise ValueError(f"--device {device}: {e}") from None
        if index is not None and index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")
    return device
