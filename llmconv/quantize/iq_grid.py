"""Lattice grids and their neighbour search, shared by the grid IQ types (IQ2_*, IQ3_*).

ggml's grid types quantize a group of `dim` weights (8 for IQ2, 4 for IQ3) to one point of a
fixed grid: a list of level vectors, each level 0..(2**bits - 1) standing for the value
2*level + 1. `iq2xs_init_impl` / `iq3xs_init_impl` build, from the grid (`kgrid`, each point
packed as `bits` bits per coordinate), three tables:

* the map code -> grid index (code = the packed levels; -1 when the point is off the grid);
* for every code off the grid, its neighbour list: the grid points at the `nwant` smallest
  squared distances (in 2*level + 1 units), all of them, ordered by (distance, grid index);
* the grid itself as bytes 2*level + 1.

The quantizer rounds a group to the lattice; when the code is off the grid it takes the
neighbour with the smallest weighted error sum_i w[i] * (scale*q[i] - x[i])**2, the first one
on ties, in float32 with C's order of operations (`best_neighbours`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._blocks import NonFiniteError

F32 = np.float32


@dataclass(frozen=True)
class Grid:
    dim: int                  # coordinates per group
    bits: int                 # bits per coordinate in a code
    levels: np.ndarray        # uint8 [G, dim]: level of each coordinate of each grid point
    index: np.ndarray         # int32 [2**(bits*dim)]: grid index of a code, -1 off the grid
    nbr_start: np.ndarray     # int64 [codes]: start of a code's neighbour list in `nbr`
    nbr_count: np.ndarray     # int64 [codes]: its length (0 on the grid and for unreachable codes)
    nbr: np.ndarray           # int32: every neighbour list, one after the other
    n_levels: int             # levels a quantizer can produce per coordinate (max_level + 1)

    @property
    def size(self) -> int:
        return self.levels.shape[0]


def make_grid(kgrid, dim: int, bits: int, nwant: int, max_level: int) -> Grid:
    """The tables of ggml's init for one grid. Neighbour lists are built only for codes whose
    levels are all <= max_level: the quantizers clamp to that, so no other code is looked up."""
    kgrid = np.asarray(kgrid, dtype=np.int64)
    shifts = bits * np.arange(dim, dtype=np.int64)
    mask = (1 << bits) - 1
    levels = ((kgrid[:, None] >> shifts) & mask).astype(np.uint8)
    n_codes = 1 << (bits * dim)
    index = np.full(n_codes, -1, np.int32)
    index[kgrid] = np.arange(len(kgrid), dtype=np.int32)

    # every code with levels in 0..max_level (the points a quantizer can round to)
    per_coord = np.arange(max_level + 1, dtype=np.int64)
    mesh = np.stack(np.meshgrid(*([per_coord] * dim), indexing="ij"), axis=-1).reshape(-1, dim)
    codes = (mesh << shifts).sum(axis=1)
    off = index[codes] < 0
    codes, mesh = codes[off], mesh[off]

    pos_grid = 2 * levels.astype(np.int32) + 1
    pos_pts = (2 * mesh + 1).astype(np.int32)
    d2 = np.zeros((len(codes), len(kgrid)), np.int32)                          # [points, G]
    for i in range(dim):
        d2 += (pos_pts[:, i, None] - pos_grid[None, :, i]) ** 2
    order = np.argsort(d2, axis=1, kind="stable")                              # (distance, index)
    sorted_d2 = np.take_along_axis(d2, order, axis=1)
    # the nwant-th smallest distinct distance of each point: everything up to it is a neighbour
    distinct = np.ones_like(sorted_d2, dtype=bool)
    distinct[:, 1:] = sorted_d2[:, 1:] != sorted_d2[:, :-1]
    rank = np.cumsum(distinct, axis=1)
    keep = rank <= nwant
    counts = keep.sum(axis=1)

    nbr_count = np.zeros(n_codes, np.int64)
    nbr_count[codes] = counts
    nbr_start = np.zeros(n_codes, np.int64)
    nbr_start[codes] = np.concatenate([[0], np.cumsum(counts)[:-1]])
    nbr = order[keep].astype(np.int32)          # row-major: the lists one after the other, in `codes` order
    return Grid(dim, bits, levels, index, nbr_start, nbr_count, nbr, max_level + 1)


def codes_of(levels: np.ndarray, bits: int) -> np.ndarray:
    """Pack levels [..., dim] (last axis = coordinates) into codes [...]."""
    dim = levels.shape[-1]
    code = levels[..., 0].astype(np.int64)
    for i in range(1, dim):
        code |= levels[..., i].astype(np.int64) << (bits * i)
    return code


def best_neighbours(grid: Grid, codes: np.ndarray, xval: np.ndarray, w: np.ndarray,
                    scale: np.ndarray) -> np.ndarray:
    """ggml's iq2/iq3_find_best_neighbour for N groups at once: the grid index [N] of the
    neighbour of `codes[N]` (all off the grid) minimizing, in float32,

        d2 = 0;  for i in 0..dim-1:  diff = scale*q[i] - xval[i];  d2 += w[i]*diff*diff

    (q = 2*level + 1), the first in list order on ties. xval, w: float32 [N, dim]; scale [N].

    A candidate's d2 is a sum of `dim` terms, each one of n_levels values per coordinate, so
    the terms are computed once per group and level ([N, dim, n_levels]). The running sums over
    the first k coordinates are tabulated per group for every level combination (n_levels**k
    entries, k chosen so that the table is about as long as a group's candidate list); each
    candidate then gathers its prefix sum and adds its remaining dim - k terms in C's order.
    """
    n = codes.shape[0]
    if n == 0:
        return np.zeros(0, np.int32)
    nl, dim = grid.n_levels, grid.dim
    q = 2 * np.arange(nl, dtype=F32) + 1
    diff = scale[:, None, None] * q[None, None, :] - xval[:, :, None]        # [N, dim, nl]
    terms = (w[:, :, None] * diff) * diff

    counts = grid.nbr_count[codes]
    if not counts.all():
        raise ValueError("a code without a neighbour list (not off the grid, or a level above max_level)")
    ends = np.cumsum(counts)
    total = int(ends[-1])
    first = ends - counts                                                    # each group's first candidate
    k = 1
    while k < dim - 1 and nl ** (k + 1) <= 1.5 * total / n:
        k += 1
    prefix = terms[:, 0, :] + F32(0.0)                                       # C starts from d2 = 0
    for i in range(1, k):
        prefix = (prefix[:, :, None] + terms[:, i, None, :]).reshape(n, -1)
    pcode, suffix = _prefix_tables(grid, k)

    group = np.repeat(np.arange(n, dtype=np.int32), counts)
    pos = np.arange(total, dtype=np.int32)
    pos += np.repeat((grid.nbr_start[codes] - first).astype(np.int32), counts)
    cand = grid.nbr[pos]                                                     # grid index per candidate
    d2 = prefix.reshape(-1)[group * np.int32(nl ** k) + pcode[cand]]
    flat = terms.reshape(-1)
    base = group * np.int32(dim * nl)
    for offsets in suffix:                                                   # coordinates k .. dim-1
        d2 += flat[base + offsets[cand]]

    # first minimum per group; NaN never wins in C (d2 < best_d2 is false), nor here (fmin)
    seg_min = np.fmin.reduceat(d2, first)
    hit = np.flatnonzero(d2 == np.repeat(seg_min, counts))
    hit_group = group[hit]
    lead = np.ones(hit.shape[0], bool)
    lead[1:] = hit_group[1:] != hit_group[:-1]
    hit = hit[lead]
    if hit.shape[0] != n:
        raise FloatingPointError("no finite neighbour distance (ggml asserts here)")
    return cand[hit]


_PREFIX_TABLES: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}


def _prefix_tables(grid: Grid, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(pcode [G]: the prefix-table column of each grid point's first k levels,
    suffix [dim-k, G]: i*n_levels + level_i of each point, for the remaining coordinates)."""
    key = (id(grid.levels), k)
    tables = _PREFIX_TABLES.get(key)
    if tables is None:
        lv = grid.levels.astype(np.int32)
        pcode = np.zeros(grid.size, np.int32)
        for i in range(k):
            pcode = pcode * grid.n_levels + lv[:, i]
        suffix = np.arange(k, grid.dim, dtype=np.int32)[:, None] * grid.n_levels + lv[:, k:].T
        tables = _PREFIX_TABLES[key] = (pcode, np.ascontiguousarray(suffix, dtype=np.int32))
    return tables


class SuperblockOverflow(Exception):
    """Raised by a chunk function when a super-block's fp16 scale is not finite."""
    def __init__(self, superblock: int):
        self.superblock = superblock


def quantize_superblocks(x: np.ndarray, qw: np.ndarray | None, type_size: int, chunk_fn,
                         chunk_superblocks: int, prepare=None) -> np.ndarray:
    """The IQ types' outer loop: x[rows, n] in passes of `chunk_superblocks` super-blocks of
    256 (each with its row's slice of the imatrix qw[n]) through chunk_fn(xb, qwb) -> blocks.
    A super-block scale that overflows fp16 (|w| beyond ~1e7) is refused with its row, as the
    other types' overflows are (llama_model_quantize's row validation rejects such a tensor too):
    either chunk_fn raises SuperblockOverflow, or the written scale (every IQ block opens with
    its fp16 d) is inf/NaN. `prepare(xb, qwb)`, when given, runs once over all super-blocks and
    returns an array per super-block; chunk_fn then gets its slice as a third argument (for
    steps whose numpy calls work on one value per block: cheaper in one long pass)."""
    x = np.ascontiguousarray(x, dtype=F32)
    rows, n = x.shape
    if n % 256:
        raise ValueError(f"row length {n} is not a multiple of 256")
    xb = x.reshape(-1, 256)
    qwb = None if qw is None else np.ascontiguousarray(qw, dtype=F32).reshape(-1, 256)
    per_row = n // 256
    out = np.empty((xb.shape[0], type_size), np.uint8)
    with np.errstate(all="ignore"):
        extra = None
        if prepare is not None:
            extra = prepare(xb, None if qwb is None else qwb[np.arange(xb.shape[0]) % per_row])
        for s in range(0, xb.shape[0], chunk_superblocks):
            e = min(s + chunk_superblocks, xb.shape[0])
            args = (xb[s:e], None if qwb is None else qwb[np.arange(s, e) % per_row])
            try:
                out[s:e] = chunk_fn(*args) if extra is None else chunk_fn(*args, extra[s:e])
            except SuperblockOverflow as o:
                raise NonFiniteError((s + o.superblock) // per_row, "a super-block scale overflows fp16") from None
    bad = np.flatnonzero((out[:, 0:2].copy().view(np.uint16)[:, 0] & 0x7C00) == 0x7C00)
    if bad.size:
        raise NonFiniteError(int(bad[0]) // per_row, "a super-block scale overflows fp16")
    return out.reshape(rows, per_row * type_size)


# ---------------------------------------------------------------- the screened search
#
# C's distance d = sum_i w[i]*(s*q[i] - x[i])**2, computed in float32 term by term, equals
# s*s*A - 2*s*B + X in exact arithmetic, with A = sum w*q*q and B = sum w*x*q per grid point and
# X = sum w*x*x per group, none of which depends on the scale s. A group meets ~13 trial scales,
# so A and B are tabulated once per group for the whole grid (two small matrix products), and a
# candidate costs one gather and two multiplies instead of `dim` terms.
#
# That value is not C's: both differ from the exact d by rounding. With e = s*q - x, s*s*q*q <=
# 2*e*e + 2*x*x, so s*s*A <= 2*d + 2*X; from there each float32 step of C (the product s*q, the
# difference, two products, dim-1 additions of non-negative terms, dim <= 8) errs by at most
# u*(15*d + 3*X) in all (u = 2**-24), and the tabulated value (A and B from float32 products of
# dim terms, then s*s*A - 2*s*B in float32) by at most u*(42*d + 52*X). So when the smallest
# tabulated value D1 and every other one Dc satisfy Dc - D1 > TAU*(d1 + dc + 2*X), TAU = 256*u
# (more than twice the 57*u the bounds need), C's distances are ordered the same way and C picks
# the same point (its first-on-ties rule never comes into play). Every other search, and every
# group whose numbers could leave float32's normal range (where these relative bounds fail),
# goes through best_neighbours.

SCREEN_TAU = 2.0 ** -16
_SCREEN_RANGE = (1e-30, 1e30)      # X and s*s*sum(w)*qmax**2 inside it: no overflow, no underflow
# OpenBLAS spreads a product over all cores above m*n*k = 4 * 65536; on a shared machine its
# waiting threads cost more CPU time than the product itself
_SINGLE_THREAD_GEMM = 4 * 65536


@dataclass(frozen=True)
class PaddedLists:
    """The neighbour lists sorted into a few widths, dense [width, codes in class] arrays per
    width: grid indices, and the candidates' rows in a group table. The table has a row per
    grid point (then `hi` is None), or, for the 1024-point grid, a row per combination of the
    first dim/2 coordinates' levels and one per combination of the others' (offset by
    pad_row + 1): 163 rows instead of 1024, which pays for the second gather. Padding points
    at row pad_row, whose A is +inf."""
    cls: np.ndarray            # int8 [codes]: width class of a code's list, -1 without one
    slot: np.ndarray           # int32 [codes]: the code's column in its class
    index: tuple               # int16 [width, n] per class: grid indices (G <= 1024)
    lo: tuple                  # int16 [width, n] per class: table row (of the first half)
    hi: tuple | None           # int16 [width, n] per class: table row of the second half
    pad_row: int


_PADDED: dict[int, PaddedLists] = {}
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
    halves = grid.size > 512
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
            arr[:counts[p], j] = grid.nbr[grid.nbr_start[p]:grid.nbr_start[p] + counts[p]]
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
    """(q, q*q) float32 [dim, rows]: q = 2*level + 1 of the coordinates of every table row
    (zero outside the row's half), the pad row all zero."""
    key = id(grid.levels)
    got = _HALF_MATRICES.get(key)
    if got is None and padded_lists(grid).hi is None:
        q = np.zeros((grid.dim, grid.size + 1), F32)
        q[:, :-1] = 2 * grid.levels.T.astype(F32) + 1
        got = _HALF_MATRICES[key] = (q, q * q)
    if got is None:
        dim, nl, half = grid.dim, grid.n_levels, grid.dim // 2
        lo_rows, hi_rows = nl ** half, nl ** (dim - half)
        q = np.zeros((dim, lo_rows + 1 + hi_rows), F32)
        for rows, first, count, offset in ((lo_rows, 0, half, 0), (hi_rows, half, dim - half, lo_rows + 1)):
            combo = np.arange(rows)
            for i in reversed(range(first, first + count)):
                q[i, offset:offset + rows] = 2 * (combo % nl) + 1
                combo //= nl
        got = _HALF_MATRICES[key] = (q, q * q)
    return got


@dataclass
class GroupTables:
    """Per group (of the groups a search may visit): A and B of each table row (a grid point,
    or a half-combination of levels: then a point's A is the sum of its two halves'),
    interleaved in one float32 [groups, rows, 2] (one gather fetches both); X, and whether the
    group's numbers are in the range where the screening's bounds hold."""
    ab: np.ndarray
    x2: np.ndarray             # float64 [groups]: X = sum w*x*x
    wsum: np.ndarray           # float64 [groups]: sum w * qmax**2
    ok: np.ndarray             # bool [groups]: inputs finite, w >= 0, X in range


def group_tables(grid: Grid, xval: np.ndarray, w: np.ndarray) -> GroupTables:
    """xval, w: float32 [groups, dim] (w: the search's weights, ggml's waux)."""
    q, qq = _table_matrices(grid)
    n, rows = xval.shape[0], q.shape[1]
    ab = np.empty((n, rows, 2), F32)
    wx = w * xval
    step = max(1, _SINGLE_THREAD_GEMM // (rows * grid.dim))
    for i in range(0, n, step):
        ab[i:i + step, :, 0] = w[i:i + step] @ qq
        ab[i:i + step, :, 1] = wx[i:i + step] @ q
    ab[:, padded_lists(grid).pad_row, 0] = np.inf
    x64, w64 = xval.astype(np.float64), w.astype(np.float64)
    x2 = (w64 * x64 * x64).sum(axis=1)
    wsum = w64.sum(axis=1) * float(q.max()) ** 2
    lo, hi = _SCREEN_RANGE
    ok = np.isfinite(x64).all(axis=1) & (w64 >= 0).all(axis=1) & (x2 >= lo) & (x2 <= hi) & (wsum <= hi)
    return GroupTables(ab, x2, wsum, ok)


def screened_neighbours(grid: Grid, codes: np.ndarray, group: np.ndarray, scale: np.ndarray,
                        tables: GroupTables) -> tuple[np.ndarray, np.ndarray]:
    """The best neighbour of `codes[N]` for the groups `group[N]` (rows of `tables`) at
    `scale[N]` where it is provably C's choice (see above). Returns (grid index [N],
    decided bool [N]); undecided searches are to go through best_neighbours."""
    with np.errstate(over="ignore", invalid="ignore"):      # out-of-range groups stay undecided
        return _screened(grid, codes, group, scale, tables)


def _screened(grid: Grid, codes: np.ndarray, group: np.ndarray, scale: np.ndarray,
              tables: GroupTables) -> tuple[np.ndarray, np.ndarray]:
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
    flat = tables.ab.reshape(-1, 2).view(np.complex64)[:, 0]      # A + iB
    row = tables.ab.shape[1]
    # Re((A + iB) * (s*s + 2s i)) = s*s*A - 2*s*B: numpy's complex product is one pass
    coef = (s * s).astype(np.complex64)
    coef.imag = s + s
    start = int(counts[0])                    # codes without a list (none reach here) stay undecided
    for c in range(len(pl.index)):
        cnt = int(counts[c + 1])
        if not cnt:
            continue
        sel = order[start:start + cnt]
        start += cnt
        gs = group[sel]
        at = pl.slot[codes[sel]]
        base = gs * row
        nb = np.take(pl.lo[c], at, axis=1)                                  # [W, n]
        ab = np.take(flat, nb + base)
        if pl.hi is not None:
            ab += np.take(flat, np.take(pl.hi[c], at, axis=1) + base)
            nb = np.take(pl.index[c], at, axis=1)
        ab *= coef[sel]
        d = ab.real
        x2 = tables.x2[gs]
        dm = np.minimum.reduce(d, axis=0).astype(np.float64) + x2
        thr = (dm * (1 + SCREEN_TAU) + 2 * SCREEN_TAU * x2) / (1 - SCREEN_TAU) - x2
        within = d <= thr.astype(F32)
        decided[sel] = (np.add.reduce(within, axis=0, dtype=np.uint16) == 1) & usable[sel]
        # the one candidate within the threshold (where decided): sum of index * mask, in int16
        out[sel] = np.add.reduce(np.multiply(nb, within, dtype=np.int16), axis=0, dtype=np.int16)
    return out, decided
