"""Triton's counter-based random numbers (``tl.rand``), recomputed with torch.

Dropout in the kernels draws ``u = tl.rand(seed, offset + i)`` for element ``i``: Philox-4x32 with
10 rounds, keyed by the 64-bit seed, counter ``(offset_lo, offset_hi, 0, 0)``, and the first output
word mapped to ``[0, 1)``. The same ``(seed, offset)`` always gives the same numbers, so a
reversible block's recompute replays its dropout mask exactly without storing it.

:func:`philox_uniform` computes the identical numbers with integer torch ops, so the torch
reference paths (CPU) draw the same masks as the Triton kernels (GPU): a model trained with one
backend and checked with the other sees the same dropout. Unsigned 32-bit products are formed from
16-bit halves in int64, which never overflows.
"""
import torch

__all__ = ["philox_uniform", "dropout_keep_mask"]

_MASK32 = 0xFFFFFFFF
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
# ((2**23 - 1) / 2**23) * 2**-31, as triton.language.random.uint_to_uniform_float uses it.
_TO_UNIFORM = 4.6566127342e-10


def _mul_hi_lo(a: int, b: torch.Tensor):
    """High and low 32-bit words of ``a * b``, ``a`` a Python constant, ``b`` uint32-valued."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    hi_part = b * a_hi                    # < 2**48
    lo_part = b * a_lo                    # < 2**48
    high = (hi_part + (lo_part >> 16)) >> 16
    low = (((hi_part & 0xFFFF) << 16) + lo_part) & _MASK32
    return high & _MASK32, low


def _philox_first_word(seed: int, counter_lo: torch.Tensor, counter_hi: torch.Tensor,
                       rounds: int = 10) -> torch.Tensor:
    k0 = seed & _MASK32
    k1 = (seed >> 32) & _MASK32
    c0, c1 = counter_lo, counter_hi
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(rounds):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0


def philox_uniform(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """``tl.rand(seed, offsets)`` computed with torch: float32 uniforms in ``[0, 1)``.

    Args:
        seed: a non-negative integer below ``2**63``.
        offsets: non-negative integer tensor of counters (any shape, any device).
    """
    seed = int(seed)
    if not 0 <= seed < 2 ** 63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    offsets = offsets.to(torch.int64)
    word = _philox_first_word(seed, offsets & _MASK32, (offsets >> 32) & _MASK32)
    # Reinterpret as int32, fold negatives with bitwise not, scale into [0, 1).
    signed = torch.where(word >= 2 ** 31, word - 2 ** 32, word)
    signed = torch.where(signed < 0, -signed - 1, signed)
    return signed.to(torch.float32) * torch.tensor(_TO_UNIFORM, dtype=torch.float32,
                                                   device=signed.device)


def dropout_keep_mask(seed: int, offset: int, shape, p: float,
                      device=None) -> torch.Tensor:
    """Boolean keep-mask of dropout with probability ``p`` over a contiguous ``shape``.

    Element ``i`` (row-major) is kept when ``tl.rand(seed, offset + i) > p``, which is what the
    kernels in this package compute for their outputs.
    """
    numel = 1
    for s in shape:
        numel *= int(s)
    counters = torch.arange(numel, dtype=torch.int64, device=device) + int(offset)
    return (philox_uniform(seed, counters) > torch.tensor(p, dtype=torch.float32)
            .to(counters.device)).reshape(tuple(shape))
