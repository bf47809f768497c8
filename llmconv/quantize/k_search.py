"""ggml's scale searches, shared by the K-quant and weighted legacy kernels: make_qx_quants
(rmse_type 1) and make_qkx2_quants, for x[n, groups] (q3_K's make_q3_quants: q3_search.py).

The float32 rules of k_common.py hold here: every operation in C's order and rounding, sums
sequential over the element axis, the work vectorized across groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._blocks import select
from .k_common import (
    F32,
    GROUP_MAX_EPS,
    fast_clip,
    first_absmax,
    nearest_int_clip,
    round_small,
    seq_sum,
    seq_sum_from_zero,
    seq_sum_of_products,
)


# ---------------------------------------------------------------- make_qx_quants, rmse_type 1


def make_qx_quants_rmse1(x: np.ndarray, nmax: int, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """ggml make_qx_quants(n, nmax, x, L, rmse_type=1, qw) for x[n, groups].

    Symmetric quantization to [-nmax, nmax-1] weighted by `weights` (qw; x**2 when None, as
    C does for qw=NULL): try iscale = -(nmax + 0.1*k)/max for k = 0, -9..9 and keep the one
    with the largest sumlx**2/suml2.
    Returns (scale[groups], L[n, groups] as uint8 in 0..2*nmax-1; all zero for all-zero groups).
    """
    amax_signed = first_absmax(x)
    zero = np.abs(amax_signed) < GROUP_MAX_EPS
    safe_max = np.where(zero, F32(1.0), amax_signed)
    fit = _SymmetricFit(x, nmax, x * x if weights is None else weights)

    best_iscale = F32(-nmax) / safe_max
    sumlx, suml2 = fit.sums(best_iscale)
    scale = np.where(suml2 != 0, sumlx / suml2, F32(0.0))
    best = scale * sumlx
    for k in range(-9, 10):
        if k == 0:
            continue
        iscale = -(F32(nmax) + F32(0.1) * F32(k)) / safe_max
        sumlx, suml2 = fit.sums(iscale)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        new_scale = sumlx / suml2
        scale = select(better, new_scale, scale)
        best = select(better, new_scale * sumlx, best)
        best_iscale = select(better, iscale, best_iscale)

    # L of the winning iscale (C recomputes it the same way when it keeps a candidate)
    L = (fit.levels(best_iscale) + F32(nmax)).astype(np.uint8)
    L[:, zero] = 0
    scale = np.where(zero, F32(0.0), scale)
    return scale, L


class _SymmetricFit:
    """make_qx_quants's candidate levels and weighted sums, in buffers reused across candidates."""

    def __init__(self, x: np.ndarray, nmax: int, w: np.ndarray):
        self.x, self.nmax, self.w = x, nmax, w
        self.wx = w * x  # C: w*x[i]*l == (w*x[i])*l
        self.l, self.t = np.empty_like(x), np.empty_like(x)
        # Overflowed inputs (inf scales from an extreme imatrix) make x*iscale inf or NaN, where
        # rint differs from C's nearest_int: take the exact integer path then.
        self.exact = not np.isfinite(x).all()

    def levels(self, iscale: np.ndarray) -> np.ndarray:
        l, nmax = self.l, self.nmax
        np.multiply(self.x, iscale, out=l)
        if self.exact:
            l[...] = nearest_int_clip(l.copy(), -nmax, nmax - 1)
        else:
            round_small(l)
            fast_clip(l, F32(-nmax), F32(nmax - 1), out=l)
        return l

    def sums(self, iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        l = self.levels(iscale)
        # C's loop sums, from +0, each in one pass with its products: w*x*l == (w*x)*l and
        # w*l*l == (w*l)*l
        return seq_sum_of_products(self.wx, l), seq_sum_of_products(self.w, l, l)


# ---------------------------------------------------------------- make_qkx2_quants


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


def make_qkx2_quants(
    x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ggml make_qkx2_quants for x[n, groups]: asymmetric quantization x ~ scale*L - the_min.

    Start with L spanning [min(x, 0), max(x)], then for iscale = (rmin + rdelta*k + nmax)/(max-min),
    k = 0..nstep, fit scale and min by weighted least squares and keep the candidate with the
    smallest weighted squared (use_mad: absolute) error.
    Returns (scale[groups], the_min[groups] (= -min), L[n, groups] uint8 in 0..nmax).

    This is also ggml's make_qkx3_quants with explicit weights (the imatrix paths): the two
    differ only in `max == min` vs `max <= min` for the flat case, the same test once min <= max.
    """
    scale, the_min, levels = qkx2_search(x, weights, nmax, rmin, rdelta, nstep, use_mad)
    return scale, the_min, levels(None)


def qkx2_search(x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool):
    """make_qkx2_quants with its levels on demand: returns (scale, the_min, levels), where
    levels(idx) gives C's L[n, len(idx)] (uint8) of the groups idx (all groups for None). The
    K-quants requantize every group against the stored scales and need the search's L only
    for the few whose stored scale is 0."""
    xmin = first_min_clamped(x)
    xmax = x.max(axis=0)
    flat = xmax == xmin
    fit = _AsymmetricFit(x, weights, nmax, use_mad, xmin)

    # C updates `min` whenever a candidate wins, and later candidates measure both
    # iscale and the levels from that updated min; so track it, and the (iscale, min)
    # pair that produced the kept L.
    span = np.where(flat, F32(1.0), xmax - xmin)
    best = _Best(minv=xmin.copy(), span=span, iscale=F32(nmax) / span, shift=xmin.copy(), scale=None, error=None)
    best.scale = F32(1.0) / best.iscale
    best.error = fit.error(best.scale, best.minv, fit.levels(best.iscale))
    if nstep >= 1:
        best.error[flat] = -np.inf  # C returns before the search: no candidate may win
        _qkx2_steps(fit, best, xmax, rmin, rdelta, nstep)
    best.scale[flat] = 0

    def levels(idx: np.ndarray | None) -> np.ndarray:
        if idx is None:
            xm, iscale, zero = np.subtract(x, best.shift, out=fit.xm), best.iscale, flat
        else:
            xm, iscale, zero = x[:, idx] - best.shift[idx], best.iscale[idx], flat[idx]
        L = asymmetric_levels(xm, iscale, nmax, out=xm).astype(np.uint8)
        L[:, zero] = 0
        return L

    return best.scale, -best.minv, levels


def asymmetric_levels(xm: np.ndarray, iscale: np.ndarray, nmax: int, out: np.ndarray) -> np.ndarray:
    """C's MAX(0, MIN(nmax, nearest_int(iscale*(x - min)))) as float32, for xm = x - min."""
    l = np.multiply(xm, iscale, out=out)
    if np.isfinite(iscale).all():
        round_small(l)  # |iscale*(x - min)| <= nmax + 1 here
        fast_clip(l, F32(0.0), F32(nmax), out=l)  # once min moved, x - min can be < 0
    else:
        # max - min subnormal: iscale is inf, and C's nearest_int of inf/NaN gives
        # -4194304/0, clamped to 0 (rint would give nmax)
        l[...] = nearest_int_clip(l.copy(), 0, nmax)
    return l


@dataclass
class _Best:
    """make_qkx2_quants's state per group: the current min and span, and the kept candidate."""

    minv: np.ndarray
    span: np.ndarray
    iscale: np.ndarray
    shift: np.ndarray  # the min the kept L was measured from
    scale: np.ndarray | None
    error: np.ndarray | None


class _AsymmetricFit:
    """make_qkx2_quants's candidate levels and errors, in buffers reused across candidates."""

    def __init__(self, x: np.ndarray, weights: np.ndarray, nmax: int, use_mad: bool, xmin: np.ndarray):
        self.x, self.w, self.nmax, self.fnmax, self.use_mad = x, weights, nmax, F32(nmax), use_mad
        self.sum_w = seq_sum(weights)  # C starts these at element 0, not at 0
        self.sum_x = seq_sum(weights * x)
        self.xm = x - xmin  # C: iscale*(x[i] - min), kept up to date
        # w*l for the sums, then the error's diffs: one buffer (fewer arrays in the cache)
        self.l, self.t = np.empty_like(x), np.empty_like(x)
        self.wl = self.t

    def levels(self, iscale: np.ndarray) -> np.ndarray:
        return asymmetric_levels(self.xm, iscale, self.nmax, out=self.l)

    def error(self, scale: np.ndarray, minv: np.ndarray, l: np.ndarray) -> np.ndarray:
        t = self.t
        np.multiply(l, scale, out=t)  # C: scale*L[i] + min - x[i]
        np.add(t, minv, out=t)
        np.subtract(t, self.x, out=t)
        if self.use_mad:  # C: cur_error += w*diff, diff = |diff| or diff*diff
            np.abs(t, out=t)
            return seq_sum_of_products(self.w, t)
        return seq_sum_of_products(t, t, self.w)  # (diff*diff)*w == w*(diff*diff)


def _qkx2_steps(fit: _AsymmetricFit, best: _Best, xmax: np.ndarray, rmin: float, rdelta: float, nstep: int) -> None:
    """The candidates k = 0..nstep: least-squares scale and min for each, the better ones kept
    (flat groups never: their best.error is -inf)."""
    x, l, w, wl = fit.x, fit.l, fit.w, fit.wl
    for k in range(nstep + 1):
        iscale = (F32(rmin) + F32(rdelta) * F32(k) + fit.fnmax) / best.span
        fit.levels(iscale)
        # C's loop sums, from +0, each in one pass with its products; w*l*l == (w*l)*l and
        # w*l*x[i] == (w*l)*x[i], so w*l is formed once
        np.multiply(w, l, out=wl)
        sum_l = seq_sum_from_zero(wl)
        sum_l2 = seq_sum_of_products(wl, l)
        sum_xl = seq_sum_of_products(wl, x)
        D = fit.sum_w * sum_l2 - sum_l * sum_l
        this_scale = (fit.sum_w * sum_xl - fit.sum_x * sum_l) / D
        this_min = (sum_l2 * fit.sum_x - sum_l * sum_xl) / D
        clamp = np.flatnonzero(this_min > 0)  # rare: a boolean-mask assignment costs more
        if clamp.size:
            this_min[clamp] = 0
            this_scale[clamp] = sum_xl[clamp] / sum_l2[clamp]
        cur_error = fit.error(this_scale, this_min, l)
        better = cur_error < best.error
        better &= D > 0
        won = np.flatnonzero(better)
        if won.size == 0:
            continue
        best.error[won] = cur_error[won]
        best.scale[won] = this_scale[won]
        best.iscale[won] = iscale[won]
        best.shift[won] = best.minv[won]
        best.minv[won] = this_min[won]
        best.span[won] = xmax[won] - best.minv[won]
        if k < nstep:  # the next candidate's levels are measured from the new min
            np.subtract(x, best.minv, out=fit.xm)
