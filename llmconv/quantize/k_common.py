"""Shared pieces of the K-quant kernels (q2_K ... q6_K): ggml's rounding, scale search and packing.

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

from typing import Callable

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ._blocks import output_blocks, select   # output buffers; float32 np.where by bit operations (np.where branches per element)

try:  # the clip ufunc itself: np.clip adds ~5 us of Python per call, in loops over 16 elements
    from numpy._core.umath import clip as _clip
except ImportError:  # pragma: no cover
    _clip = np.clip

QK_K = GGML_QUANT_SIZES[GGMLQuantizationType.Q4_K][0]   # 256 weights per super-block
GROUP_MAX_EPS = np.float32(1e-15)  # below this a group counts as all zero

F32 = np.float32
_MAGIC = F32(12582912.0)          # 1.5 * 2**23: adding it rounds to an integer, ties to even

# Super-blocks quantized per numpy pass: big enough that numpy's per-call overhead is small,
# small enough that the [n, groups] temporaries stay in the L2/L3 cache.
CHUNK_SUPERBLOCKS = 1024


def nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int, bit for bit: add 1.5*2**23 in float32 and read the low mantissa bits.

    Equal to round-half-to-even for |v| <= 2**22; for larger values (x/d with a tiny
    fp16 scale) it reproduces ggml's wrapped result, which the callers then clamp.
    """
    bits = (v + _MAGIC).view(np.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def nearest_int_clip(v: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """clip(nearest_int(v), lo, hi) as int32, computed in v's own memory (v is consumed).

    Same operations as nearest_int, done in place: no fresh array-sized temporaries (on
    the 1 MB [16, groups] arrays, allocating them cost more than the arithmetic).
    """
    v += _MAGIC
    vi = v.view(np.int32)
    vi &= 0x007FFFFF
    vi -= 0x00400000
    return _clip(vi, np.int32(lo), np.int32(hi), out=vi)


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


def fp16_bits(v: np.ndarray) -> np.ndarray:
    """float32 -> fp16 bit pattern (uint16), round to nearest even like GGML_FP32_TO_FP16."""
    return np.asarray(v, dtype=F32).astype(np.float16).view(np.uint16)


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
        value[tie] = _first_absmax_loop(x[:, tie])
    return value


def element_major(xb: np.ndarray, group: int) -> np.ndarray:
    """[blocks, 256] -> [group, blocks*256/group]: element index first, sub-blocks along the row."""
    return np.ascontiguousarray(xb.reshape(-1, group).T)


def block_major(xt: np.ndarray, nblocks: int) -> np.ndarray:
    """Inverse of element_major: [group, subblocks] -> [blocks, 256]."""
    return np.ascontiguousarray(xt.T).reshape(nblocks, QK_K)


def superblocks(b: np.ndarray, type_size: int) -> tuple[int, np.ndarray]:
    """uint8[rows, nbytes] -> (rows, uint8[rows * nbytes // type_size, type_size]): the blocks
    a dequantizer walks, one per row of the result."""
    b = np.ascontiguousarray(b, dtype=np.uint8)
    return b.shape[0], b.reshape(-1, type_size)


def over_superblocks(x: np.ndarray, type_size: int, quantize_chunk: Callable[[np.ndarray], np.ndarray],
                     out: np.ndarray | None = None) -> np.ndarray:
    """Apply quantize_chunk([blocks, 256] float32 -> [blocks, type_size] uint8) to x[rows, n],
    into `out` (a contiguous uint8 buffer of the result's size) when given."""
    x = np.ascontiguousarray(x, dtype=F32)
    rows, n = x.shape
    if n % QK_K:
        raise ValueError(f"row length {n} is not a multiple of {QK_K}")
    xb = x.reshape(-1, QK_K)
    out = output_blocks(out, xb.shape[0], type_size)
    with np.errstate(all="ignore"):  # x/0 and 0/0 happen in groups whose result C discards too
        for start in range(0, xb.shape[0], CHUNK_SUPERBLOCKS):
            stop = start + CHUNK_SUPERBLOCKS
            out[start:stop] = quantize_chunk(xb[start:stop])
    return out.reshape(rows, n // QK_K * type_size)


# ---------------------------------------------------------------- scale searches


def make_qx_quants_rmse1(x: np.ndarray, nmax: int,
                         weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """ggml make_qx_quants(n, nmax, x, L, rmse_type=1, qw) for x[n, groups].

    Symmetric quantization to [-nmax, nmax-1] weighted by `weights` (qw; x**2 when None, as
    C does for qw=NULL): try iscale = -(nmax + 0.1*k)/max for k = 0, -9..9 and keep the one
    with the largest sumlx**2/suml2.
    Returns (scale[groups], L[n, groups] as uint8 in 0..2*nmax-1; all zero for all-zero groups).
    """
    amax_signed = first_absmax(x)
    zero = np.abs(amax_signed) < GROUP_MAX_EPS
    safe_max = np.where(zero, F32(1.0), amax_signed)

    w = x * x if weights is None else weights
    wx = w * x                                     # C: w*x[i]*l == (w*x[i])*l
    lo, hi = F32(-nmax), F32(nmax - 1)
    l = np.empty_like(x)
    t = np.empty_like(x)

    # Overflowed inputs (inf scales from an extreme imatrix) make x*iscale inf or NaN, where
    # rint differs from C's nearest_int: take the exact integer path then.
    exact = not np.isfinite(x).all()

    def levels(iscale):
        np.multiply(x, iscale, out=l)
        if exact:
            l[...] = nearest_int_clip(l.copy(), -nmax, nmax - 1)
        else:
            round_small(l)
            _clip(l, lo, hi, out=l)

    def sums(iscale):
        levels(iscale)
        np.multiply(wx, l, out=t)
        sumlx = seq_sum_from_zero(t)
        np.multiply(w, l, out=t)
        np.multiply(t, l, out=t)                   # C: w*l*l == (w*l)*l
        suml2 = seq_sum_from_zero(t)
        return sumlx, suml2

    best_iscale = F32(-nmax) / safe_max
    sumlx, suml2 = sums(best_iscale)
    scale = np.where(suml2 != 0, sumlx / suml2, F32(0.0))
    best = scale * sumlx
    for k in range(-9, 10):
        if k == 0:
            continue
        iscale = -(F32(nmax) + F32(0.1) * F32(k)) / safe_max
        sumlx, suml2 = sums(iscale)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        new_scale = sumlx / suml2
        scale = select(better, new_scale, scale)
        best = select(better, new_scale * sumlx, best)
        best_iscale = select(better, iscale, best_iscale)

    # L of the winning iscale (C recomputes it the same way when it keeps a candidate)
    levels(best_iscale)
    L = (l + F32(nmax)).astype(np.uint8)
    L[:, zero] = 0
    scale = np.where(zero, F32(0.0), scale)
    return scale, L


def make_q3_quants_rmse(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """ggml make_q3_quants(n, nmax, x, L, do_rmse=true) for x[n, groups].

    Start from iscale = -nmax/max, then up to 5 sweeps of coordinate descent that move one L[i]
    at a time to the value that best fits the current least-squares scale. The sweep is
    sequential inside a group, so it loops over i and vectorizes across groups. A group whose
    sweep changed nothing would change nothing in the next sweep either, so running all five
    sweeps for every group gives C's result with its early exit.
    Returns (scale[groups], L[n, groups] uint8 in 0..2*nmax-1; all zero for all-zero groups).
    """
    n = x.shape[0]
    amax_signed = first_absmax(x)
    zero = np.abs(amax_signed) < GROUP_MAX_EPS
    safe_max = np.where(zero, F32(1.0), amax_signed)
    iscale = F32(-nmax) / safe_max

    L = nearest_int_clip(x * iscale, -nmax, nmax - 1).astype(F32)
    w = x * x
    wx = w * x
    sumlx = seq_sum_from_zero(wx * L)
    t = w * L
    t *= L
    suml2 = seq_sum_from_zero(t)

    # Only groups that changed in the last sweep can change in the next one: sweep those.
    lo_i, hi_i = np.int32(-nmax), np.int32(nmax - 1)
    active = np.arange(x.shape[1])
    for _sweep in range(5):
        if active.size == 0:
            break
        if active.size == x.shape[1]:                # first sweep: everything, no gather
            xa, wa, wxa, La, slx_a, sl2_a = x, w, wx, L, sumlx, suml2
        else:
            xa, wa, wxa, La = x[:, active], w[:, active], wx[:, active], L[:, active]
            slx_a, sl2_a = sumlx[active], suml2[active]
        changed = np.zeros(active.size, dtype=bool)
        # Every temporary has a preallocated buffer: these loops run 80 times per chunk on
        # small arrays, where numpy's allocation and call overhead is most of the cost.
        slx, sl2, v, nl, slx2, sl22, c1, c2 = (np.empty(active.size, F32) for _ in range(8))
        vi = v.view(np.int32)
        take, flag = np.empty(active.size, bool), np.empty(active.size, bool)
        for i in range(n):
            wi, wxi, xi, Li = wa[i], wxa[i], xa[i], La[i]
            np.multiply(wxi, Li, out=c1)
            np.subtract(slx_a, c1, out=slx)                     # slx = sumlx - w*x*L
            np.multiply(wi, Li, out=c1)
            c1 *= Li
            np.subtract(sl2_a, c1, out=sl2)                     # sl2 = suml2 - w*L*L
            np.multiply(xi, sl2, out=v)
            v /= slx
            v += _MAGIC                                         # nearest_int, as in nearest_int()
            vi &= 0x007FFFFF
            vi -= 0x00400000
            _clip(vi, lo_i, hi_i, out=vi)
            np.copyto(nl, vi, casting="unsafe")                 # new_l as float32
            np.multiply(wxi, nl, out=slx2)
            slx2 += slx
            np.multiply(wi, nl, out=sl22)
            sl22 *= nl
            sl22 += sl2
            np.multiply(slx2, slx2, out=c1)
            c1 *= sl2_a
            np.multiply(slx_a, slx_a, out=c2)
            c2 *= sl22
            np.greater(c1, c2, out=take)                        # (slx2^2)*suml2 > (sumlx^2)*sl22
            np.greater(slx, F32(0), out=flag)
            take &= flag
            np.not_equal(nl, Li, out=flag)
            take &= flag
            np.greater(sl22, F32(0), out=flag)
            take &= flag
            np.copyto(Li, nl, where=take)
            np.copyto(slx_a, slx2, where=take)
            np.copyto(sl2_a, sl22, where=take)
            changed |= take
        if La is not L:
            L[:, active] = La
            sumlx[active] = slx_a
            suml2[active] = sl2_a
        active = active[changed]

    scale = np.where(suml2 > 0, sumlx / suml2, F32(0.0))
    Lq = (L + F32(nmax)).astype(np.uint8)
    Lq[:, zero] = 0
    scale = np.where(zero, F32(0.0), scale)
    return scale, Lq


def first_min_clamped(x: np.ndarray) -> np.ndarray:
    """C's `min = x[0]; if (x[i] < min) min = x[i]; ... if (min > 0) min = 0;` per group (axis 0).

    Only the sign of a zero minimum depends on the order: C keeps the first zero it meets
    (stored as is in q4_1/q5_1's m by the weighted search), and +0 when every x > 0.
    """
    xmin = x.min(axis=0)
    zero = np.flatnonzero(xmin == 0)
    if zero.size:
        sub = x[:, zero]
        xmin[zero] = sub[np.argmax(sub == 0, axis=0), np.arange(zero.size)]
    xmin[xmin > 0] = F32(0.0)
    return xmin


def make_qkx2_quants(x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float,
                     nstep: int, use_mad: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ggml make_qkx2_quants for x[n, groups]: asymmetric quantization x ~ scale*L - the_min.

    Start with L spanning [min(x, 0), max(x)], then for iscale = (rmin + rdelta*k + nmax)/(max-min),
    k = 0..nstep, fit scale and min by weighted least squares and keep the candidate with the
    smallest weighted squared (use_mad: absolute) error.
    Returns (scale[groups], the_min[groups] (= -min), L[n, groups] uint8 in 0..nmax).

    This is also ggml's make_qkx3_quants with explicit weights (the imatrix paths): the two
    differ only in `max == min` vs `max <= min` for the flat case, the same test once min <= max.
    """
    xmin = first_min_clamped(x)
    xmax = x.max(axis=0)
    flat = xmax == xmin
    live = ~flat

    sum_w = seq_sum(weights)                        # C starts these at element 0, not at 0
    sum_x = seq_sum(weights * x)
    fnmax = F32(nmax)
    xm = x - xmin                                   # C: iscale*(x[i] - min), kept up to date below
    l = np.empty_like(x)
    t = np.empty_like(x)

    def levels(iscale):
        np.multiply(xm, iscale, out=l)
        if np.isfinite(iscale).all():
            round_small(l)                          # |iscale*(x - min)| <= nmax + 1 here
            _clip(l, F32(0.0), fnmax, out=l)        # once min moved, x - min can be < 0
        else:
            # max - min subnormal: iscale is inf, and C's nearest_int of inf/NaN gives
            # -4194304/0, clamped to 0 (rint would give nmax)
            l[...] = nearest_int_clip(l.copy(), 0, nmax)
        return l

    def error(scale, minv, l):
        np.multiply(l, scale, out=t)                # C: scale*L[i] + min - x[i]
        np.add(t, minv, out=t)
        np.subtract(t, x, out=t)
        if use_mad:
            np.abs(t, out=t)
        else:
            np.multiply(t, t, out=t)
        np.multiply(t, weights, out=t)
        return seq_sum_from_zero(t)

    # C updates `min` whenever a candidate wins, and later candidates measure both
    # iscale and the levels from that updated min; so track it, and the (iscale, min)
    # pair that produced the kept L.
    minv = xmin.copy()
    span = np.where(flat, F32(1.0), xmax - xmin)
    best_iscale = fnmax / span
    best_shift = xmin.copy()
    scale = F32(1.0) / best_iscale
    best_error = error(scale, minv, levels(best_iscale))

    if nstep >= 1:
        wl = np.empty_like(x)
        for k in range(nstep + 1):
            iscale = (F32(rmin) + F32(rdelta) * F32(k) + fnmax) / span
            levels(iscale)
            np.multiply(weights, l, out=wl)
            sum_l = seq_sum_from_zero(wl)
            np.multiply(wl, l, out=t)
            sum_l2 = seq_sum_from_zero(t)
            np.multiply(wl, x, out=t)               # C: w*l*x[i] == (w*l)*x[i]
            sum_xl = seq_sum_from_zero(t)
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            clamp = this_min > 0
            this_min[clamp] = 0
            np.copyto(this_scale, sum_xl / sum_l2, where=clamp)
            cur_error = error(this_scale, this_min, l)
            better = (D > 0) & (cur_error < best_error) & live
            won = np.flatnonzero(better)
            if won.size == 0:
                continue
            best_error[won] = cur_error[won]
            scale[won] = this_scale[won]
            best_iscale[won] = iscale[won]
            best_shift[won] = minv[won]
            minv[won] = this_min[won]
            span[won] = xmax[won] - minv[won]
            np.subtract(x, minv, out=xm)

    np.subtract(x, best_shift, out=xm)
    L = levels(best_iscale).astype(np.uint8)
    L[:, flat] = 0
    scale[flat] = 0
    return scale, -minv, L


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


def pack_2bit_quarters(L: np.ndarray) -> np.ndarray:
    """L[blocks, 256] in 0..3 -> 64 bytes: byte 32*h + l holds L[128h + l + 32k] in bits 2k..2k+1."""
    q = L.reshape(-1, 2, 4, 32)
    out = q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)
    return out.reshape(-1, 64)


def unpack_2bit_quarters(qs: np.ndarray) -> np.ndarray:
    """Inverse of pack_2bit_quarters: 64 bytes -> L[blocks, 256] in 0..3."""
    q = qs.reshape(-1, 2, 1, 32)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    return ((q >> shifts) & 3).reshape(-1, QK_K)
