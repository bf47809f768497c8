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
    dim: int  # coordinates per group
    bits: int  # bits per coordinate in a code
    levels: np.ndarray  # uint8 [G, dim]: level of each coordinate of each grid point
    index: np.ndarray  # int32 [2**(bits*dim)]: grid index of a code, -1 off the grid
    nbr_start: np.ndarray  # int64 [codes]: start of a code's neighbour list in `nbr`
    nbr_count: np.ndarray  # int64 [codes]: its length (0 on the grid and for unreachable codes)
    nbr: np.ndarray  # int32: every neighbour list, one after the other
    n_levels: int  # levels a quantizer can produce per coordinate (max_level + 1)

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
    d2 = np.zeros((len(codes), len(kgrid)), np.int32)  # [points, G]
    for i in range(dim):
        d2 += (pos_pts[:, i, None] - pos_grid[None, :, i]) ** 2
    order = np.argsort(d2, axis=1, kind="stable")  # (distance, index)
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
    nbr = order[keep].astype(np.int32)  # row-major: the lists one after the other, in `codes` order
    return Grid(dim, bits, levels, index, nbr_start, nbr_count, nbr, max_level + 1)


def codes_of(levels: np.ndarray, bits: int) -> np.ndarray:
    """Pack levels [..., dim] (last axis = coordinates) into codes [...]."""
    dim = levels.shape[-1]
    code = levels[..., 0].astype(np.int64)
    for i in range(1, dim):
        code |= levels[..., i].astype(np.int64) << (bits * i)
    return code


def best_neighbours(grid: Grid, codes: np.ndarray, xval: np.ndarray, w: np.ndarray, scale: np.ndarray) -> np.ndarray:
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
    diff = scale[:, None, None] * q[None, None, :] - xval[:, :, None]  # [N, dim, nl]
    terms = (w[:, :, None] * diff) * diff

    counts = grid.nbr_count[codes]
    if not counts.all():
        raise ValueError("a code without a neighbour list (not off the grid, or a level above max_level)")
    ends = np.cumsum(counts)
    total = int(ends[-1])
    first = ends - counts  # each group's first candidate
    k = 1
    while k < dim - 1 and nl ** (k + 1) <= 1.5 * total / n:
        k += 1
    prefix = terms[:, 0, :] + F32(0.0)  # C starts from d2 = 0
    for i in range(1, k):
        prefix = (prefix[:, :, None] + terms[:, i, None, :]).reshape(n, -1)
    pcode, suffix = _prefix_tables(grid, k)

    group = np.repeat(np.arange(n, dtype=np.int32), counts)
    pos = np.arange(total, dtype=np.int32)
    pos += np.repeat((grid.nbr_start[codes] - first).astype(np.int32), counts)
    cand = grid.nbr[pos]  # grid index per candidate
    d2 = prefix.reshape(-1)[group * np.int32(nl**k) + pcode[cand]]
    flat = terms.reshape(-1)
    base = group * np.int32(dim * nl)
    for offsets in suffix:  # coordinates k .. dim-1
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


def codes_of_packed_bytes(packed: np.ndarray) -> np.ndarray:
    """codes_of for 8 coordinates of 2 bits (the IQ2 grids) whose levels (0..3) are packed one
    per byte in a uint64 (level i in byte i): three steps of folding neighbouring fields together."""
    v = packed.copy()
    t = np.empty_like(v)
    for shift, mask in ((6, 0x000F000F000F000F), (12, 0x000000FF000000FF), (24, 0xFFFF)):
        np.right_shift(v, np.uint64(shift), out=t)
        v |= t
        v &= np.uint64(mask)
    return v.view(np.int64)


_LEVELS_PACKED: dict[int, np.ndarray] = {}


def levels_packed(g: Grid) -> np.ndarray:
    """An 8-coordinate grid's levels [G, 8] packed as uint64 [G], byte i = level of coordinate i."""
    got = _LEVELS_PACKED.get(id(g.levels))
    if got is None:
        got = _LEVELS_PACKED[id(g.levels)] = np.ascontiguousarray(g.levels, dtype=np.uint8).view(np.uint64)[:, 0]
    return got


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


def best_trial(sumqx: np.ndarray, sumq2: np.ndarray, start: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """C's choice among the trial scales' fits, sums [T, B] in trial order: a block takes trial
    t when sumq2 > 0 and sumqx*sumqx > best*sumq2, then scale = sumqx/sumq2 and best =
    scale*sumqx (float32). Returns (trial [B], -1 for none; scale [B], `start` for none).
    The quotients and products are taken for all trials at once: the loop over trials is left
    with the comparison chain, a few numpy calls each."""
    nt, nb = sumqx.shape
    with np.errstate(all="ignore"):
        ok = sumq2 > 0
        fit = sumqx / np.where(ok, sumq2, F32(1.0))
        best_of = fit * sumqx
        square = sumqx * sumqx
    best = np.zeros(nb, F32)
    pick = np.full(nb, -1, np.intp)
    bound = np.empty(nb, F32)
    better = np.empty(nb, bool)
    for t in range(nt):
        np.multiply(best, sumq2[t], out=bound)
        np.greater(square[t], bound, out=better)
        better &= ok[t]
        np.copyto(best, best_of[t], where=better)
        np.copyto(pick, t, where=better)
    got = pick >= 0
    scale = np.where(got, fit[np.where(got, pick, 0), np.arange(nb)], start)
    return pick, scale


class SuperblockOverflow(Exception):
    """Raised by a chunk function when a super-block's fp16 scale is not finite."""

    def __init__(self, superblock: int):
        self.superblock = superblock


def quantize_superblocks(
    x: np.ndarray, qw: np.ndarray | None, type_size: int, chunk_fn, chunk_superblocks: int, prepare=None
) -> np.ndarray:
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
