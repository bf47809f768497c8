"""q6_K's scale search without an imatrix: make_qx_quants(16, 32, x, L, rmse_type=1, NULL) per
group of 16, as quantize_row_q6_K_ref calls it, bit for bit (k_search.make_qx_quants_rmse1 is
the general version; this one does the same float32 operations in fewer numpy passes).

C tries iscale = -nmax/max, then -(nmax + 0.1f*is)/max for is = -9..9 (is != 0), each with
levels l = clamp(nearest_int(iscale*x), -32, 31) and float32 sums sumlx = sum w*x*l, suml2 =
sum w*l*l (w = x*x); it keeps a candidate if sumlx*sumlx > best*suml2 (best = (sumlx/suml2) *
sumlx of the kept one) and returns the last kept candidate's scale sumlx/suml2 and levels.
"""

from __future__ import annotations

import numpy as np

from ._blocks import scratch, select
from .k_common import F32, GROUP_MAX_EPS, fast_clip, first_absmax, seq_sum_of_products

NMAX = 32  # levels -32..31
# make_qx_quants's candidates in C's order, and their numerators c (iscale = c/max), rounded as
# C's float expressions `-nmax` and `-(nmax + 0.1f*is)` round them.
CANDIDATES = (0,) + tuple(k for k in range(-9, 10) if k)
NUMERATORS = np.array([-(F32(NMAX) + F32(0.1) * F32(k)) for k in CANDIDATES], F32)
# Chunks with |x| >= this (or non-finite values) take k_search.make_qx_quants_rmse1: below it no
# sum, square or product of the search overflows float32 (|w*x*l| < 2**54, sumlx**2 < 2**116,
# best*suml2 < 2**121), which the comparison by integer bits relies on.
X_LIMIT = F32(2.0**16)
# Candidates whose levels need no clamp to [-32, 31]: with |x| <= |max| (max is the group's
# largest |x|), |iscale| = fl(|c|/|max|) <= |c|/|max| * (1 + 2**-24) and |x*iscale| <= |c| *
# (1 + 2**-24)**2 < |c| * (1 + 2**-22); below 31.5 that rounds to at most 31 in magnitude, so C's
# MAX(-nmax, MIN(nmax-1, l)) is the identity (is = -9..-6: |c| <= 31.4). Derived here from the
# bound, not listed: a numerator that could reach 31.5 keeps its clamp.
NEEDS_CLAMP = tuple(bool(abs(float(c)) * (1 + 2.0**-22) >= NMAX - 0.5) for c in NUMERATORS)


def search_unweighted(xt: np.ndarray):
    """make_qx_quants(16, 32, x, L, 1, NULL) for xt[16, groups]: returns (scale[groups], L: a
    function giving the search's levels (0..63) of the groups it is passed, for the few whose
    stored scale turns out 0; C's L is overwritten everywhere else), or None for a chunk with
    non-finite values or |x| >= X_LIMIT (then k_search.make_qx_quants_rmse1 runs instead).

    The same float32 operations as C, in fewer numpy passes:

    * each sum in one pass with its products (k_common.seq_sum_of_products), from +0 as in C;
    * the 19 iscales from one division, the clamp only where it can bite (NEEDS_CLAMP);
    * every candidate's sums kept, so the winner's scale is a lookup at the end;
    * no `suml2 > 0` test: in a group with |max| >= GROUP_MAX_EPS the max's own term w*l*l is
      at least fl(1e-15**2)*31*31 > 0, so suml2 > 0 (the other groups' results are replaced);
    * C's test sumlx*sumlx > best*suml2 on the float32 bits as int32: both sides are >= +0 and
      finite below X_LIMIT (sumlx**2, and best*suml2 with best = (sumlx/suml2)*sumlx a product of
      two numbers of one sign), and such floats order as their bit patterns; `best = kept ?
      value : best` by bit operations (np.where and copyto(where=) branch per element, several
      times slower here).
    """
    G = xt.shape[1]
    amax_signed = first_absmax(xt)
    absmax = np.abs(amax_signed)
    if not absmax.max() < X_LIMIT:
        return None
    zero = absmax < GROUP_MAX_EPS
    safe_max = select(zero, np.ones(G, F32), amax_signed)
    iscales = np.divide(NUMERATORS[:, None], safe_max, out=scratch("q6_is", (len(CANDIDATES), G), F32))
    w, wx, l = (scratch(f"q6_{name}", xt.shape, F32) for name in ("w", "wx", "l"))
    np.multiply(xt, xt, out=w)
    np.multiply(w, xt, out=wx)  # C: w*x[i]*l == (w*x)*l
    sums = scratch("q6_sums", (2, len(CANDIDATES), G), F32)  # sumlx, suml2 of every candidate
    state = _Decisions(G)
    for j, clamp in enumerate(NEEDS_CLAMP):
        np.multiply(xt, iscales[j], out=l)
        np.rint(l, out=l)  # |l| <= nmax + 1 here: rint is C's nearest_int
        if clamp:
            fast_clip(l, F32(-NMAX), F32(NMAX - 1), out=l)
        sumlx = seq_sum_of_products(wx, l, out=sums[0, j])
        suml2 = seq_sum_of_products(w, l, l, out=sums[1, j])  # C: w*l*l == (w*l)*l
        if j == 0:
            if not np.isfinite(suml2).all():  # NaN in the input
                return None
            state.first(sumlx, suml2)
        else:
            state.next(j, sumlx, suml2)

    win = state.winner  # the candidate C kept last, per group
    iscale = np.divide(NUMERATORS[win], safe_max)  # as computed above
    win *= G  # flat indices of its sums (take_along_axis is ~10x slower here)
    win += np.arange(G, dtype=np.int32)
    scale = np.divide(sums[0].reshape(-1)[win], sums[1].reshape(-1)[win])
    scale[zero] = 0  # C: an all-zero group's scale is 0

    def levels(idx: np.ndarray) -> np.ndarray:  # C's L: the winning candidate's levels
        v = xt[:, idx] * iscale[idx]
        L = (fast_clip(np.rint(v), F32(-NMAX), F32(NMAX - 1)) + F32(NMAX)).astype(np.uint8)
        L[:, zero[idx]] = 0  # C: all-zero groups get L = 0
        return L

    return scale, levels


class _Decisions:
    """C's running `best` per group over the candidates, and the candidate that last set it."""

    def __init__(self, G: int):
        self.best = scratch("q6_best", (G,), F32)
        self.winner = np.zeros(G, np.int32)
        self.tmp = [scratch(f"q6_tmp{i}", (G,), F32) for i in range(3)]

    def first(self, sumlx, suml2) -> None:
        np.divide(sumlx, suml2, out=self.best)  # C: scale = sumlx/suml2 (suml2 > 0: see above)
        self.best *= sumlx  # best = scale*sumlx

    def next(self, j: int, sumlx, suml2) -> None:
        value, square, prod = self.tmp
        np.divide(sumlx, suml2, out=value)
        value *= sumlx
        np.multiply(sumlx, sumlx, out=square)
        np.multiply(self.best, suml2, out=prod)
        keep = prod.view(np.int32)
        np.subtract(keep, square.view(np.int32), out=keep)
        keep >>= 31  # -1 where square > prod: C keeps this candidate
        best, diff = self.best.view(np.int32), value.view(np.int32)
        diff ^= best
        diff &= keep
        best ^= diff
        keep &= j
        np.maximum(self.winner, keep, out=self.winner)
