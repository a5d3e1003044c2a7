"""Compile a C++ source of this package into a shared library once, cache it, load it with ctypes.

The library is built with the system C++ compiler (``$CXX``, else ``c++``, ``g++`` or ``clang++``)
for the CPU it runs on (``-march=native``, without it where the compiler refuses) into
``<cache>/native/<name>-<key>.so`` (``<cache>`` from :func:`~gsr_compiler.cache_dir.default_cache_dir`).
``key`` hashes the source, the compiler, its version, the flags and the CPU's model and features,
so an edited source, another compiler or another CPU (a cache folder shared between machines)
never loads an old build. The compiler writes a temporary file in the same folder, which
is then renamed over the target: a reader sees a whole library or none, also when several
processes build at once.

Once the library is in place, its size and sha256 go into ``<name>-<key>.json`` beside it
(also written to a temporary file and renamed). Every load checks the library against that
manifest first: mapping a truncated library kills the process with SIGBUS, so a library that
does not match (or has no manifest) is rebuilt, never loaded. A library that loads but lacks a
function its caller needs is not used (with a warning).

Native code is an accelerator only: every caller has a torch path that gives the same results.
When there is no compiler, the build fails, or ``GSR_NATIVE=0`` is set, :func:`load_library`
returns ``None`` and :func:`library_status` says why.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
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


def _digest(path: str | Path) -> dict:
    data = Path(path).read_bytes()
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _manifest(target: Path) -> Path:
    return target.with_suffix(".json")


def _mismatch(target: Path) -> Optional[str]:
    """Why ``target`` is not the library recorded in its manifest, or ``None`` if it is."""
    try:
        recorded = json.loads(_manifest(target).read_text())
        recorded = {"size": int(recorded["size"]), "sha256": str(recorded["sha256"])}
    except FileNotFoundError:
        return "has no manifest"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"has an unreadable manifest ({err})"
    actual = _digest(target)
    if actual["size"] != recorded["size"]:
        return f"is {actual['size']} bytes, {recorded['size']} were built"
    if actual["sha256"] != recorded["sha256"]:
        return "differs from the build (sha256)"
    return None


def _write_manifest(target: Path, digest: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}-", suffix=".json", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"file": target.name, **digest}, f)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache folder may be shared
        os.replace(tmp, _manifest(target))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _build(name: str, source: Path,
           symbols: tuple[str, ...]) -> tuple[Optional[ctypes.CDLL], str]:
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
        # Checked before loading: a truncated library cannot be loaded safely.
        mismatch = _mismatch(target) if target.exists() else None
        if mismatch and _manifest(target).exists():  # damaged, not merely from an older version
            warnings.warn(f"cached native library {target} {mismatch}; rebuilding it",
                          RuntimeWarning)
        if mismatch or not target.exists():
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".so", dir=folder)
            os.close(fd)
            try:
                done = _compile(cxx, source, tmp)
                if done.returncode != 0:
                    return None, f"{Path(cxx).name} failed on {source.name}: " \
                                 f"{done.stderr.strip()[-500:]}"
                digest = _digest(tmp)
                os.replace(tmp, target)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            _write_manifest(target, digest)  # only once the library is whole
        library = ctypes.CDLL(str(target))
        missing = [s for s in symbols if not hasattr(library, s)]
        if missing:
            reason = (f"{target} does not export {', '.join(missing)}; not used "
                      "(delete it to rebuild)")
            warnings.warn(f"native library {reason}", RuntimeWarning)
            return None, reason
        rebuilt = f" (rebuilt: the cached copy {mismatch})" if mismatch else ""
        return library, f"built with {Path(cxx).name}, cached at {target}{rebuilt}"
    except (OSError, subprocess.SubprocessError) as err:
        return None, f"could not build {source.name}: {err}"


def load_library(name: str, source: Path, symbols: tuple[str, ...] = ()) -> Optional[ctypes.CDLL]:
    """The library built from ``source``, or ``None`` when native code is unavailable or
    does not export every name in ``symbols`` (the reason is in :func:`library_status`).
    Built at most once per process."""
    with _lock:
        if name not in _loaded:
            _loaded[name] = _build(name, source, symbols)
        return _loaded[name][0]


def library_status(name: str, source: Path, symbols: tuple[str, ...] = ()) -> str:
    """How the library ``name`` was loaded, or why it was not (building it if not tried yet)."""
    load_library(name, source, symbols)
    return _loaded[name][1]
