"""q3_K's scale search: ggml make_q3_quants(16, 4, x, L, do_rmse=true) per group of 16, as
quantize_row_q3_K_ref calls it, bit for bit, for x[16, groups].

C starts from iscale = -nmax/max (max: the signed value of largest |x|), L = clamp(nearest_int(
iscale*x), -4, 3), w = x*x, float32 sums sumlx = sum w*x*L, suml2 = sum w*L*L; then up to 5
sweeps of coordinate descent over i = 0..15. Step i: slx = sumlx - w*x*L[i]; if slx > 0:
sl2 = suml2 - w*L[i]*L[i], new = clamp(nearest_int(x*sl2/slx)); if new != L[i], it takes
new when the new sums fit better (sl2' > 0 and slx'^2*suml2 > sumlx^2*sl2'). It stops after a
sweep that changed nothing, and returns suml2 > 0 ? sumlx/suml2 : 0 with L + 4.

Groups whose max is positive never change: then iscale < 0, every L[i] is 0 or of x[i]'s
opposite sign and every term w*x[i]*L[i] <= 0; their float sum sumlx is at least as large in
magnitude as any one of them (adding values of one sign never shrinks a partial sum under
round-to-nearest), so every slx = sumlx - w*x[i]*L[i] <= 0 and C's `if (slx > 0)` skips them.

The descent runs by rounds, not by steps (see descend): between two accepted changes a group's
state is fixed, so one vectorized pass over all 16 steps finds its next change. Every float32
operation is C's, in C's order (k_common's rules); only which steps are evaluated when differs.
"""

from __future__ import annotations

import numpy as np

from ._blocks import scratch, select
from .k_common import F32, GROUP_MAX_EPS, MAGIC, element_major, fast_clip, first_absmax, seq_sum_of_products

NMAX = 4  # levels -4..3
N = 16  # weights per group
SWEEPS = 5  # C's `for (int itry = 0; itry < 5; ++itry)`
# bits(v + MAGIC) & 0x7FFFFF == BIAS + nearest_int(v): levels are kept with this offset (as
# int32), so a candidate is compared without undoing it.
BIAS = 0x00400000
LO, HI = np.int32(BIAS - NMAX), np.int32(BIAS + NMAX - 1)
# LOWEST_BIT[r]: the index of r's lowest set bit, for the 16-bit masks of candidate steps
LOWEST_BIT = (np.arange(1 << N) & -np.arange(1 << N)).astype(F32).view(np.int32) >> 23
LOWEST_BIT = np.maximum(LOWEST_BIT - 127, 0).astype(np.int32)
# Groups per pass of the start (transpose, max, start levels, sums): ~3 MB of [16, groups]
# arrays per pass instead of ~12 MB for a chunk's 65536 groups; ~5 % less time for the kernel
# than one pass here, 4096 and 32768 groups ~1-3 % more than this (smaller pieces lose to
# numpy's per-call cost). The descent runs on the whole chunk's changing groups at once.
START_GROUPS = 16384


def search(xg: np.ndarray):
    """make_q3_quants(16, 4, x, L, true) for the groups xg[groups, 16].

    Returns (scale[groups], levels): levels(idx) gives C's L[16, len(idx)] (uint8, 0..7; all zero
    for all-zero groups) of the groups idx, for the few whose stored scale turns out 0 (q3_k
    requantizes the others against the stored scales).
    """
    G = xg.shape[0]
    iscale, sumlx, suml2 = (np.empty(G, F32) for _ in range(3))
    zero, live = np.empty(G, bool), np.empty(G, bool)
    for s0 in range(0, G, START_GROUPS):
        part = slice(s0, s0 + START_GROUPS)
        x = element_major(xg[part], N, out=scratch("q3_xt", (N, xg[part].shape[0]), F32))
        _start(x, iscale[part], zero[part], sumlx[part], suml2[part], live[part])
    g = np.flatnonzero(live)
    moves = descend(np.take(xg, g, axis=0), iscale[g], g, sumlx, suml2) if g.size else []

    scale = np.divide(sumlx, suml2)
    scale[~(suml2 > 0)] = 0  # C: suml2 > 0 ? sumlx/suml2 : 0
    scale[zero] = 0

    def levels(idx: np.ndarray) -> np.ndarray:  # idx ascending
        L = _start_levels(np.take(xg, idx, axis=0), iscale[idx])
        for gm, im, new in moves:  # the descent's changes to these groups, in order
            at = np.minimum(np.searchsorted(idx, gm), idx.size - 1)
            hit = np.flatnonzero(idx[at] == gm)
            L[at[hit], im[hit]] = new[hit]
        Lq = (L + F32(NMAX)).astype(np.uint8)
        Lq[zero[idx]] = 0
        return Lq.T

    return scale, levels


def _start(x, iscale, zero, sumlx, suml2, live) -> None:
    """C's start for x[16, groups]: iscale, all-zero groups, the sums of the start levels, and the
    groups the descent can change (max < 0, see the module docstring), into the given arrays."""
    amax_signed = first_absmax(x)
    np.less(np.abs(amax_signed), GROUP_MAX_EPS, out=zero)
    np.divide(F32(-NMAX), select(zero, np.ones(x.shape[1], F32), amax_signed), out=iscale)
    L = np.multiply(x, iscale, out=scratch("q3_L", x.shape, F32))
    np.rint(L, out=L)  # |x*iscale| <= nmax + 1: rint is nearest_int here
    fast_clip(L, F32(-NMAX), F32(NMAX - 1), out=L)
    w = np.multiply(x, x, out=scratch("q3_w", x.shape, F32))
    seq_sum_of_products(w, x, L, out=sumlx)  # C: w*x[i]*l == (w*x)*l
    seq_sum_of_products(w, L, L, out=suml2)  # w*l*l == (w*l)*l
    np.less(amax_signed, F32(0), out=live)
    live &= ~zero


def _start_levels(X: np.ndarray, iscale: np.ndarray) -> np.ndarray:
    """The start levels of the groups X[m, 16] (float32, -4..3)."""
    L = np.multiply(X, _per_row(iscale))
    np.rint(L, out=L)
    return fast_clip(L, F32(-NMAX), F32(NMAX - 1), out=L)


def descend(X, iscale, g, sumlx, suml2) -> list:
    """C's sweeps for the groups g (X: their weights, [m, 16]), updating sumlx and suml2 in place;
    returns the changes to L, round by round: (groups, steps, new levels).

    A group's state (its L and sums) changes only when C accepts a change; until then every step
    sees the same state, and step i's outcome depends only on that state and i. So a round
    evaluates all 16 steps of every live group at once, with the state as the round starts, and
    takes per group the first accepted step in C's order after its last change (positions count
    steps across sweeps: sweep s, step i is position 16*s + i). Steps before it are evaluated as C
    does; steps after it saw a stale state and are dropped. A group whose round accepts nothing
    is done: C repeats the same 16 rejected steps (the rest of this sweep and the next), which
    ends its loop with no change; so is a group whose next change would fall after sweep 5.

    The live groups' rows are gathered again as groups leave: group-major rows of 64 bytes copy
    ~4x faster than element-major columns.
    """
    LA = _start_levels(X, iscale)  # cheaper than gathering them
    TX = X * X  # C's terms w*x*L and w*L*L of each step
    T2 = TX * LA
    T2 *= LA
    TX *= X
    TX *= LA
    LB = LA.astype(np.int32)  # the levels, + BIAS
    LB += BIAS
    sx, s2 = sumlx[g], suml2[g]
    last = None  # position of each group's last change (none yet)
    moves = []
    while True:
        SLX = np.subtract(_per_row(sx), TX, out=scratch("q3_slx", TX.shape, F32))  # slx = sumlx - w*x*L
        SL2 = np.subtract(_per_row(s2), T2, out=scratch("q3_sl2", TX.shape, F32))  # sl2 = suml2 - w*L*L
        step = _first_changes(X, SLX, SL2, LB, sx, s2, last)
        if step is None:
            return moves
        i, col, new, nsx, ns2, wxn, wn2, pos = step
        g = g[col]  # the groups that changed go on, with their new state
        moves.append((g, i, new))
        sumlx[g], suml2[g] = nsx, ns2
        sx, s2, last = nsx, ns2, pos
        rows = np.arange(col.size) * N + i
        X, TX, T2, LB = (np.take(a, col, axis=0) for a in (X, TX, T2, LB))
        TX.reshape(-1)[rows] = wxn
        T2.reshape(-1)[rows] = wn2
        LB.reshape(-1)[rows] = new.astype(np.int32) + BIAS


def _per_row(v: np.ndarray) -> np.ndarray:
    """v[m] repeated along rows of 16, [m, 16]: numpy's broadcast of v[:, None] runs one short
    inner loop per row, ~2x slower than repeating first."""
    return np.repeat(v, N).reshape(-1, N)


def _first_changes(X, SLX, SL2, LB, sx, s2, last):
    """One round: every step of every live group with the state as it is; per group that changes,
    its first accepted step after position `last`. Returns (step i, group (row), new level, new
    sumlx, new suml2, new w*x*L, new w*L*L, position), or None if no group changes."""
    v = np.multiply(X, SL2, out=scratch("q3_v", X.shape, F32))
    v /= SLX
    v += MAGIC  # nearest_int, as in nearest_int(), kept + BIAS
    vi = v.view(np.int32)
    vi &= 0x007FFFFF
    fast_clip(vi, LO, HI, out=vi)
    # C's `if (slx > 0)` is left to _test_next, on the candidates only: in these groups every term
    # w*x*L is >= 0 (L has x's sign or is 0), so slx <= 0 only where one term makes up the sum
    cand = np.not_equal(vi, LB, out=scratch("q3_cand", X.shape, np.bool_))
    # each group's candidate steps as the bits of a 16-bit number (np.nonzero of the mask costs
    # several times more: it branches on every element)
    steps = np.packbits(cand.reshape(-1), bitorder="little").view(np.uint16)
    col = np.flatnonzero(steps != 0)
    if not col.size:
        return None
    # rotated so that bit k is the k-th step after the group's last change, C's order; start:
    # the position of the step after it
    b = steps[col].astype(np.int32)
    if last is None:  # the first round: every group from position 0
        start, r = np.zeros(col.size, np.int32), b
    else:
        start = last[col] + 1
        s = start & (N - 1)
        r = np.right_shift(b, s)
        r |= np.left_shift(b, N - s)
        r &= (1 << N) - 1
    found = []
    while col.size:
        won, more = _test_next(X, SLX, SL2, vi, sx, s2, col, start, r, last is not None)
        found.append(won)
        col, start, r = col[more], start[more], r[more]
    found = found[0] if len(found) == 1 else [np.concatenate(a) for a in zip(*found)]
    return found if found[1].size else None


def _test_next(X, SLX, SL2, vi, sx, s2, col, start, r, capped: bool):
    """C's acceptance test on each group's next candidate (the lowest bit of r: the candidate
    steps from position `start` on, see _first_changes), which it takes from r. Returns the
    accepted ones as _first_changes does, and which groups have another candidate to test.
    `capped`: some may lie after the 5th sweep (not in the first round)."""
    pos = LOWEST_BIT[r]
    r &= r - 1
    pos += start
    i = pos & (N - 1)
    at = col * N
    at += i
    xc = X.reshape(-1)[at]
    new = np.subtract(vi.reshape(-1)[at], BIAS, dtype=F32)  # exact: both below 2**24
    wc = xc * xc
    wxn = wc * xc
    wxn *= new  # w*x*new
    wn2 = wc * new
    wn2 *= new  # w*new*new
    slx = SLX.reshape(-1)[at]
    nsx = wxn + slx  # slx += w*x*new
    ns2 = wn2 + SL2.reshape(-1)[at]  # sl2 += w*new*new
    osx, os2 = sx[col], s2[col]
    lhs = nsx * nsx
    lhs *= os2
    rhs = osx * osx
    rhs *= ns2
    ok = lhs > rhs  # C: slx > 0, then sl2 > 0 && slx*slx*suml2 > sumlx*sumlx*sl2
    ok &= ns2 > 0
    ok &= slx > 0
    more = np.flatnonzero(~ok & (r != 0))
    if capped:
        ok &= pos < N * SWEEPS  # C stops after 5 sweeps
    won = np.flatnonzero(ok)
    return (i[won], col[won], new[won], nsx[won], ns2[won], wxn[won], wn2[won], pos[won]), more
