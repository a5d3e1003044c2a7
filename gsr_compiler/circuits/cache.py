"""On-disk cache of parsed netlists and labels.

Parsing dominates the cost of loading a circuit (b19_Cg: ~13 s), labels are a
few seconds more, so both are cached. An entry is a set of named numpy arrays
plus JSON metadata, stored as::

    MAGIC (8 bytes) | format version (uint32) | payload length (uint64)
    | sha256(payload) (32 bytes) | payload (an uncompressed .npz)

Entries are keyed by a sha256 over the netlist bytes, the options that change
the result, and :data:`FORMAT_VERSION`, so an edited netlist or new settings
never hit an old entry. On read, the magic, version, length, checksum and the
key recorded inside the payload are all checked: a truncated, corrupt or stale
file counts as a miss (and is deleted), never as data. Writes go to a temporary
file in the same folder, are fsynced and then renamed over the target with
``os.replace``, so a reader sees the whole old entry or the whole new one.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import struct
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from ..cache_dir import default_cache_dir

__all__ = ["FORMAT_VERSION", "default_cache_dir", "CircuitCache", "cache_key"]

log = logging.getLogger(__name__)

#: Bump when the parsed representation or a label definition changes.
FORMAT_VERSION = 2

_MAGIC = b"GSRCACHE"
_HEADER = struct.Struct("<8sIQ32s")


def cache_key(*parts: Any) -> str:
    """Hex sha256 over :data:`FORMAT_VERSION` and ``parts`` (bytes, or JSON-able values)."""
    h = hashlib.sha256(f"gsr-circuits-v{FORMAT_VERSION}".encode())
    for part in parts:
        data = part if isinstance(part, bytes) else json.dumps(part, sort_keys=True).encode()
        h.update(len(data).to_bytes(8, "little"))  # length-prefixed: no ambiguous joins
        h.update(data)
    return h.hexdigest()


class CircuitCache:
    """A folder of checksummed, atomically written array bundles.

    Args:
        root: cache folder; default :func:`default_cache_dir`. Created on first write.
    """

    def __init__(self, root: Optional[os.PathLike | str] = None):
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()

    def path(self, kind: str, key: str) -> Path:
        """File of entry ``key`` of kind ``kind`` (``"netlist"``, ``"label"``, ...)."""
        return self.root / kind / f"{key}.gsr"

    def get(self, kind: str, key: str) -> Optional[tuple[dict[str, np.ndarray], dict]]:
        """The ``(arrays, meta)`` stored under ``key``, or ``None`` if absent or invalid."""
        path = self.path(kind, key)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:  # unreadable (permissions, I/O error): a miss
            log.warning("cannot read cache entry %s (%s); rebuilding", path, e)
            return None
        try:
            arrays, meta = _decode(raw)
            if meta.get("key") != key:
                raise ValueError("entry belongs to another key")
        except (ValueError, KeyError, OSError, EOFError) as e:
            log.warning("discarding invalid cache entry %s (%s); rebuilding", path, e)
            path.unlink(missing_ok=True)
            return None
        return arrays, meta

    def put(
        self, kind: str, key: str, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]
    ) -> Path:
        """Store ``arrays`` and JSON-able ``meta`` under ``key``, atomically."""
        payload = _encode(arrays, {**meta, "key": key})
        path = self.path(kind, key)
        digest = hashlib.sha256(payload).digest()
        header = _HEADER.pack(_MAGIC, FORMAT_VERSION, len(payload), digest)
        atomic_write(path, header + payload)
        return path

    def clear(self) -> None:
        """Delete every entry (leaves unrelated files alone)."""
        for file in self.root.glob("*/*.gsr"):
            file.unlink(missing_ok=True)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` is never seen half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            _write_all(f, data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache folder may be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_all(f, data: bytes) -> None:
    # Split out so tests can make a write fail part-way.
    f.write(data)


def _encode(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> bytes:
    buffer = io.BytesIO()
    meta_bytes = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)
    np.savez(buffer, __meta__=meta_bytes, **{k: np.asarray(v) for k, v in arrays.items()})
    return buffer.getvalue()


def _decode(raw: bytes) -> tuple[dict[str, np.ndarray], dict]:
    if len(raw) < _HEADER.size:
        raise ValueError(f"truncated header ({len(raw)} bytes)")
    magic, version, length, digest = _HEADER.unpack_from(raw)
    if magic != _MAGIC:
        raise ValueError("not a gsr cache file")
    if version != FORMAT_VERSION:
        raise ValueError(f"format version {version}, expected {FORMAT_VERSION}")
    payload = raw[_HEADER.size :]
    if len(payload) != length:
        raise ValueError(f"truncated: {len(payload)} of {length} payload bytes")
    if hashlib.sha256(payload).digest() != digest:
        raise ValueError("checksum mismatch")
    with np.load(io.BytesIO(payload), allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    meta = json.loads(arrays.pop("__meta__").tobytes().decode())
    return arrays, meta
