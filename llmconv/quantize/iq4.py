"""IQ4_NL and IQ4_XS: 4-bit codes into a non-linear 16-value grid, ggml's quantize_row_iq4_nl_impl.

    kvalues = -127 -104 -83 -65 -49 -35 -22 -10 1 13 25 38 53 69 89 113      (w = d * kvalues[code])

IQ4_NL: blocks of 32 weights, fp16 d + 16 bytes of codes (byte j: code j low, code j+16 high).
IQ4_XS: super-blocks of 256 = 8 blocks of 32: fp16 d, uint16 scales_h, scales_l[4], qs[128];
each block's scale is d * (ls - 32) with a 6-bit ls (low nibble in scales_l, two high bits in
scales_h).

Per 32-weight block the search weights each weight by qw * sqrt(sigma2 + x**2) with an imatrix
(sigma2 = 2 * sum(x**2) / super-block size), else by x**2; starts from d = max/127, then tries
the 15 scales (k - 127)/max, k = -7..7, keeping the best weighted least-squares fit. IQ4_XS
then quantizes the 8 block scales to 6 bits against d = -max_scale/32 and re-picks every code.
llama.cpp runs this search (ntry = 7) with and without an imatrix: ggml_quantize_chunk has no
other IQ4 path, so llama-quantize's files are these bytes either way.

Conventions as in k_common: float32, C's operation order, element-major [32, blocks] arrays.
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .k_common import F32, GROUP_MAX_EPS, QK_K, first_absmax, fp16_bits, nearest_int, seq_sum_from_zero

KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8)
_KF = KVALUES.astype(F32)
NTRY = 7
IQ4_NL_SIZE = GGML_QUANT_SIZES[GGMLQuantizationType.IQ4_NL][1]  # 18 bytes per 32 weights
IQ4_XS_SIZE = GGML_QUANT_SIZES[GGMLQuantizationType.IQ4_XS][1]  # 136 bytes per 256 weights
CHUNK_WEIGHTS = 1 << 18  # weights per numpy pass

# floor(a) + 128 -> how many kvalues are <= a (kvalues are integers, so floor decides), clamped
# to 1..15 so that (mu - 1, mu) is always a valid pair of neighbours.
_MU = np.clip(np.searchsorted(KVALUES.astype(np.int32), np.arange(-128, 115), side="right"), 1, 15).astype(np.intp)


def best_index(a: np.ndarray) -> np.ndarray:
    """ggml's best_index_int8(16, kvalues, a) elementwise: the nearest grid value's index,
    the upper one on a tie (`a - lo < hi - a ? lo : hi` in float32, as C compares)."""
    f = np.floor(a)
    np.clip(f, F32(-128), F32(114), out=f)
    f += F32(128)
    k = f.astype(np.intp).view(np.uintp)
    # NaN (from an overflowing imatrix) casts to the most negative integer; as unsigned it is
    # huge and lands on the top entry: C's binary search also ends at index 15 for NaN
    np.minimum(k, np.uintp(len(_MU) - 1), out=k)
    mu = _MU[k]
    lo = _KF[mu - 1]
    hi = _KF[mu]
    lower = (a - lo) < (hi - a)
    return mu - lower


def _sums(xt: np.ndarray, w: np.ndarray, idx: np.ndarray):
    q = _KF[idx]
    wq = w * q
    return seq_sum_from_zero(wq * xt), seq_sum_from_zero(wq * q)


def _block_scales(xt: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The per-block search: scale d[blocks] (0 for all-zero blocks)."""
    mx = first_absmax(xt)
    zero = np.abs(mx) < GROUP_MAX_EPS
    mx = np.where(zero, F32(1.0), mx)
    d = -mx / _KF[0]  # ntry > 0: d = -max/values[0]
    sumqx, sumq2 = _sums(xt, w, best_index(xt * (F32(1.0) / d)))
    d = np.where(sumq2 > 0, sumqx / sumq2, F32(0.0))
    best = d * sumqx
    for itry in range(-NTRY, NTRY + 1):
        iscale = F32(itry + int(KVALUES[0])) / mx
        sumqx, sumq2 = _sums(xt, w, best_index(xt * iscale))
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        d = np.where(better, sumqx / sumq2, d)
        best = np.where(better, d * sumqx, best)
    d[zero] = 0
    return d


def _weights(xt: np.ndarray, qwt: np.ndarray | None, super_sum: np.ndarray, super_size: int) -> np.ndarray:
    if qwt is None:
        return xt * xt
    sigma2 = super_sum * (F32(2.0) / F32(super_size))  # C: sigma2 *= 2.f/super_block_size
    return qwt * np.sqrt(sigma2[None, :] + xt * xt)


def _pack_codes(L: np.ndarray) -> np.ndarray:
    """L [blocks, 32] -> [blocks, 16]: byte j = code j | code j+16 << 4."""
    return (L[:, :16] | (L[:, 16:] << 4)).astype(np.uint8)


def _nl_chunk(xb: np.ndarray, qwb: np.ndarray | None) -> np.ndarray:
    """xb [blocks, 32] -> IQ4_NL blocks."""
    xt = np.ascontiguousarray(xb.T)
    w = _weights(xt, None if qwb is None else np.ascontiguousarray(qwb.T), seq_sum_from_zero(xt * xt), 32)
    d = _block_scales(xt, w)
    inv = np.where(d != 0, F32(1.0) / np.where(d != 0, d, F32(1.0)), F32(0.0))
    L = best_index(xt * inv).T.astype(np.uint8)
    out = np.empty((xb.shape[0], IQ4_NL_SIZE), np.uint8)
    out[:, 0:2] = fp16_bits(d).reshape(-1, 1).view(np.uint8)
    out[:, 2:] = _pack_codes(L)
    return out


def _xs_chunk(xb: np.ndarray, qwb: np.ndarray | None) -> np.ndarray:
    """xb [superblocks, 256] -> IQ4_XS blocks."""
    nb = xb.shape[0]
    x32 = xb.reshape(-1, 32)
    xt = np.ascontiguousarray(x32.T)  # [32, nb*8]
    x256 = np.ascontiguousarray(xb.T)
    s2 = np.repeat(seq_sum_from_zero(x256 * x256), 8)
    w = _weights(xt, None if qwb is None else np.ascontiguousarray(qwb.reshape(-1, 32).T), s2, QK_K)
    scales = _block_scales(xt, w).reshape(nb, 8)

    max_scale = first_absmax(np.ascontiguousarray(scales.T))  # C: first largest |d|
    max_scale = np.where(np.abs(max_scale) > 0, max_scale, F32(0.0))  # never above 0: +0
    d = -max_scale / F32(32)
    inv = np.where(d != 0, F32(1.0) / np.where(d != 0, d, F32(1.0)), F32(0.0))
    ls = np.clip(nearest_int(inv[:, None] * scales), -32, 31)  # [nb, 8]
    dl = d[:, None] * ls.astype(F32)
    idl = np.where(dl != 0, F32(1.0) / np.where(dl != 0, dl, F32(1.0)), F32(0.0))
    L = best_index(xt * idl.reshape(1, -1)).T.astype(np.uint8)  # [nb*8, 32]

    l6 = (ls + 32).astype(np.uint16)
    out = np.empty((nb, IQ4_XS_SIZE), np.uint8)
    out[:, 0:2] = fp16_bits(d).reshape(-1, 1).view(np.uint8)
    scales_h = np.bitwise_or.reduce((l6 >> 4) << (2 * np.arange(8, dtype=np.uint16)), axis=1).astype(np.uint16)
    out[:, 2:4] = scales_h.reshape(-1, 1).view(np.uint8)
    lo = (l6 & 0xF).astype(np.uint8)
    out[:, 4:8] = lo[:, 0::2] | (lo[:, 1::2] << 4)
    out[:, 8:] = _pack_codes(L).reshape(nb, 128)
    return out


def _over(x: np.ndarray, qw: np.ndarray | None, size: int, type_size: int, fn) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=F32)
    rows, n = x.shape
    if n % size:
        raise ValueError(f"row length {n} is not a multiple of {size}")
    xb = x.reshape(-1, size)
    qwb = None if qw is None else np.ascontiguousarray(qw, dtype=F32).reshape(-1, size)
    per_row = n // size
    out = np.empty((xb.shape[0], type_size), np.uint8)
    step = max(1, CHUNK_WEIGHTS // size)
    with np.errstate(all="ignore"):
        for s in range(0, xb.shape[0], step):
            e = min(s + step, xb.shape[0])
            out[s:e] = fn(xb[s:e], None if qwb is None else qwb[np.arange(s, e) % per_row])
    return out.reshape(rows, per_row * type_size)


def iq4_nl_quantize(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    return _over(x, qw, 32, IQ4_NL_SIZE, _nl_chunk)


def iq4_xs_quantize(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    return _over(x, qw, QK_K, IQ4_XS_SIZE, _xs_chunk)


def iq4_nl_dequantize(b: np.ndarray) -> np.ndarray:
    b = np.ascontiguousarray(b, dtype=np.uint8)
    rows = b.shape[0]
    blk = b.reshape(-1, IQ4_NL_SIZE)
    d = blk[:, 0:2].copy().view(np.float16).astype(F32)  # [B, 1]
    qs = blk[:, 2:]
    codes = np.concatenate([qs & 0xF, qs >> 4], axis=1)
    return (d * _KF[codes]).reshape(rows, -1)


def iq4_xs_dequantize(b: np.ndarray) -> np.ndarray:
    b = np.ascontiguousarray(b, dtype=np.uint8)
    rows = b.shape[0]
    blk = b.reshape(-1, IQ4_XS_SIZE)
    nb = blk.shape[0]
    d = blk[:, 0:2].copy().view(np.float16).astype(F32)  # [nb, 1]
    sh = blk[:, 2:4].copy().view(np.uint16).astype(np.int32)  # [nb, 1]
    sl = blk[:, 4:8]
    ib = np.arange(8)
    ls = ((sl[:, ib // 2] >> (4 * (ib % 2))) & 0xF).astype(np.int32) | (((sh >> (2 * ib)) & 3) << 4)
    dl = d * (ls - 32).astype(F32)  # [nb, 8]
    qs = blk[:, 8:].reshape(nb, 8, 16)
    codes = np.concatenate([qs & 0xF, qs >> 4], axis=2)  # [nb, 8, 32]
    return (dl[:, :, None] * _KF[codes]).reshape(rows, -1)
