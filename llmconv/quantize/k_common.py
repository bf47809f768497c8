"""Shared pieces of the K-quant kernels (q2_K ... q6_K): ggml's rounding and packing (the scale
searches are in k_search.py).

These follow llama.cpp's reference quantizers (the path llama-quantize takes when no importance
matrix is given) operation by operation, so that the bytes come out identical:

* every value is float32 and every operation is rounded to float32 in the same order as the C
  code (no float64 intermediates, no fused multiply-add: libggml-base is built for plain x86-64);
* sums are sequential loops in C, so here they are `seq_sum` over the element axis, never a
  pairwise `np.sum` along it;
* the work is vectorized across sub-blocks: arrays are laid out element-major, `[n, groups]`,
  so one C loop step over a group's n elements is one vector operation over all groups.
"""

from __future__ import annotations

import functools
from typing import Callable

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ._blocks import (
    fp16_bits32,
    output_blocks,
    select,
)  # fp16 rounding; output buffers; float32 np.where by bit operations (np.where branches per element)

try:  # the clip ufunc itself: np.clip adds ~5 us of Python per call, in loops over 16 elements
    from numpy._core.umath import clip as fast_clip
except ImportError:  # pragma: no cover
    fast_clip = np.clip

QK_K = GGML_QUANT_SIZES[GGMLQuantizationType.Q4_K][0]  # 256 weights per super-block
GROUP_MAX_EPS = np.float32(1e-15)  # below this a group counts as all zero

F32 = np.float32
MAGIC = F32(12582912.0)  # 1.5 * 2**23: adding it rounds to an integer, ties to even

# Super-blocks quantized per numpy pass: big enough that numpy's per-call overhead is small,
# small enough that the [n, groups] temporaries stay in the L2/L3 cache.
CHUNK_SUPERBLOCKS = 1024


def nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int, bit for bit: add 1.5*2**23 in float32 and read the low mantissa bits.

    Equal to round-half-to-even for |v| <= 2**22; for larger values (x/d with a tiny
    fp16 scale) it reproduces ggml's wrapped result, which the callers then clamp.
    """
    bits = (v + MAGIC).view(np.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def nearest_int_clip(v: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """clip(nearest_int(v), lo, hi) as int32, computed in v's own memory (v is consumed).

    Same operations as nearest_int, done in place: no fresh array-sized temporaries (on
    the 1 MB [16, groups] arrays, allocating them cost more than the arithmetic).
    """
    v += MAGIC
    vi = v.view(np.int32)
    vi &= 0x007FFFFF
    vi -= 0x00400000
    return fast_clip(vi, np.int32(lo), np.int32(hi), out=vi)


def round_small(v: np.ndarray) -> np.ndarray:
    """nearest_int for arguments known to satisfy |v| <= 2**22, kept as float32.

    Inside the scale searches the argument is bounded by nmax + 1, where rint and
    the magic-number trick agree exactly; this saves the integer round trip.
    """
    return np.rint(v, out=v)


def seq_sum(a: np.ndarray) -> np.ndarray:
    """Sum over axis 0 of a C-contiguous [n, groups] array in C's order: ((a0 + a1) + a2) + ...

    numpy reduces a non-innermost axis of a C-contiguous array row by row (out = a[0];
    out += a[1]; ...), i.e. sequentially for every group; pairwise summation is only used
    along the innermost axis. With a single group axis 1 disappears and numpy would sum
    pairwise, so that case takes an explicit loop. tests/test_k_quants.py checks both.
    """
    if a.ndim == 2 and a.shape[1] >= 2 and a.flags.c_contiguous:
        return np.add.reduce(a, axis=0)
    s = a[0].copy()
    for row in a[1:]:
        s += row
    return s


def seq_sum_from_zero(a: np.ndarray) -> np.ndarray:
    """C's `float s = 0; for (...) s += a[i];`: as seq_sum, plus the +0 start.

    Starting from +0 only matters when every term is -0 (C gets +0); adding +0 at
    the end gives the same result in that case and changes nothing otherwise.
    """
    s = seq_sum(a)
    s += F32(0.0)
    return s


_SUBSCRIPTS = {2: "ig,ig->g", 3: "ig,ig,ig->g"}


def seq_sum_of_products(*factors: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """C's `float s = 0; for (i...) s += a[i]*b[i]` (or `a[i]*b[i]*c[i]`, as (a*b)*c) per group,
    for C-contiguous [n, groups] float32 factors, in one pass and with no temporary.

    np.einsum does this with the element axis outermost: out = 0, then per i one vectorized
    `out += a[i]*b[i]` over the groups. Its loop is a multiply-add (npyv_muladd): two roundings
    where numpy's baseline has no FMA (x86-64 wheels), one where it has (ARM NEON, builds for
    x86-64-v3), which C's separate rounding of the product does not match; einsum_runs_c_loop
    checks which, once per process, and without it (or with a single group, where einsum puts
    the element axis innermost and keeps several partial sums) this takes the explicit loop.
    tests/test_k_quants.py checks both against the loop on order- and FMA-sensitive data.
    """
    if (
        factors[0].ndim == 2
        and factors[0].shape[1] >= 2
        and all(f.flags.c_contiguous for f in factors)
        and einsum_runs_c_loop()
    ):
        return np.einsum(_SUBSCRIPTS[len(factors)], *factors, out=out)
    terms = factors[0] * factors[1]
    for f in factors[2:]:
        terms *= f
    s = seq_sum_from_zero(terms)
    if out is None:
        return s
    out[...] = s
    return out


def _c_loop_sum_of_products(factors) -> np.ndarray:
    s = np.zeros(factors[0].shape[1], F32)
    for i in range(factors[0].shape[0]):
        term = factors[0][i] * factors[1][i]
        for f in factors[2:]:
            term = term * f[i]
        s = s + term
    return s


@functools.cache
def einsum_runs_c_loop(einsum: Callable = np.einsum) -> bool:
    """Whether `einsum` computes seq_sum_of_products's sums as C's loop does, on [16, 67] data
    (its vector and tail loops): random terms over 40 binades (another order shows), and a
    group where a fused multiply-add keeps the 2**-24 that rounding the product drops first."""
    rng = np.random.default_rng(0)
    for n, subscripts in _SUBSCRIPTS.items():
        f = (rng.standard_normal((n, 16, 67)) * 2.0 ** rng.uniform(-20, 20, (n, 16, 67))).astype(F32)
        f[:, :, 0] = 0
        f[:, 0, 0] = 1
        f[0, 0, 0] = -(1 + 2.0**-11)  # s = -(1 + 2**-11), then + (1 + 2**-12)**2 = 1 + 2**-11 + 2**-24
        f[:, 1, 0] = 1
        f[n - 2 :, 1, 0] = 1 + 2.0**-12
        with np.errstate(all="ignore"):
            got = np.asarray(einsum(subscripts, *f), dtype=F32)
            if not np.array_equal(got.view(np.uint32), _c_loop_sum_of_products(list(f)).view(np.uint32)):
                return False
    return True


def fp16_bits(v: np.ndarray) -> np.ndarray:
    """float32 -> fp16 bit pattern (uint16), round to nearest even like GGML_FP32_TO_FP16.

    By integer and float32 operations (_blocks.fp16_bits32): numpy's cast takes ~1.5 ns a
    value, and a slow path (~40 ns) whenever the result is an fp16 subnormal, which is where
    the super-block scales of small weights land. Equal to numpy's cast for every input
    (tests/test_k_quants.py).
    """
    f = np.asarray(v, dtype=F32)
    return fp16_bits32(f.reshape(-1)).astype(np.uint16).reshape(f.shape)


def fp16_value(bits: np.ndarray) -> np.ndarray:
    """fp16 bit pattern -> float32, like GGML_FP16_TO_FP32."""
    return np.asarray(bits, dtype=np.uint16).view(np.float16).astype(F32)


def _first_absmax_loop(x: np.ndarray) -> np.ndarray:
    """first_absmax by C's own loop: a running maximum of |x| with a strict `>`."""
    best = np.abs(x[0])
    value = np.array(x[0], dtype=F32)
    a = np.empty_like(best)
    for row in x[1:]:
        np.abs(row, out=a)
        larger = a > best
        np.copyto(value, row, where=larger)
        np.copyto(best, a, where=larger)
    return value


def first_absmax(x: np.ndarray) -> np.ndarray:
    """Per group (axis 0), the signed value with the largest |x|, the first one on ties.

    If the largest |x| occurs with one sign only, that is max(x) or min(x), whatever the
    order. Only groups holding both +a and -a (all-zero groups, and any NaN) depend on which
    comes first: those few run C's loop. (Two reductions beat the loop, whose random
    `where=` masks make numpy branch per element.)
    """
    mx = np.maximum.reduce(x, axis=0)
    mn = np.minimum.reduce(x, axis=0)
    neg = np.negative(mn)
    neg_wins = neg > mx
    value = select(neg_wins, mn, mx)
    tie = np.flatnonzero(~(neg_wins | (mx > neg)))
    if tie.size:
        sub = x[:, tie]
        if np.isfinite(mx[tie]).all():  # the loop's answer: the first |x| == max|x|
            value[tie] = sub[np.argmax(np.abs(sub) == mx[tie], axis=0), np.arange(tie.size)]
        else:  # NaN: where it stands decides
            value[tie] = _first_absmax_loop(sub)
    return value


TRANSPOSE_TILE = 4096  # sub-blocks per transpose call: source and destination tiles stay in cache


def element_major(xb: np.ndarray, group: int, out: np.ndarray | None = None) -> np.ndarray:
    """[blocks, 256] -> [group, blocks*256/group]: element index first, sub-blocks along the row
    (into `out` when given). Transposed in tiles of TRANSPOSE_TILE sub-blocks (~40 % faster than
    one call here)."""
    src = xb.reshape(-1, group)
    if out is None:
        out = np.empty((group, src.shape[0]), src.dtype)
    for s in range(0, src.shape[0], TRANSPOSE_TILE):
        np.copyto(out[:, s : s + TRANSPOSE_TILE], src[s : s + TRANSPOSE_TILE].T)
    return out


def block_major(xt: np.ndarray, nblocks: int) -> np.ndarray:
    """Inverse of element_major: [group, subblocks] -> [blocks, 256]."""
    return np.ascontiguousarray(xt.T).reshape(nblocks, QK_K)


def superblocks(b: np.ndarray, type_size: int) -> tuple[int, np.ndarray]:
    """uint8[rows, nbytes] -> (rows, uint8[rows * nbytes // type_size, type_size]): the blocks
    a dequantizer walks, one per row of the result."""
    b = np.ascontiguousarray(b, dtype=np.uint8)
    return b.shape[0], b.reshape(-1, type_size)


def over_superblocks(
    x: np.ndarray,
    type_size: int,
    quantize_chunk: Callable[[np.ndarray], np.ndarray],
    out: np.ndarray | None = None,
    chunk: int | None = None,
) -> np.ndarray:
    """Apply quantize_chunk([blocks, 256] float32 -> [blocks, type_size] uint8) to x[rows, n],
    `chunk` (default CHUNK_SUPERBLOCKS) super-blocks at a time, into `out` (a contiguous uint8
    buffer of the result's size) when given."""
    chunk = chunk or CHUNK_SUPERBLOCKS
    x = np.ascontiguousarray(x, dtype=F32)
    rows, n = x.shape
    if n % QK_K:
        raise ValueError(f"row length {n} is not a multiple of {QK_K}")
    xb = x.reshape(-1, QK_K)
    out = output_blocks(out, xb.shape[0], type_size)
    with np.errstate(all="ignore"):  # x/0 and 0/0 happen in groups whose result C discards too
        for start in range(0, xb.shape[0], chunk):
            stop = start + chunk
            out[start:stop] = quantize_chunk(xb[start:stop])
    return out.reshape(rows, n // QK_K * type_size)


# ---------------------------------------------------------------- 6-bit scale/min packing


def pack_scale_min_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """8 six-bit scales and mins per block -> the 12-byte `scales` field of q4_K/q5_K.

    Bytes 0-3: scale j (j<4) plus the top 2 bits of scale j+4 in bits 6-7;
    bytes 4-7: min j (j<4) plus the top 2 bits of min j+4; bytes 8-11: low nibbles
    of scale j+4 (bits 0-3) and min j+4 (bits 4-7).
    """
    ls = ls.astype(np.uint8)
    lm = lm.astype(np.uint8)
    out = np.empty((ls.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    out[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    return out


def unpack_scale_min_k4(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """12-byte `scales` field -> (scales[blocks, 8], mins[blocks, 8]) as uint8 (get_scale_min_k4)."""
    sc = np.empty((s.shape[0], 8), dtype=np.uint8)
    mn = np.empty((s.shape[0], 8), dtype=np.uint8)
    sc[:, 0:4] = s[:, 0:4] & 63
    mn[:, 0:4] = s[:, 4:8] & 63
    sc[:, 4:8] = (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)
    mn[:, 4:8] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return sc, mn


def levels_block_major(
    v: np.ndarray, d: np.ndarray, lo: int, hi: int, L_search, dm: np.ndarray | None = None
) -> np.ndarray:
    """The K-quants' final pass: L = MAX(lo, MIN(hi, nearest_int(v/d))) - lo, or with `dm`
    nearest_int((v + dm)/d) (q2_K/q4_K/q5_K's mins), for d[blocks, groups] the stored (fp16 * int)
    scale of each group of 256/groups weights; a group with d == 0 keeps the search's L
    (L_search[n, groups], element-major, or a function giving L_search[:, groups] for the
    group indices it is passed: those groups are few), as C skips it.

    Works block-major (d repeated over its group's weights), so the result needs no transpose.
    Returns uint8[blocks, 256] in 0..hi-lo.
    """
    n = v.shape[-1] // d.shape[-1]  # weights per group
    per_weight = np.repeat(d.reshape(-1), n).reshape(v.shape)
    if dm is None:
        v = np.divide(v, per_weight)
    else:  # C: (x + dm)/d
        v = np.add(v, np.repeat(dm.reshape(-1), n).reshape(v.shape))
        v /= per_weight
    v += MAGIC  # nearest_int, as in nearest_int()
    vi = v.view(np.int32)
    vi &= 0x007FFFFF
    vi -= 0x00400000 + lo  # ... - lo: the stored offset
    L = fast_clip(vi, np.int32(0), np.int32(hi - lo), out=vi).astype(np.uint8)
    skipped = np.flatnonzero(d.reshape(-1) == 0)
    if skipped.size:
        L.reshape(-1, n)[skipped] = (L_search(skipped) if callable(L_search) else L_search[:, skipped]).T
    return L


_THREES = np.uint64(0x0303030303030303)


def quarter_words(L: np.ndarray) -> np.ndarray:
    """uint8 L[blocks, 256] -> uint64[8, blocks, 4]: row m holds weights 32m..32m+31 of every
    block, 8 per word, so the bit packing below works 8 weights per operation on whole rows."""
    nb = L.shape[0]
    return np.ascontiguousarray(L.view(np.uint64).reshape(nb, 8, 4).transpose(1, 0, 2))


def pack_2bit_words(T: np.ndarray) -> np.ndarray:
    """quarter_words -> 64 bytes per block: byte 32*h + l holds bits 0-1 of L[128h + l + 32k]
    in bits 2k..2k+1."""
    qs = np.empty((2,) + T.shape[1:], dtype=np.uint64)
    t = np.empty_like(qs[0])
    for h in range(2):
        np.bitwise_and(T[4 * h], _THREES, out=qs[h])
        for k in range(1, 4):
            np.bitwise_and(T[4 * h + k], _THREES, out=t)
            t <<= np.uint64(2 * k)  # fields stay inside their byte: 3 << 6 < 256
            qs[h] |= t
    return np.ascontiguousarray(qs.transpose(1, 0, 2)).view(np.uint8).reshape(-1, 64)


def pack_2bit_quarters(L: np.ndarray) -> np.ndarray:
    """L[blocks, 256] in 0..3 -> 64 bytes: byte 32*h + l holds L[128h + l + 32k] in bits 2k..2k+1."""
    return pack_2bit_words(quarter_words(np.ascontiguousarray(L, dtype=np.uint8)))


def unpack_2bit_quarters(qs: np.ndarray) -> np.ndarray:
    """Inverse of pack_2bit_quarters: 64 bytes -> L[blocks, 256] in 0..3."""
    q = qs.reshape(-1, 2, 1, 32)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    return ((q >> shifts) & 3).reshape(-1, QK_K)
