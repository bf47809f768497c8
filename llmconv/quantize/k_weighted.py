"""Importance-weighted K-quants: ggml's quantize_row_q{2,3,4,5,6}_K_impl with quant_weights.

With an importance matrix (one non-negative weight per input column, `qw[n]`), llama.cpp
quantizes every K-quant row through these routines instead of the *_ref ones. Per 256-weight
super-block they weight each sub-block's least-squares fit by

    weight[l] = qw[l] * sqrt(sigma2 + x[l]**2)     sigma2 = sum(x**2)/256 (q2_K) or 2*sum(x**2)/256

(q6_K uses qw as is), search scale and min with make_qkx3_quants (q2/q4/q5_K, 37 steps) or the
weighted make_qx_quants (q3/q6_K), then quantize the sub-block scales with make_qp_quants
(q2/q4/q5_K) or make_qx_quants (q3_K), weighted by each sub-block's weight sum, and finally
requantize every weight against the stored scales. Without an imatrix llama.cpp takes the
*_ref path (the kernels in q2_k.py ... q6_k.py), so those stay as they are.

Same conventions as k_common: float32 throughout, C's operation order, element-major arrays
([n, groups]) so a C loop over a group's elements is one vector operation over all groups.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from . import q6_k
from .k_common import (
    CHUNK_SUPERBLOCKS,
    F32,
    GROUP_MAX_EPS,
    MAGIC,
    QK_K,
    block_major,
    element_major,
    fp16_bits,
    fp16_value,
    levels_block_major,
    nearest_int,
    nearest_int_clip,
    pack_2bit_quarters,
    pack_scale_min_k4,
    seq_sum_from_zero,
    unpack_scale_min_k4,
)
from .k_search import make_qx_quants_rmse1, qkx2_search
from .q3_k import pack_scales as pack_q3_scales
from .q3_k import unpack_scales as unpack_q3_scales

_BITS = np.arange(8, dtype=np.uint8).reshape(1, 8, 1)


def over_superblocks_weighted(
    x: np.ndarray, qw: np.ndarray, type_size: int, quantize_chunk: Callable[[np.ndarray, np.ndarray], np.ndarray]
) -> np.ndarray:
    """quantize_chunk(xb [blocks, 256], qwb [blocks, 256]) over x[rows, n] with column weights qw[n]."""
    x = np.ascontiguousarray(x, dtype=F32)
    rows, n = x.shape
    if n % QK_K:
        raise ValueError(f"row length {n} is not a multiple of {QK_K}")
    qwb = np.ascontiguousarray(qw, dtype=F32).reshape(-1, QK_K)  # [n/256, 256]
    xb = x.reshape(-1, QK_K)
    out = np.empty((xb.shape[0], type_size), dtype=np.uint8)
    with np.errstate(all="ignore"):
        for start in range(0, xb.shape[0], CHUNK_SUPERBLOCKS):
            stop = min(start + CHUNK_SUPERBLOCKS, xb.shape[0])
            out[start:stop] = quantize_chunk(xb[start:stop], qwb[np.arange(start, stop) % qwb.shape[0]])
    return out.reshape(rows, n // QK_K * type_size)


def block_sigma2(xb: np.ndarray, factor: float) -> np.ndarray:
    """C: `float sumx2 = 0; for (j < 256) sumx2 += x[j]*x[j]; sigma2 = factor*sumx2/QK_K` per block."""
    xt = element_major(xb, QK_K)  # [256, nb]
    s = seq_sum_from_zero(xt * xt)
    if factor != 1:
        s = F32(factor) * s
    return s / F32(QK_K)


def importance(xt: np.ndarray, qwt: np.ndarray, sigma2: np.ndarray, groups_per_block: int) -> np.ndarray:
    """weight = qw * sqrtf(sigma2 + x*x) for element-major xt[n, groups]."""
    s = np.repeat(sigma2, groups_per_block)[None, :]
    return qwt * np.sqrt(s + xt * xt)


def make_qp_quants(x: np.ndarray, nmax: int, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml make_qp_quants(n, nmax, x, L, quant_weights=w) for x[n, groups] (non-negative scales).

    Scale search over iscale = (nmax + 0.1*k)/max, k = 0, -4..4, by weighted squared error, then
    up to 5 sweeps of coordinate descent on the levels (one L[i] at a time, sequential inside a
    group, vectorized across groups). C's L is a uint8_t: stores wrap, and the sweeps read the
    wrapped value back, so L is kept as uint8 here too. A group the last sweep left unchanged
    stays unchanged, so C's early exit needs no test of its own (see _qp_sweeps).
    Returns (scale[groups], L uint8[n, groups]).
    """
    fmax = np.maximum(x.max(axis=0), F32(0.0))  # C: MAX from 0
    zero = fmax < GROUP_MAX_EPS
    safe_max = np.where(zero, F32(1.0), fmax)
    fnmax = F32(nmax)

    iscale = fnmax / safe_max
    L = (nearest_int(iscale * x) & 0xFF).astype(np.uint8)  # no clamp on this first pass
    scale = F32(1.0) / iscale
    diff = x - scale * L.astype(F32)
    best_mse = seq_sum_from_zero(w * diff * diff)
    for k in range(-4, 5):
        if k == 0:
            continue
        iscale_k = (F32(0.1) * F32(k) + fnmax) / safe_max
        scale_k = F32(1.0) / iscale_k
        lk = np.minimum(nearest_int(iscale_k * x), nmax).astype(F32)
        diff = x - scale_k * lk
        mse = seq_sum_from_zero(w * diff * diff)
        better = mse < best_mse
        best_mse = np.where(better, mse, best_mse)
        iscale = np.where(better, iscale_k, iscale)

    li = np.minimum(nearest_int(iscale * x), nmax)  # int, may be negative
    L = (li & 0xFF).astype(np.uint8)
    lf = li.astype(F32)
    wx = w * x
    sumlx = seq_sum_from_zero(wx * lf)
    suml2 = seq_sum_from_zero(w * lf * lf)
    _qp_sweeps(x, w, wx, L, sumlx, suml2, nmax)
    out = np.where(suml2 > 0, sumlx / suml2, F32(0.0)).astype(F32)
    out[zero] = 0
    L[:, zero] = 0
    return out, L


def _qp_sweeps(
    x: np.ndarray, w: np.ndarray, wx: np.ndarray, L: np.ndarray, sumlx: np.ndarray, suml2: np.ndarray, nmax: int
) -> None:
    """make_qp_quants' 5 coordinate-descent sweeps over L [n, groups], in place (and sumlx,
    suml2). A group a sweep leaves unchanged stays unchanged in every later sweep (C stops it
    there), so each sweep runs over the groups the previous one changed only."""
    act = np.arange(x.shape[1])
    for _sweep in range(5):
        if act.size == x.shape[1]:  # first sweep: everything, no gather
            xa, wa, wxa, La, slx_a, sl2_a = x, w, wx, L, sumlx, suml2
        else:
            xa, wa, wxa, La = x[:, act], w[:, act], wx[:, act], L[:, act]
            slx_a, sl2_a = sumlx[act], suml2[act]
        changed = _qp_sweep(xa, wa, wxa, La, slx_a, sl2_a, nmax)
        if La is not L:
            L[:, act], sumlx[act], suml2[act] = La, slx_a, sl2_a
        act = act[changed]
        if not act.size:
            break


def make_qp_quants_pair(a: np.ndarray, b: np.ndarray, nmax: int, w: np.ndarray):
    """make_qp_quants of each block's scales a[nb, n] and of its mins b[nb, n], both weighted by
    w[nb, n], in one call over 2*nb groups (the searches are independent per group; one call
    halves numpy's per-call overhead, which is most of these small problems' cost).
    Returns ((scale[nb], L[n, nb]), (scale[nb], L[n, nb]))."""
    nb = a.shape[0]
    x = np.ascontiguousarray(np.concatenate([a, b]).T)  # [n, 2*nb]
    ww = np.ascontiguousarray(np.concatenate([w, w]).T)
    d, L = make_qp_quants(x, nmax, ww)
    return (d[:nb], L[:, :nb]), (d[nb:], L[:, nb:])


def _qp_sweep(x, w, wx, L, sumlx, suml2, nmax: int) -> np.ndarray:
    """One make_qp_quants sweep over the elements of the given groups: L (uint8, C's wrapping
    stores), sumlx and suml2 updated in place; returns which groups changed. Every temporary
    has a buffer: on these small arrays numpy's allocations cost more than the arithmetic."""
    m = sumlx.size
    changed = np.zeros(m, dtype=bool)
    Li, slx, sl2, v, nl, slx2, sl22, c1, c2 = (np.empty(m, F32) for _ in range(9))
    vi = v.view(np.int32)
    new_u8 = np.empty(m, np.uint8)
    take, flag = np.empty(m, bool), np.empty(m, bool)
    for i in range(x.shape[0]):
        np.copyto(Li, L[i], casting="unsafe")
        np.multiply(wx[i], Li, out=c1)
        np.subtract(sumlx, c1, out=slx)  # slx = sumlx - w*x*L
        np.multiply(w[i], Li, out=c1)
        c1 *= Li
        np.subtract(suml2, c1, out=sl2)  # sl2 = suml2 - w*L*L
        np.multiply(x[i], sl2, out=v)
        v /= slx
        v += MAGIC  # nearest_int, as in nearest_int()
        vi &= 0x007FFFFF
        vi -= 0x00400000
        np.minimum(vi, np.int32(nmax), out=vi)  # new_l
        np.copyto(nl, vi, casting="unsafe")
        np.multiply(wx[i], nl, out=slx2)
        slx2 += slx
        np.multiply(w[i], nl, out=sl22)
        sl22 *= nl
        sl22 += sl2
        np.multiply(slx2, slx2, out=c1)
        c1 *= suml2
        np.multiply(sumlx, sumlx, out=c2)
        c2 *= sl22
        np.greater(c1, c2, out=take)  # slx*slx*suml2 > sumlx*sumlx*sl2
        np.greater(slx, F32(0), out=flag)
        take &= flag
        np.greater(sl2, F32(0), out=flag)
        take &= flag
        np.not_equal(nl, Li, out=flag)  # new_l != L[i] (both exact in float32)
        take &= flag
        np.copyto(new_u8, vi, casting="unsafe")  # C's uint8_t store wraps
        np.copyto(L[i], new_u8, where=take)
        np.copyto(sumlx, slx2, where=take)
        np.copyto(suml2, sl22, where=take)
        changed |= take
    return changed


# ---------------------------------------------------------------- q2_K


def _q2_k_chunk(xb: np.ndarray, qwb: np.ndarray) -> np.ndarray:
    nb = xb.shape[0]
    xt = element_major(xb, 16)  # [16, nb*16]
    weights = importance(xt, element_major(qwb, 16), block_sigma2(xb, 1), 16)
    sw = seq_sum_from_zero(weights).reshape(nb, 16)
    scale, the_min, L_search = qkx2_search(xt, weights, 3, rmin=-0.9, rdelta=0.05, nstep=36, use_mad=False)
    (dm, Ls), (mm, Lm) = make_qp_quants_pair(scale.reshape(nb, 16), the_min.reshape(nb, 16), 15, sw)
    d_bits, dmin_bits = fp16_bits(dm), fp16_bits(mm)
    scales = (Ls.T | (Lm.T << 4)).astype(np.uint8)  # C: uint8 store of Ls | Lm << 4

    d = fp16_value(d_bits)[:, None] * (scales & 0xF).astype(F32)  # [nb, 16]
    m = fp16_value(dmin_bits)[:, None] * (scales >> 4).astype(F32)
    L = levels_block_major(xb, d, 0, 3, L_search, dm=m)  # d == 0: C keeps the search's L

    out = np.empty((nb, 84), dtype=np.uint8)
    out[:, 0:16] = scales
    out[:, 16:80] = pack_2bit_quarters(L)
    out[:, 80:82] = d_bits.reshape(nb, 1).view(np.uint8)
    out[:, 82:84] = dmin_bits.reshape(nb, 1).view(np.uint8)
    return out


# ---------------------------------------------------------------- q3_K


def _q3_k_chunk(xb: np.ndarray, qwb: np.ndarray) -> np.ndarray:
    nb = xb.shape[0]
    xt = element_major(xb, 16)
    weights = importance(xt, element_major(qwb, 16), block_sigma2(xb, 2), 16)
    sw = seq_sum_from_zero(weights).reshape(nb, 16)
    group_scale, L_search = make_qx_quants_rmse1(xt, 4, weights)
    d_block, Ls = make_qx_quants_rmse1(
        np.ascontiguousarray(group_scale.reshape(nb, 16).T), 32, np.ascontiguousarray(sw.T)
    )
    scales = pack_q3_scales(np.ascontiguousarray(Ls.T))
    d_bits = fp16_bits(d_block)

    sc = unpack_q3_scales(scales).astype(np.int8) - np.int8(32)
    d = (fp16_value(d_bits)[:, None] * sc.astype(F32)).reshape(1, -1)
    L_new = nearest_int_clip(xt / d, -4, 3)
    L_new += 4
    L = block_major(np.where(d != 0, L_new.astype(np.uint8), L_search), nb)

    high = L > 3
    hmask = np.bitwise_or.reduce(high.reshape(nb, 8, 32).astype(np.uint8) << _BITS, axis=1)
    L &= np.uint8(3)
    out = np.empty((nb, 110), dtype=np.uint8)
    out[:, 0:32] = hmask
    out[:, 32:96] = pack_2bit_quarters(L)
    out[:, 96:108] = scales
    out[:, 108:110] = d_bits.reshape(nb, 1).view(np.uint8)
    return out


# ---------------------------------------------------------------- q4_K / q5_K


def _scale_min_weighted(xb: np.ndarray, qwb: np.ndarray, nmax: int, cap63: bool):
    """The shared half of q4_K/q5_K_impl -> (d bits, dmin bits, scales[nb, 12], L[nb, 256])."""
    nb = xb.shape[0]
    xt = element_major(xb, 32)
    weights = importance(xt, element_major(qwb, 32), block_sigma2(xb, 2), 8)
    sw = seq_sum_from_zero(weights).reshape(nb, 8)
    scale, the_min, L_search = qkx2_search(xt, weights, nmax, rmin=-0.9, rdelta=0.05, nstep=36, use_mad=False)
    (d_block, Ls), (m_block, Lm) = make_qp_quants_pair(scale.reshape(nb, 8), the_min.reshape(nb, 8), 63, sw)
    if cap63:  # q5_K clamps, q4_K does not
        Ls, Lm = np.minimum(Ls, 63), np.minimum(Lm, 63)
    scales = pack_scale_min_k4(Ls.T, Lm.T)
    d_bits, dmin_bits = fp16_bits(d_block), fp16_bits(m_block)

    sc, mn = unpack_scale_min_k4(scales)  # C reads the packed bytes back
    d = fp16_value(d_bits)[:, None] * sc.astype(F32)  # [nb, 8]
    dm = fp16_value(dmin_bits)[:, None] * mn.astype(F32)
    L = levels_block_major(xb, d, 0, nmax, L_search, dm=dm)  # d == 0: C keeps the search's L
    return d_bits, dmin_bits, scales, L


def _head(out: np.ndarray, d_bits, dmin_bits, scales) -> None:
    nb = out.shape[0]
    out[:, 0:2] = d_bits.reshape(nb, 1).view(np.uint8)
    out[:, 2:4] = dmin_bits.reshape(nb, 1).view(np.uint8)
    out[:, 4:16] = scales


def _q4_k_chunk(xb: np.ndarray, qwb: np.ndarray) -> np.ndarray:
    nb = xb.shape[0]
    d_bits, dmin_bits, scales, L = _scale_min_weighted(xb, qwb, 15, cap63=False)
    q = L.reshape(nb, 4, 2, 32)
    out = np.empty((nb, 144), dtype=np.uint8)
    _head(out, d_bits, dmin_bits, scales)
    out[:, 16:144] = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(nb, 128)
    return out


def _q5_k_chunk(xb: np.ndarray, qwb: np.ndarray) -> np.ndarray:
    nb = xb.shape[0]
    d_bits, dmin_bits, scales, L = _scale_min_weighted(xb, qwb, 31, cap63=True)
    qh = np.bitwise_or.reduce((L.reshape(nb, 8, 32) >> 4) << _BITS, axis=1)
    low = (L & 0xF).reshape(nb, 4, 2, 32)
    out = np.empty((nb, 176), dtype=np.uint8)
    _head(out, d_bits, dmin_bits, scales)
    out[:, 16:48] = qh
    out[:, 48:176] = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(nb, 128)
    return out


# ---------------------------------------------------------------- entry points


def _entry(chunk_fn, type_size):
    def quantize_weighted(x: np.ndarray, qw: np.ndarray) -> np.ndarray:
        return over_superblocks_weighted(x, qw, type_size, chunk_fn)

    return quantize_weighted


q2_k_weighted = _entry(_q2_k_chunk, 84)
q3_k_weighted = _entry(_q3_k_chunk, 110)
q4_k_weighted = _entry(_q4_k_chunk, 144)
q5_k_weighted = _entry(_q5_k_chunk, 176)
q6_k_weighted = _entry(q6_k.quantize_chunk_weighted, q6_k.TYPE_SIZE)
