"""The screened neighbour search: C's choice of grid point for most searches without C's
float32 distance sums, and the proof of when that is safe (see below).

C's distance d = sum_i w[i]*(s*q[i] - x[i])**2, computed in float32 term by term, equals
s*s*A - 2*s*B + X in exact arithmetic, with A = sum w*q*q and B = sum w*x*q per grid point and
X = sum w*x*x per group, none of which depends on the scale s. A group meets ~13 trial scales,
so A and B are tabulated once per group for the whole grid (two small matrix products), and a
candidate costs a gather (shared by the searches of a run, see _runs) and one complex product
instead of `dim` terms (the 512- and
1024-point grids are tabulated by halves of the coordinates: two gathers and an addition, see
PaddedLists).

That value is not C's: both differ from the exact d by rounding. With e = s*q - x, s*s*q*q <=
2*e*e + 2*x*x, so s*s*A <= 2*d + 2*X; from there each float32 step of C (the product s*q, the
difference, two products, dim-1 additions of non-negative terms, dim <= 8) errs by at most
u*(15*d + 3*X) in all (u = 2**-24), and the tabulated value (A and B from float32 products of
dim terms in any order, then s*s*A - 2*s*B in float32) by at most u*(42*d + 52*X). So when the smallest
tabulated value D1 and every other one Dc satisfy Dc - D1 > TAU*(d1 + dc + 2*X), TAU = 256*u
(more than twice the 57*u the bounds need), C's distances are ordered the same way and C picks
the same point (its first-on-ties rule never comes into play). Every other search, and every
group whose numbers could leave float32's normal range (where these relative bounds fail),
goes through best_neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .iq_grid import F32, Grid

SCREEN_TAU = 2.0**-16
_SCREEN_RANGE = (1e-30, 1e30)  # X and s*s*sum(w)*qmax**2 inside it: no overflow, no underflow
# OpenBLAS spreads a product over all cores above m*n*k = 4 * 65536; on a shared machine its
# waiting threads cost more CPU time than the product itself
_SINGLE_THREAD_GEMM = 4 * 65536
HALVES_ABOVE = 256  # grids larger than this are tabulated by halves (see PaddedLists)


@dataclass(frozen=True)
class PaddedLists:
    """The neighbour lists sorted into a few widths, dense [width, codes in class] arrays per
    width: grid indices, and the candidates' rows in a group table. The table has a row per
    grid point (then `hi` is None), or, for grids above HALVES_ABOVE points, a row per
    combination of the first dim/2 coordinates' levels and one per combination of the others'
    (offset by pad_row + 1): 163 rows instead of 1024 (IQ2_S), 163 instead of 512 (IQ2_XS),
    129 instead of 512 (IQ3_S). Building the smaller table saves more than the second gather
    costs (measured; the gathers are per run of searches, see _screened). Padding points at row
    pad_row, whose A is +inf."""

    cls: np.ndarray  # int8 [codes]: width class of a code's list, -1 without one
    slot: np.ndarray  # int32 [codes]: the code's column in its class
    index: tuple  # int16 [width, n] per class: grid indices (G <= 1024)
    lo: tuple  # int16 [width, n] per class: table row (of the first half)
    hi: tuple | None  # int16 [width, n] per class: table row of the second half
    pad_row: int


_PADDED: dict[int, PaddedLists] = {}
_POSITIONS = np.arange(1024, dtype=np.int16)[:, None]
_HALF_MATRICES: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def padded_lists(grid: Grid) -> PaddedLists:
    key = id(grid.levels)
    got = _PADDED.get(key)
    if got is not None:
        return got
    counts = grid.nbr_count
    widths, w = [], 2
    while True:
        widths.append(w)
        if w >= counts.max():
            break
        w = max(w + 2, int(w * 1.4) // 2 * 2)
    halves = grid.size > HALVES_ABOVE
    if halves:
        pad_row = grid.n_levels ** (grid.dim // 2)
        lo_of, hi_of = _half_rows(grid.levels.astype(np.int64), grid.n_levels, grid.dim // 2)
    else:
        pad_row = grid.size
        lo_of = np.arange(grid.size)
    cls = np.where(counts > 0, np.searchsorted(widths, counts), -1).astype(np.int8)
    slot = np.zeros(len(counts), np.int32)
    index, lo, hi = [], [], []
    for c, width in enumerate(widths):
        members = np.flatnonzero(cls == c)
        slot[members] = np.arange(len(members), dtype=np.int32)
        arr = np.full((width, len(members)), -1, np.int64)
        for j, p in enumerate(members):
            arr[: counts[p], j] = grid.nbr[grid.nbr_start[p] : grid.nbr_start[p] + counts[p]]
        pad = arr < 0
        index.append(np.where(pad, 0, arr).astype(np.int16))
        lo.append(np.where(pad, pad_row, lo_of[arr]).astype(np.int16))
        if halves:
            hi.append(np.where(pad, pad_row + 1, pad_row + 1 + hi_of[arr]).astype(np.int16))
    got = _PADDED[key] = PaddedLists(cls, slot, tuple(index), tuple(lo), tuple(hi) if halves else None, pad_row)
    return got


def _half_rows(levels: np.ndarray, n_levels: int, half: int) -> tuple[np.ndarray, np.ndarray]:
    """Levels [..., dim] -> (row of the first `half` coordinates, row of the rest): the levels
    read as base-n_levels numbers, first coordinate most significant."""
    lo = np.zeros(levels.shape[:-1], np.int64)
    hi = np.zeros(levels.shape[:-1], np.int64)
    for i in range(levels.shape[-1]):
        if i < half:
            lo = lo * n_levels + levels[..., i]
        else:
            hi = hi * n_levels + levels[..., i]
    return lo, hi


def _table_matrices(grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """(q float32 [dim, rows], their product matrix float32 [2*dim, rows*2]): q = 2*level + 1 of
    the coordinates of every table row (zero outside the row's half; the pad row all zero),
    and the matrix that takes [w, w*x] of a group to its interleaved (A, B) row by row."""
    key = id(grid.levels)
    got = _HALF_MATRICES.get(key)
    if got is None and padded_lists(grid).hi is None:
        q = np.zeros((grid.dim, grid.size + 1), F32)
        q[:, :-1] = 2 * grid.levels.T.astype(F32) + 1
        got = _HALF_MATRICES[key] = (q, _ab_matrix(q))
    if got is None:
        dim, nl, half = grid.dim, grid.n_levels, grid.dim // 2
        lo_rows, hi_rows = nl**half, nl ** (dim - half)
        q = np.zeros((dim, lo_rows + 1 + hi_rows), F32)
        for rows, first, count, offset in ((lo_rows, 0, half, 0), (hi_rows, half, dim - half, lo_rows + 1)):
            combo = np.arange(rows)
            for i in reversed(range(first, first + count)):
                q[i, offset : offset + rows] = 2 * (combo % nl) + 1
                combo //= nl
        got = _HALF_MATRICES[key] = (q, _ab_matrix(q))
    return got


def _ab_matrix(q: np.ndarray) -> np.ndarray:
    dim, rows = q.shape
    m = np.zeros((2 * dim, rows, 2), F32)
    m[:dim, :, 0] = q * q  # A = sum w*q*q
    m[dim:, :, 1] = q  # B = sum (w*x)*q
    return m.reshape(2 * dim, 2 * rows)


@dataclass
class GroupTables:
    """Per group (of the groups a search may visit): A and B of each table row (a grid point,
    or a half-combination of levels: then a point's A is the sum of its two halves'),
    interleaved in one float32 [groups, rows, 2] (one gather fetches both); X, and whether the
    group's numbers are in the range where the screening's bounds hold."""

    ab: np.ndarray
    x2: np.ndarray  # float64 [groups]: X = sum w*x*x
    wsum: np.ndarray  # float64 [groups]: sum w * qmax**2
    ok: np.ndarray  # bool [groups]: inputs finite, w >= 0, X in range


def group_tables(grid: Grid, xval: np.ndarray, w: np.ndarray) -> GroupTables:
    """xval, w: float32 [groups, dim] (w: the search's weights, ggml's waux)."""
    q, m = _table_matrices(grid)
    n, rows = xval.shape[0], q.shape[1]
    ab = np.empty((n, 2 * rows), F32)
    w_wx = np.concatenate([w, w * xval], axis=1)  # zero terms of the product add exactly 0
    step = max(1, _SINGLE_THREAD_GEMM // m.size)
    for i in range(0, n, step):
        np.matmul(w_wx[i : i + step], m, out=ab[i : i + step])
    ab = ab.reshape(n, rows, 2)
    ab[:, padded_lists(grid).pad_row, 0] = np.inf
    x64, w64 = xval.astype(np.float64), w.astype(np.float64)
    x2 = (w64 * x64 * x64).sum(axis=1)
    wsum = w64.sum(axis=1) * float(q.max()) ** 2
    lo, hi = _SCREEN_RANGE
    ok = np.isfinite(x64).all(axis=1) & (w64 >= 0).all(axis=1) & (x2 >= lo) & (x2 <= hi) & (wsum <= hi)
    return GroupTables(ab, x2, wsum, ok)


def _gather(pl: PaddedLists, c: int, flat: np.ndarray, at: np.ndarray, base: np.ndarray) -> np.ndarray:
    """A + iB [W, n] of the width-class-c lists at slots `at`, for the groups whose table rows
    start at flat[base]."""
    ab = np.take(flat, np.take(pl.lo[c], at, axis=1) + base)
    if pl.hi is not None:
        ab += np.take(flat, np.take(pl.hi[c], at, axis=1) + base)
    return ab


def screened_neighbours(
    grid: Grid, codes: np.ndarray, group: np.ndarray, scale: np.ndarray, tables: GroupTables
) -> tuple[np.ndarray, np.ndarray]:
    """The best neighbour of `codes[N]` for the groups `group[N]` (rows of `tables`) at
    `scale[N]` where it is provably C's choice (see above). Returns (grid index [N],
    decided bool [N]); undecided searches are to go through best_neighbours."""
    with np.errstate(over="ignore", invalid="ignore"):  # out-of-range groups stay undecided
        return _screened(grid, codes, group, scale, tables)


def _runs(codes: np.ndarray, group: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The searches of one group at one code (nearby trial scales round a group alike) share
    their candidates' (A, B): gathered once per such run from the big table, then spread to the
    searches from the small gathered array, which stays in cache. Returns (run of each search,
    first search of each run). A run ends where the group or the code changes (the width class
    is the code's)."""
    n = codes.shape[0]
    new = np.empty(n, bool)
    new[0] = True
    np.not_equal(codes[1:], codes[:-1], out=new[1:])
    new[1:] |= group[1:] != group[:-1]
    run = np.cumsum(new, dtype=np.intp)
    run -= 1
    return run, np.flatnonzero(new)


def _screened(
    grid: Grid, codes: np.ndarray, group: np.ndarray, scale: np.ndarray, tables: GroupTables
) -> tuple[np.ndarray, np.ndarray]:
    n = codes.shape[0]
    out = np.zeros(n, np.int64)
    decided = np.zeros(n, bool)
    if n == 0:
        return out, decided
    pl = padded_lists(grid)
    s = scale.astype(F32)
    s64 = s.astype(np.float64)
    usable = tables.ok[group] & (s64 * s64 * tables.wsum[group] <= _SCREEN_RANGE[1])
    cls = pl.cls[codes]
    order = np.argsort(cls, kind="stable")
    counts = np.bincount(cls + 1, minlength=len(pl.index) + 1)
    flat = tables.ab.reshape(-1, 2).view(np.complex64)[:, 0]  # A + iB
    row = tables.ab.shape[1]
    # the searches by width class (stable: a group's searches stay together, in trial order),
    # every per-search array permuted once so that a class is a slice
    codes, group, s = codes[order], group[order], s[order]
    usable = usable[order]
    x2 = tables.x2[group]
    # Re((A + iB) * (s*s + 2s i)) = s*s*A - 2*s*B: numpy's complex product is one pass
    coef = (s * s).astype(np.complex64)
    coef.imag = s + s
    run, first = _runs(codes, group)
    slot = pl.slot[codes[first]]
    base = group[first] * row
    out_o = np.zeros(n, np.int64)
    dec_o = np.zeros(n, bool)
    start = int(counts[0])  # codes without a list (none reach here) stay undecided
    for c in range(len(pl.index)):
        cnt = int(counts[c + 1])
        if not cnt:
            continue
        sl = slice(start, start + cnt)
        start += cnt
        r = run[sl]
        r0, r1 = int(r[0]), int(r[-1]) + 1
        r = r - r0
        ab = np.take(_gather(pl, c, flat, slot[r0:r1], base[r0:r1]), r, axis=1)  # [W, runs] -> [W, n]
        ab *= coef[sl]
        d = ab.real
        dm = np.minimum.reduce(d, axis=0).astype(np.float64) + x2[sl]
        thr = (dm * (1 + SCREEN_TAU) + 2 * SCREEN_TAU * x2[sl]) / (1 - SCREEN_TAU) - x2[sl]
        within = d <= thr.astype(F32)
        dec_o[sl] = (np.add.reduce(within, axis=0, dtype=np.uint16) == 1) & usable[sl]
        # the one candidate within the threshold (where decided): its position in the list
        pos = np.add.reduce(np.multiply(_POSITIONS[: within.shape[0]], within, dtype=np.int16), axis=0, dtype=np.int16)
        np.clip(pos, 0, within.shape[0] - 1, out=pos)  # undecided searches: any valid position
        table = pl.index[c]  # [W, members]: a flat index takes numpy's fast path
        at = slot[r0:r1][r]
        at += pos.astype(np.intp) * table.shape[1]  # (pos, slot) as one index, without int16 overflow
        out_o[sl] = np.take(table.reshape(-1), at)
    out[order] = out_o
    decided[order] = dec_o
    return out, decided
