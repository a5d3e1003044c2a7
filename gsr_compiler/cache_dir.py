"""Where gsr_compiler keeps files it can rebuild: parsed circuits, compiled native kernels."""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["default_cache_dir"]


def default_cache_dir() -> Path:
    """``$GSR_CACHE_DIR``, else ``$XDG_CACHE_HOME/gsr_compiler``, else ``~/.cache/gsr_compiler``."""
    if env := os.environ.get("GSR_CACHE_DIR"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "gsr_compiler"
