r"""Per-node regression labels of a circuit.

``level``
    Logic level: the longest path, in edges, from any source (primary or
    pseudo input, constant) to the node. Sources are 0; every gate counts,
    NOT and BUF included:

    .. math:: \mathrm{level}(v) = \max_{u \in \mathrm{fanin}(v)} \mathrm{level}(u) + 1

``reverse_level``
    Longest path from the node to any sink (a node without fanout: primary or
    pseudo outputs, and dangling nets). With ``level`` it gives unit-delay slack
    ``depth - level - reverse_level``.

``prob``
    Signal probability :math:`P(v = 1)` when every input (primary, pseudo, and
    ``x`` constants) is an independent fair coin, estimated by bit-parallel
    simulation of ``num_patterns`` random patterns: 64 patterns per ``uint64``
    word, gates evaluated level by level with numpy. Standard error
    :math:`\sqrt{p(1-p)/n} \le 0.002` at the default :math:`n = 65536`.

``toggle``
    Switching probability: the inputs follow a random walk in which the first
    pattern is uniform and each input flips with probability ``flip_prob``
    (default 0.1) between consecutive patterns; ``toggle(v)`` is the fraction of
    the ``num_patterns - 1`` consecutive pairs in which ``v`` changes.

Everything here is deterministic given ``seed``, and the patterns do not depend
on how the simulation is chunked to bound memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .gates import GATE_TYPES, INVERTED, SIM_OP, gate_type_index
from .netlist import Netlist

__all__ = [
    "LABELS",
    "logic_level",
    "reverse_level",
    "signal_probability",
    "toggle_rate",
    "simulate",
]

#: Every label :func:`~gsr_compiler.circuits.load_circuit` can attach.
LABELS: tuple[str, ...] = ("level", "reverse_level", "prob", "toggle")

_WORD_BITS = 64
_P_BITS = 16  # resolution of flip_prob in toggle_rate
_ALL_ONES = np.uint64(0xFFFFFFFFFFFFFFFF)
# Bound on the simulated value matrix (nodes x words x 8 bytes) per chunk.
_SIM_MEMORY_BYTES = 256 << 20


# ----------------------------------------------------------------------------- CSR helpers


def _csr(rows: np.ndarray, cols: np.ndarray, num_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Compressed rows: ``cols[ptr[r]:ptr[r+1]]`` are the entries of row ``r``."""
    order = np.argsort(rows, kind="stable")
    ptr = np.zeros(num_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=num_rows), out=ptr[1:])
    return ptr, cols[order]


def _gather(ptr: np.ndarray, idx: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Concatenate the CSR rows ``rows`` (one vectorised gather, no Python loop)."""
    starts = ptr[rows]
    counts = ptr[rows + 1] - starts
    total = int(counts.sum())
    if total == 0:
        return idx[:0]
    offsets = np.repeat(starts - np.cumsum(counts) + counts, counts)
    return idx[offsets + np.arange(total)]


# ----------------------------------------------------------------------------- levels


def _longest_path_from_sources(src: np.ndarray, dst: np.ndarray, num_nodes: int) -> np.ndarray:
    """Kahn's algorithm, one numpy step per topological generation."""
    ptr, succ = _csr(src, dst, num_nodes)
    indegree = np.bincount(dst, minlength=num_nodes).astype(np.int64)
    level = np.full(num_nodes, -1, dtype=np.int64)
    frontier = np.flatnonzero(indegree == 0)
    depth, seen = 0, 0
    while frontier.size:
        level[frontier] = depth
        seen += frontier.size
        targets = _gather(ptr, succ, frontier)
        if targets.size == 0:
            break
        unique, counts = np.unique(targets, return_counts=True)
        indegree[unique] -= counts
        frontier = unique[indegree[unique] == 0]
        depth += 1
    if seen != num_nodes:
        raise ValueError("graph has a cycle; logic levels are defined on DAGs only")
    return level


def logic_level(edge_index: np.ndarray, num_nodes: int) -> np.ndarray:
    """Longest path (in edges) from any source to each node; ``int64 [N]``."""
    edge_index = np.asarray(edge_index)
    return _longest_path_from_sources(edge_index[0], edge_index[1], num_nodes)


def reverse_level(edge_index: np.ndarray, num_nodes: int) -> np.ndarray:
    """Longest path (in edges) from each node to any sink; ``int64 [N]``."""
    edge_index = np.asarray(edge_index)
    return _longest_path_from_sources(edge_index[1], edge_index[0], num_nodes)


# ----------------------------------------------------------------------------- simulation


@dataclass
class _Step:
    """Gates of one level, one type and one fanin count: a few whole-array numpy calls."""

    out: slice | np.ndarray  # rows written (a slice when they are contiguous)
    fanin: np.ndarray  # int64 [arity, gates]: j-th fanin of each gate
    op: np.ufunc | None  # bitwise and/or/xor; None for BUF/NOT
    invert: bool  # NOT, NAND, NOR, XNOR


_UFUNC = {"and": np.bitwise_and, "or": np.bitwise_or, "xor": np.bitwise_xor, "buf": None}


def _plan(netlist: Netlist, level: np.ndarray) -> list[_Step]:
    """Group gates by (level, type, fanin count); each group is evaluated at once."""
    num_nodes = netlist.num_nodes
    src, dst = netlist.edge_index
    in_ptr, in_idx = _csr(dst, src, num_nodes)
    arity = np.diff(in_ptr)
    is_gate = np.zeros(len(GATE_TYPES), dtype=bool)
    for gate in SIM_OP:
        is_gate[gate_type_index(gate)] = True
    gates = np.flatnonzero(is_gate[netlist.gate_type])
    if gates.size and (arity[gates] == 0).any():
        raise ValueError("a gate without fanin cannot be simulated")
    gate_type = netlist.gate_type[gates].astype(np.int64)
    gates = gates[np.lexsort((gates, arity[gates], gate_type, level[gates]))]
    key = np.stack([level[gates], netlist.gate_type[gates], arity[gates]])
    bounds = np.flatnonzero((np.diff(key, axis=1) != 0).any(axis=0)) + 1
    all_fanin = _gather(in_ptr, in_idx, gates)  # one gather for every step
    fanin_start = np.concatenate([[0], np.cumsum(arity[gates])])
    steps = []
    for lo, hi in zip(np.concatenate([[0], bounds]), np.concatenate([bounds, [gates.size]])):
        group = gates[lo:hi]
        gate = GATE_TYPES[netlist.gate_type[group[0]]]
        k = int(arity[group[0]])
        fanin = all_fanin[fanin_start[lo] : fanin_start[hi]].reshape(group.size, k).T.copy()
        contiguous = group[-1] - group[0] + 1 == group.size
        steps.append(
            _Step(
                out=slice(int(group[0]), int(group[-1]) + 1) if contiguous else group,
                fanin=fanin,
                op=_UFUNC[SIM_OP[gate]],
                invert=gate in INVERTED,
            )
        )
    return steps


def _run_step(values: np.ndarray, step: _Step) -> None:
    fanin = step.fanin
    direct = isinstance(step.out, slice)
    target = values[step.out] if direct else None  # a view: results land in place
    if step.op is None or fanin.shape[0] == 1:  # BUF/NOT, or a one-input AND/OR/XOR
        out = np.take(values, fanin[0], axis=0, out=target)
    else:
        first, second = np.take(values, fanin[0], axis=0), np.take(values, fanin[1], axis=0)
        out = step.op(first, second, out=target)
        for j in range(2, fanin.shape[0]):
            step.op(out, np.take(values, fanin[j], axis=0), out=out)
    if step.invert:
        np.invert(out, out=out)
    if not direct:
        values[step.out] = out


def simulate(
    netlist: Netlist,
    input_words: np.ndarray,
    *,
    level: np.ndarray | None = None,
    memory_bytes: int | None = None,
) -> Iterator[tuple[slice, np.ndarray]]:
    """Bit-parallel logic simulation.

    Args:
        netlist: the circuit.
        input_words: ``uint64 [S, W]`` values of the *random sources* (nodes of
            type ``input`` or ``x``, in node order), 64 patterns per word.
        level: precomputed :func:`logic_level` (computed if omitted).
        memory_bytes: bound on the per-chunk value matrix ``[N, chunk]``
            (default 256 MiB).

    Yields:
        ``(words, values)``: for consecutive word ranges, ``values[v, w]`` holds
        the value of node ``v`` in those patterns (``uint64 [N, chunk]``).
    """
    if level is None:
        level = logic_level(netlist.edge_index, netlist.num_nodes)
    if memory_bytes is None:
        memory_bytes = _SIM_MEMORY_BYTES
    steps = _plan(netlist, level)
    sources = np.flatnonzero(netlist.type_mask("input", "x"))
    ones = np.flatnonzero(netlist.type_mask("1"))
    if input_words.shape[0] != sources.size:
        raise ValueError(f"expected {sources.size} source rows, got {input_words.shape[0]}")
    num_words = input_words.shape[1]
    chunk = int(max(1, min(num_words, memory_bytes // (8 * max(1, netlist.num_nodes)))))
    for start in range(0, num_words, chunk):
        words = slice(start, min(num_words, start + chunk))
        values = np.zeros((netlist.num_nodes, words.stop - words.start), dtype=np.uint64)
        values[sources] = input_words[:, words]
        values[ones] = _ALL_ONES  # constant-0 nodes stay zero
        for step in steps:
            _run_step(values, step)
        yield words, values


def _num_words(num_patterns: int) -> int:
    if num_patterns < 2:
        raise ValueError(f"num_patterns must be at least 2, got {num_patterns}")
    return -(-num_patterns // _WORD_BITS)  # rounded up to whole words


_BYTE_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _popcount(words: np.ndarray) -> np.ndarray:
    """Number of set bits per row of a ``uint64 [N, W]`` array."""
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(words).sum(axis=1, dtype=np.int64)
    as_bytes = np.ascontiguousarray(words).view(np.uint8)
    return _BYTE_POPCOUNT[as_bytes].sum(axis=1, dtype=np.int64)


def signal_probability(
    netlist: Netlist,
    *,
    num_patterns: int = 65536,
    seed: int = 0,
    level: np.ndarray | None = None,
) -> np.ndarray:
    """Probability that each node is 1 under uniform random inputs (``float64 [N]``).

    ``num_patterns`` is rounded up to a multiple of 64.
    """
    num_words = _num_words(num_patterns)
    rng = np.random.default_rng(seed)
    num_sources = int(netlist.type_mask("input", "x").sum())
    # Uniform random bits, all drawn up front so chunking cannot change them.
    inputs = rng.integers(0, _ALL_ONES, (num_sources, num_words), dtype=np.uint64, endpoint=True)
    ones = np.zeros(netlist.num_nodes, dtype=np.int64)
    for _, values in simulate(netlist, inputs, level=level):
        ones += _popcount(values)
    return ones / (num_words * _WORD_BITS)


def _prefix_xor(words: np.ndarray) -> np.ndarray:
    """Running XOR along the bit stream (pattern ``t`` = word ``t//64``, bit ``t%64``)."""
    x = words.copy()
    for shift in (1, 2, 4, 8, 16, 32):  # log-step prefix inside each word
        x ^= x << np.uint64(shift)
    # Carry: word w is flipped when the words before it hold an odd number of ones.
    parity = (x >> np.uint64(63)).astype(bool)
    carry = np.logical_xor.accumulate(parity, axis=1)
    x[:, 1:][carry[:, :-1]] ^= _ALL_ONES
    return x


def _bernoulli_words(rng: np.random.Generator, shape: tuple[int, int], p: float) -> np.ndarray:
    """Packed random bits, each 1 with probability ``p`` (quantised to 2**-16).

    Bit-serial comparison ``U < p`` of a 16-bit uniform ``U`` against ``p``,
    from the least significant bit up: 16 random words per 64 outputs, and no
    per-bit arrays.
    """
    threshold = min(round(p * (1 << _P_BITS)), 1 << _P_BITS)
    if threshold == 1 << _P_BITS:
        return np.full(shape, _ALL_ONES)
    below = np.zeros(shape, dtype=np.uint64)  # [suffix of U < suffix of p]
    count = shape[0] * shape[1]
    for bit in range(_P_BITS):  # bit 0 = least significant of the 16
        r = rng.bit_generator.random_raw(count).reshape(shape)
        if (threshold >> bit) & 1:
            below |= ~r  # p has a 1 here: U < p if U has 0, or ties and the rest is below
        else:
            below &= ~r  # p has a 0 here: U < p only if U has 0 and the rest is below
    return below


def _random_walk_words(
    rng: np.random.Generator, num_sources: int, num_patterns: int, flip_prob: float
) -> np.ndarray:
    """Input sequences for :func:`toggle_rate`: uniform start, then flips w.p. ``flip_prob``."""
    num_words = num_patterns // _WORD_BITS
    out = np.empty((num_sources, num_words), dtype=np.uint64)
    block = max(1, (16 << 20) // (8 * num_words))  # ~16 MB of words at a time
    for start in range(0, num_sources, block):
        rows = min(block, num_sources - start)
        changes = _bernoulli_words(rng, (rows, num_words), flip_prob)
        # the first pattern is uniform: its "change" bit is a fair coin
        first = rng.integers(0, 2, rows, dtype=np.uint64)
        changes[:, 0] = (changes[:, 0] & ~np.uint64(1)) | first
        out[start : start + rows] = _prefix_xor(changes)  # value = xor of all changes so far
    return out


def toggle_rate(
    netlist: Netlist,
    *,
    num_patterns: int = 65536,
    seed: int = 0,
    flip_prob: float = 0.1,
    level: np.ndarray | None = None,
) -> np.ndarray:
    """Fraction of consecutive pattern pairs in which each node changes (``float64 [N]``).

    ``num_patterns`` is rounded up to a multiple of 64; ``flip_prob`` is used to a
    resolution of 2**-16 (0.1 becomes 0.100006).
    """
    if not 0.0 <= flip_prob <= 1.0:
        raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
    num_words = _num_words(num_patterns)
    rng = np.random.default_rng(seed)
    num_sources = int(netlist.type_mask("input", "x").sum())
    inputs = _random_walk_words(rng, num_sources, num_words * _WORD_BITS, flip_prob)

    one, top = np.uint64(1), np.uint64(63)
    low_bits = np.uint64(0x7FFFFFFFFFFFFFFF)
    changes = np.zeros(netlist.num_nodes, dtype=np.int64)
    previous_last = None
    for _, values in simulate(netlist, inputs, level=level):
        # following[t] = value at pattern t + 1: shift right by one bit, and pull
        # bit 0 of the next word into bit 63.
        following = values >> one
        following[:, :-1] |= values[:, 1:] << top
        following ^= values  # 1 where pattern t and t + 1 differ
        following[:, -1] &= low_bits  # its partner lies in the next chunk
        changes += _popcount(following)
        if previous_last is not None:  # pair across the chunk boundary
            changes += ((previous_last >> top) ^ (values[:, 0] & one)).astype(np.int64)
        previous_last = values[:, -1].copy()
        del following
    return changes / (num_words * _WORD_BITS - 1)
