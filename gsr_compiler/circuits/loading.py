"""Load a circuit (bundled name or user file) as a PyG ``Data`` with labels.

``load_circuit`` = resolve the name -> parse (or read the parsed netlist from the
cache) -> compute each requested label (or read it from the cache) -> ``Data``.
Netlists and labels are cached separately, so asking for more patterns re-runs
the simulation but not the parser.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch_geometric.data import Data

from . import labels as _labels
from .cache import CircuitCache, cache_key
from .errors import UnknownCircuitError
from .gates import node_features
from .library import bundled_names, bundled_path, close_matches, family_of, suite_of
from .netlist import Netlist, read_netlist

__all__ = ["CircuitInfo", "list_circuits", "load_circuit", "load_netlist", "resolve_circuit"]

log = logging.getLogger(__name__)

PathOrName = Union[str, os.PathLike]


def resolve_circuit(name_or_path: PathOrName) -> tuple[Path, str]:
    """Map a bundled circuit name or a file path to ``(path, circuit name)``.

    Raises:
        FileNotFoundError: a path that does not exist.
        UnknownCircuitError: neither a bundled name nor a path (lists near matches).
    """
    text = os.fspath(name_or_path)
    looks_like_path = (
        isinstance(name_or_path, os.PathLike)
        or Path(text).suffix in (".v", ".bench")
        or os.sep in text
        or (os.altsep is not None and os.altsep in text)
    )
    if not looks_like_path:
        path = bundled_path(text)
        if path is not None:
            return path, text
        if not Path(text).is_file():
            raise UnknownCircuitError(text, close_matches(text))
    path = Path(text).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"netlist file not found: {path}")
    return path, path.stem


# ----------------------------------------------------------------------------- netlist


def _netlist_arrays(netlist: Netlist) -> dict[str, np.ndarray]:
    names = "\n".join(netlist.node_names).encode()
    return {
        "gate_type": netlist.gate_type,
        "is_output": netlist.is_output,
        "is_pseudo_input": netlist.is_pseudo_input,
        "is_pseudo_output": netlist.is_pseudo_output,
        "edge_index": netlist.edge_index.astype(np.int32),  # half the bytes; N < 2**31
        "node_names": np.frombuffer(names, dtype=np.uint8),
    }


def _netlist_from_arrays(arrays: dict[str, np.ndarray], meta: dict) -> Netlist:
    names = arrays["node_names"].tobytes().decode()
    node_names = names.split("\n") if names else []
    netlist = Netlist(
        name=meta["name"],
        node_names=node_names,
        gate_type=arrays["gate_type"],
        is_output=arrays["is_output"],
        is_pseudo_input=arrays["is_pseudo_input"],
        is_pseudo_output=arrays["is_pseudo_output"],
        edge_index=arrays["edge_index"].astype(np.int64),
    )
    if len(node_names) != netlist.num_nodes or meta.get("num_nodes") != netlist.num_nodes:
        raise ValueError("inconsistent cache entry")
    return netlist


def load_netlist(
    name_or_path: PathOrName,
    *,
    module: Optional[str] = None,
    cache_dir: Optional[PathOrName] = None,
    use_cache: bool = True,
) -> tuple[Netlist, str]:
    """Parsed netlist of a circuit, through the cache.

    Returns:
        ``(netlist, key)``; ``key`` identifies the netlist content in the cache.
    """
    path, name = resolve_circuit(name_or_path)
    raw = path.read_bytes()
    key = cache_key("netlist", raw, {"name": name, "module": module, "suffix": path.suffix})
    cache = CircuitCache(cache_dir) if use_cache else None
    if cache is not None:
        hit = cache.get("netlist", key)
        if hit is not None:
            try:
                return _netlist_from_arrays(*hit), key
            except (KeyError, ValueError, UnicodeDecodeError) as e:
                log.warning("cache entry for %s unusable (%s); re-parsing", name, e)
    if len(raw) > 1 << 20:  # the Verilog parser runs at roughly 0.5 MB/s
        log.info("parsing %s (%.1f MB); the result is cached", path, len(raw) / 1e6)
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        text = None  # let the parser report it with the file name
    netlist = read_netlist(path, module=module, name=name, text=text)
    if cache is not None:  # only reached when parsing succeeded
        meta = {"name": name, "source": str(path), "num_nodes": netlist.num_nodes}
        _store(cache, "netlist", key, _netlist_arrays(netlist), meta)
    return netlist, key


def _store(cache: CircuitCache, kind: str, key: str, arrays: dict, meta: dict) -> None:
    # A full disk or read-only cache folder costs speed, not correctness.
    try:
        cache.put(kind, key, arrays, meta)
    except OSError as e:
        log.warning("could not write cache entry in %s (%s)", cache.root, e)


# ----------------------------------------------------------------------------- labels


def _label_settings(label: str, num_patterns: int, seed: int, flip_prob: float) -> dict:
    # Only the settings a label depends on go into its key.
    if label in ("level", "reverse_level"):
        return {}
    if label == "prob":
        return {"num_patterns": num_patterns, "seed": seed}
    return {"num_patterns": num_patterns, "seed": seed, "flip_prob": flip_prob}


def _compute_label(
    netlist: Netlist, label: str, settings: dict, level: Optional[np.ndarray]
) -> np.ndarray:
    if label == "level":
        return _labels.logic_level(netlist.edge_index, netlist.num_nodes)
    if label == "reverse_level":
        return _labels.reverse_level(netlist.edge_index, netlist.num_nodes)
    if label == "prob":
        return _labels.signal_probability(netlist, level=level, **settings)
    return _labels.toggle_rate(netlist, level=level, **settings)


def _get_labels(
    netlist: Netlist,
    netlist_key: str,
    labels: Sequence[str],
    cache: Optional[CircuitCache],
    num_patterns: int,
    seed: int,
    flip_prob: float,
) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    level = None
    for label in labels:
        settings = _label_settings(label, num_patterns, seed, flip_prob)
        key = cache_key("label", netlist_key, label, settings)
        hit = cache.get("label", key) if cache is not None else None
        if hit is not None and hit[0].get("value", np.empty(0)).shape == (netlist.num_nodes,):
            out[label] = hit[0]["value"]
            continue
        if label in ("prob", "toggle") and level is None:
            level = out.get("level")
            if level is None:
                level = _labels.logic_level(netlist.edge_index, netlist.num_nodes)
        value = _compute_label(netlist, label, settings, level)
        value = value.astype(np.int32 if label.endswith("level") else np.float32)
        if cache is not None:
            _store(cache, "label", key, {"value": value}, {"label": label, **settings})
        out[label] = value
    return out


# ----------------------------------------------------------------------------- Data


def _to_data(netlist: Netlist, values: dict[str, np.ndarray]) -> Data:
    data = Data(
        x=node_features(
            netlist.gate_type, netlist.is_output, netlist.is_pseudo_input, netlist.is_pseudo_output
        ),
        edge_index=torch.from_numpy(netlist.edge_index.astype(np.int64, copy=False)),
        num_nodes=netlist.num_nodes,
    )
    data.gate_type = torch.from_numpy(netlist.gate_type.astype(np.int64))
    for label in ("level", "reverse_level"):
        if label in values:
            level = torch.from_numpy(values[label].astype(np.int64))
            data[label] = level
            # Regression target in [0, 1]: divided by the circuit's depth.
            depth = int(level.max()) if level.numel() else 0
            data[f"{label}_norm"] = level.float() / max(1, depth)
    for label in ("prob", "toggle"):
        if label in values:
            data[label] = torch.from_numpy(values[label].astype(np.float32, copy=False))
    data.name = netlist.name
    data.family = family_of(netlist.name)
    data.node_names = netlist.node_names
    return data


def load_circuit(
    name_or_path: PathOrName,
    labels: Sequence[str] = _labels.LABELS,
    *,
    num_patterns: int = 65536,
    seed: int = 0,
    flip_prob: float = 0.1,
    module: Optional[str] = None,
    cache_dir: Optional[PathOrName] = None,
    use_cache: bool = True,
) -> Data:
    """Load a circuit as a ``torch_geometric.data.Data`` with per-node labels.

    Args:
        name_or_path: a bundled circuit name (see :func:`list_circuits`) or a path
            to a ``.v`` / ``.bench`` netlist.
        labels: any of ``"level"``, ``"reverse_level"``, ``"prob"``, ``"toggle"``.
        num_patterns: random patterns for ``prob`` and ``toggle`` (rounded up to a
            multiple of 64).
        seed: random seed of the simulations.
        flip_prob: per-input flip probability between patterns, for ``toggle``.
        module: Verilog module to read (default: file stem, else the first one).
        cache_dir: cache folder (default ``$GSR_CACHE_DIR`` or ``~/.cache/gsr_compiler``).
        use_cache: read and write the cache.

    Returns:
        ``Data`` with ``x`` ``[N, 16]`` (:data:`~gsr_compiler.circuits.FEATURE_NAMES`),
        ``edge_index`` ``[2, E]`` int64 fanin -> fanout, ``gate_type`` ``[N]``, the
        requested labels (``level`` and ``reverse_level`` as int64 plus
        ``level_norm`` / ``reverse_level_norm`` in [0, 1]; ``prob`` and ``toggle``
        as float32), and ``name``, ``family``, ``node_names``.

    Raises:
        UnknownCircuitError, FileNotFoundError, NetlistSyntaxError,
        CombinationalLoopError, NetlistError, ValueError (bad label name).
    """
    labels = tuple(dict.fromkeys(labels))  # de-duplicate, keep order
    unknown = [label for label in labels if label not in _labels.LABELS]
    if unknown:
        raise ValueError(f"unknown label(s) {unknown}; choose from {list(_labels.LABELS)}")
    netlist, key = load_netlist(
        name_or_path, module=module, cache_dir=cache_dir, use_cache=use_cache
    )
    cache = CircuitCache(cache_dir) if use_cache else None
    values = _get_labels(netlist, key, labels, cache, num_patterns, seed, flip_prob)
    return _to_data(netlist, values)


# ----------------------------------------------------------------------------- catalogue


@dataclass(frozen=True)
class CircuitInfo:
    """One bundled netlist. Size fields are ``None`` when listed with ``stats=False``.

    ``depth`` is the maximum logic level; ``inputs`` / ``outputs`` count primary
    ones; ``flip_flops`` counts pseudo-inputs (cut flip-flop outputs).
    """

    name: str
    family: str
    suite: str
    path: Path
    nodes: Optional[int] = None
    edges: Optional[int] = None
    depth: Optional[int] = None
    inputs: Optional[int] = None
    outputs: Optional[int] = None
    flip_flops: Optional[int] = None


def list_circuits(
    *,
    stats: bool = True,
    cache_dir: Optional[PathOrName] = None,
    use_cache: bool = True,
    progress: bool = False,
) -> list[CircuitInfo]:
    """Every netlist shipped with circuitgraph (65), sorted by name.

    With ``stats=True`` each circuit is parsed (or read from the cache) to fill in
    nodes, edges and depth; the first call parses all of them (about 80 s here).
    """
    names = bundled_names()
    infos = []
    iterator = names
    if stats and progress:
        from tqdm.auto import tqdm

        iterator = tqdm(names, desc="circuits", unit="netlist")
    for name in iterator:
        info = dict(
            name=name, family=family_of(name), suite=suite_of(name), path=bundled_path(name)
        )
        if stats:
            netlist, key = load_netlist(name, cache_dir=cache_dir, use_cache=use_cache)
            cache = CircuitCache(cache_dir) if use_cache else None
            level = _get_labels(netlist, key, ("level",), cache, 0, 0, 0.0)["level"]
            is_input = netlist.type_mask("input")
            info.update(
                nodes=netlist.num_nodes,
                edges=netlist.num_edges,
                depth=int(level.max(initial=0)),
                inputs=int((is_input & ~netlist.is_pseudo_input).sum()),
                outputs=int((netlist.is_output & ~netlist.is_pseudo_output).sum()),
                flip_flops=int(netlist.is_pseudo_input.sum()),
            )
        infos.append(CircuitInfo(**info))
    return infos


def format_circuit_table(infos: Sequence[CircuitInfo]) -> str:
    """Markdown table of :func:`list_circuits` output (used for docs/circuits.md)."""
    rows = [
        "| circuit | suite | family | nodes | edges | depth | inputs | outputs | flip-flops |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|",
    ]
    for i in infos:
        rows.append(
            f"| {i.name} | {i.suite} | {i.family} | {i.nodes} | {i.edges} | {i.depth} "
            f"| {i.inputs} | {i.outputs} | {i.flip_flops} |"
        )
    return "\n".join(rows)
