"""Compile a C++ source of this package into a shared library once, cache it, load it with ctypes.

The library is built with the system C++ compiler (``$CXX``, else ``c++``, ``g++`` or ``clang++``)
for the CPU it runs on (``-march=native``, without it where the compiler refuses) into
``<cache>/native/<name>-<key>.so`` (``<cache>`` from :func:`~gsr_compiler.cache_dir.default_cache_dir`).
``key`` hashes the source, the compiler, its version, the flags and the CPU's model and features,
so an edited source, another compiler or another CPU (a cache folder shared between machines)
never loads an old build. The compiler writes a temporary file in the same folder, which
is then renamed over the target: a reader sees a whole library or none, also when several
processes build at once.

Native code is an accelerator only: every caller has a torch path that gives the same results.
When there is no compiler, the build fails, or ``GSR_NATIVE=0`` is set, :func:`load_library`
returns ``None`` and :func:`library_status` says why.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Optional

from ...cache_dir import default_cache_dir

__all__ = ["load_library", "library_status", "FLAGS", "NATIVE_FLAGS"]

FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-pthread")
# Tried first; the lane loops of the kernels vectorise to the CPU's widest registers.
NATIVE_FLAGS = ("-march=native",)

_lock = threading.Lock()
_loaded: dict[str, tuple[Optional[ctypes.CDLL], str]] = {}


def _compiler() -> Optional[str]:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and (path := shutil.which(name)):
            return path
    return None


def _cpu_identity() -> str:
    """Model and feature flags of this CPU (what ``-march=native`` compiles for)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def _compile(cxx: str, source: Path, out: str) -> subprocess.CompletedProcess:
    done = subprocess.run([cxx, *FLAGS, *NATIVE_FLAGS, str(source), "-o", out],
                          capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        done = subprocess.run([cxx, *FLAGS, str(source), "-o", out],
                              capture_output=True, text=True, timeout=300)
    return done


def _build(name: str, source: Path) -> tuple[Optional[ctypes.CDLL], str]:
    if os.environ.get("GSR_NATIVE", "1").strip().lower() in ("0", "false", "off", "no"):
        return None, "disabled by GSR_NATIVE=0"
    cxx = _compiler()
    if cxx is None:
        return None, "no C++ compiler found (set CXX, or install g++ or clang++)"
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True,
                                 timeout=60).stdout
        key = hashlib.sha256("\0".join(
            [source.read_text(), cxx, version, " ".join(FLAGS + NATIVE_FLAGS), platform.machine(),
             _cpu_identity()]).encode()
        ).hexdigest()[:16]
        folder = default_cache_dir() / "native"
        target = folder / f"{name}-{key}.so"
        if not target.exists():
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".so", dir=folder)
            os.close(fd)
            try:
                done = _compile(cxx, source, tmp)
                if done.returncode != 0:
                    return None, f"{Path(cxx).name} failed on {source.name}: " \
                                 f"{done.stderr.strip()[-500:]}"
                os.replace(tmp, target)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        return ctypes.CDLL(str(target)), f"built with {Path(cxx).name}, cached at {target}"
    except (OSError, subprocess.SubprocessError) as err:
        return None, f"could not build {source.name}: {err}"


def load_library(name: str, source: Path) -> Optional[ctypes.CDLL]:
    """The library built from ``source``, or ``None`` when native code is unavailable (the
    reason is in :func:`library_status`). Built at most once per process."""
    with _lock:
        if name not in _loaded:
            _loaded[name] = _build(name, source)
        return _loaded[name][0]


def library_status(name: str, source: Path) -> str:
    """How the library ``name`` was loaded, or why it was not (building it if not tried yet)."""
    load_library(name, source)
    return _loaded[name][1]
