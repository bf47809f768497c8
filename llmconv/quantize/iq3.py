"""IQ3_XXS and IQ3_S: ggml's quantize_row_iq3_xxs_impl / quantize_row_iq3_s_impl, bit for bit.

Both cut a 256-weight super-block into 8 blocks of 32 and each block into 8 groups of 4. A
block stores its signs apart and quantizes the magnitudes: every group becomes one point of a
grid of allowed level combinations (iq3_grid: 256 points for XXS, 512 for S), at the block's
scale; the block scales are then stored as 4-bit multiples of one fp16 super-block scale.

Per block (C's order of float32 operations throughout):
* weights: qw * sqrt(sigma2 + x**2) with an imatrix (sigma2 = 2 * sum(x**2) / 256 over the
  super-block), else x**2; the neighbour search weighs with their square roots;
* XXS keeps an even number of minus signs per 8 weights (7 sign bits are stored): when the
  count is odd, the weight with the smallest weight * x**2 has its magnitude negated instead;
* the scale search tries id = (15 + 0.2 * is) / max for is in -15..15 (XXS) or -9..9 (S):
  levels nearest_int((id * |x| - 1) / 2) clamped to 0..7; a group that is off the grid takes
  its best neighbour (smallest weighted squared error at scale 1/id, the first on ties); the
  trial with the largest sumqx**2 / sumq2 wins;
* then the groups still off the grid (XXS) or all groups (S) are re-fitted at the winning
  scale, and the scale becomes their least-squares fit.

Layout: blocks along the last axis ([32, blocks] for weights, [8, blocks] for groups), so one
C loop step over a block is one vector operation over all blocks of a chunk; the trials are a
middle axis ([32, trials, blocks]): every trial is fitted in one batch, and only C's choice of the
best trial runs trial by trial.
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .iq3_grid import Iq3Grid, grid
from .iq_grid import SuperblockOverflow, best_neighbours, best_trial, quantize_superblocks
from .iq_screen import GroupTables, group_tables, screened_neighbours
from .k_common import F32, QK_K, fp16_bits, nearest_int, seq_sum_from_zero

IQ3_XXS_SIZE = GGML_QUANT_SIZES[GGMLQuantizationType.IQ3_XXS][
    1
]  # 98 bytes: fp16 d, 64 grid indices, 8 x uint32 (4 x 7 sign bits | 4-bit scale)
IQ3_S_SIZE = GGML_QUANT_SIZES[GGMLQuantizationType.IQ3_S][1]  # 110 bytes: fp16 d, qs[64], qh[8], signs[32], scales[4]
CHUNK_SUPERBLOCKS = 32  # 256 blocks per pass: the search's [32, 31 trials, blocks] arrays are ~1 MB
XXS_MAX_EPS = F32(1e-8)  # GROUP_MAX_EPS_IQ3_XXS: a block below it is stored as zeros


# ---------------------------------------------------------------- the grid search


def _fit_levels(
    g: Iq3Grid,
    xval: np.ndarray,
    xg: np.ndarray,
    wg: np.ndarray,
    idv: np.ndarray,
    scale: np.ndarray,
    groups: np.ndarray | None,
    exact: bool,
    tables: GroupTables,
    group_ids: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Levels of every group at T inverse scales per block, idv[T, B] (neighbours at scale[T, B]).

    xval [32, B]; xg/wg [4, 8*B] the same magnitudes and sqrt-weights by group (column k*B+b).
    `groups` [8, B] (or None: all) limits the neighbour search to those groups. `tables` holds
    the screened search's sums for group group_ids[column] (None: the column itself).
    Returns (levels float32 [32, T, B] in 0..7, on_grid bool [8, T, B]) where on_grid says
    whether nearest rounding landed on the grid.
    """
    nt, nb = idv.shape
    t = xval[:, None, :] * idv[None]
    t -= F32(1.0)
    t *= F32(0.5)
    if exact:  # idv may be inf, or id*x beyond 2**22: ggml's nearest_int, bit for bit
        t = np.clip(nearest_int(t), 0, 7).astype(F32)
    else:  # |t| < 2**21 here, where nearest_int is round-half-even
        np.rint(t, out=t)
        np.clip(t, F32(0.0), F32(7.0), out=t)
    lv = t.reshape(8, 4, nt, nb)
    u = lv[:, 0] + lv[:, 1] * F32(8) + lv[:, 2] * F32(64) + lv[:, 3] * F32(512)
    u = u.astype(np.intp)  # [8, T, B]
    on_grid = g.kmap[u] >= 0
    search = ~on_grid if groups is None else ~on_grid & groups[:, None, :]
    # the searches group by group (a group's table row then stays in cache): (k*B + b)*T + trial
    gid = np.flatnonzero(search.transpose(0, 2, 1))
    if gid.size:
        per_k = nt * nb
        col = gid // nt  # k*B + b: the group's column in xg/wg
        k = col // nb
        rem = (gid - col * nt) * nb + (col - k * nb)  # trial*B + b
        us, sc = u.reshape(-1)[k * per_k + rem], scale.reshape(-1)[rem]
        best, decided = screened_neighbours(g.base, us, col if group_ids is None else group_ids[col], sc, tables)
        rest = np.flatnonzero(~decided)
        if rest.size:
            cr = col[rest]
            # few (~0.5 %): the generic search, a fixed number of numpy calls for all of them
            best[rest] = best_neighbours(g.base, us[rest], xg[:, cr].T, wg[:, cr].T, sc[rest])
        row = k * (4 * per_k) + rem  # flat index of (row 4k, trial, b)
        flat = t.reshape(-1)
        for i in range(4):  # rows 4k..4k+3
            flat[row] = g.codes_f32[i, best]
            row += per_k
    return t, on_grid


def _sums(L: np.ndarray, weight: np.ndarray, wx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sum(w*x*q), sum(w*q*q) over each block's 32 weights, q = 2L + 1: L [32, T, B] -> [T, B]."""
    q = L * F32(2.0)
    q += F32(1.0)
    shape = q.shape[1:]
    sumqx = seq_sum_from_zero((wx[:, None, :] * q).reshape(32, -1))
    q *= weight[:, None, :] * q
    return sumqx.reshape(shape), seq_sum_from_zero(q.reshape(32, -1)).reshape(shape)


def _search(
    g: Iq3Grid, xval: np.ndarray, weight: np.ndarray, mx: np.ndarray, tries: range, refit_all: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The per-block scale search over B active blocks -> (scale [B], levels [32, B]).
    All trial scales are fitted in one batch; C's sequential choice of the best follows."""
    nb = xval.shape[1]
    waux = np.sqrt(weight)
    wx = weight * xval
    xgm = np.ascontiguousarray(xval.reshape(8, 4, nb).transpose(1, 0, 2)).reshape(4, -1)
    wgm = np.ascontiguousarray(waux.reshape(8, 4, nb).transpose(1, 0, 2)).reshape(4, -1)
    # rint equals ggml's nearest_int while |id * x| < 2**22; id <= 18.2 / max, and only XXS's
    # negated magnitudes can exceed max (by any factor)
    exact = not (np.isfinite(F32(18.2) / mx).all() and (xval.min(axis=0) >= -F32(1e5) * mx).all())

    idv = (F32(15.0) + np.array(tries, F32)[:, None] * F32(0.2)) / mx  # [T, B]
    tables = group_tables(g.base, np.ascontiguousarray(xgm.T), np.ascontiguousarray(wgm.T))
    Lall, on_all = _fit_levels(g, xval, xgm, wgm, idv, F32(1.0) / idv, None, exact, tables)
    sumqx, sumq2 = _sums(Lall, weight, wx)
    pick, scale = best_trial(sumqx, sumq2, mx / F32(15.0))  # pick -1: no trial won, L stays 0
    L = np.zeros((32, nb), F32)
    on_grid = np.full((8, nb), not refit_all)  # XXS starts "on grid", S "off grid"
    won = np.flatnonzero(pick >= 0)
    L[:, won] = Lall[:, pick[won], won]
    on_grid[:, won] = on_all[:, pick[won], won]

    refit = (~on_grid).any(axis=0) & (scale > 0)
    if refit.any():
        cols = np.flatnonzero(refit)
        sc = scale[cols]
        sub = lambda a: np.ascontiguousarray(a[:, cols])  # noqa: E731
        gm = lambda a: np.ascontiguousarray(a.reshape(4, 8, nb)[:, :, cols]).reshape(4, -1)  # noqa: E731
        groups = None if refit_all else ~on_grid[:, cols]
        ids = (np.arange(8)[:, None] * nb + cols).reshape(-1)  # column k*len(cols)+j -> k*nb+cols[j]
        Lnew, _ = _fit_levels(
            g, sub(xval), gm(xgm), gm(wgm), (F32(1.0) / sc)[None], sc[None], groups, True, tables, ids
        )
        Lnew = Lnew[:, 0]
        if groups is not None:  # XXS keeps the levels of groups already on the grid
            Lnew = np.where(np.repeat(groups, 4, axis=0), Lnew, L[:, cols])
        sumqx, sumq2 = _sums(Lnew[:, None], sub(weight), sub(wx))
        L[:, cols] = Lnew
        scale[cols] = np.where(sumq2[0] > 0, sumqx[0] / np.where(sumq2[0] > 0, sumq2[0], F32(1.0)), sc)
    return scale, L


# ---------------------------------------------------------------- blocks


def _block_inputs(xb: np.ndarray, qwb: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """xb [nsb, 256] -> (x [32, B], weight [32, B]) element-major, B = 8 * nsb."""
    x = np.ascontiguousarray(xb.reshape(-1, 32).T)
    if qwb is None:
        return x, x * x
    x256 = np.ascontiguousarray(xb.T)
    sumx2 = seq_sum_from_zero(x256 * x256)
    sigma2 = np.repeat(F32(2.0) * sumx2 / F32(QK_K), 8)
    qw = np.ascontiguousarray(qwb.reshape(-1, 32).T)
    return x, qw * np.sqrt(sigma2 + x * x)


def _sign_bits(neg: np.ndarray) -> np.ndarray:
    """neg bool [32, B] -> uint8 [4, B]: bit i of byte k = weight 8k+i is negative."""
    bits = neg.reshape(4, 8, -1).astype(np.uint8) << np.arange(8, dtype=np.uint8)[None, :, None]
    return np.bitwise_or.reduce(bits, axis=1)


def _even_signs(x: np.ndarray, weight: np.ndarray, xval: np.ndarray, signs: np.ndarray) -> None:
    """XXS: in each 8 weights with an odd number of minus signs, negate the magnitude of the one
    with the smallest weight * x**2 (the first of equals) and toggle its sign bit, in place."""
    odd = np.unpackbits(signs[..., None], axis=-1).sum(axis=-1, dtype=np.uint8) % 2 == 1
    if not odd.any():
        return
    a = ((weight * x) * x).reshape(4, 8, -1)
    amin = a[:, 0].copy()
    imin = np.zeros(amin.shape, np.uint8)
    for i in range(1, 8):
        lt = a[:, i] < amin
        np.copyto(amin, a[:, i], where=lt)
        imin[lt] = i
    kk, bb = np.nonzero(odd)
    rows = 8 * kk + imin[kk, bb]
    xval[rows, bb] = -xval[rows, bb]
    signs[kk, bb] ^= np.uint8(1) << imin[kk, bb]


def _quantize_blocks(xb: np.ndarray, qwb: np.ndarray | None, g: Iq3Grid, xxs: bool):
    """xb [nsb, 256] -> (block scale float32 [B], grid index [8, B], sign bytes [4, B],
    stored bool [B]: the block went through the search)."""
    x, weight = _block_inputs(xb, qwb)
    neg = x < 0
    xval = np.where(neg, -x, x)
    signs = _sign_bits(neg)
    if xxs:
        _even_signs(x, weight, xval, signs)
    mx = np.maximum.reduce(xval, axis=0)
    stored = ~(mx < XXS_MAX_EPS) if xxs else mx != 0
    nb = x.shape[1]
    scale = np.zeros(nb, F32)
    index = np.zeros((8, nb), np.int32)
    cols = np.flatnonzero(stored)
    if cols.size:
        part = (lambda a: a) if cols.size == nb else (lambda a: np.ascontiguousarray(a[:, cols]))
        tries = range(-15, 16) if xxs else range(-9, 10)
        sc, L = _search(g, part(xval), part(weight), mx[cols], tries, refit_all=not xxs)
        negative = sc < 0  # "should never happen": flip the scale and the signs
        if negative.any():
            sc = np.abs(sc)
            flip = cols[negative]
            signs[:, flip] = ~signs[:, flip]
        lv = L.astype(np.intp).reshape(8, 4, -1)
        u = lv[:, 0] | (lv[:, 1] << 3) | (lv[:, 2] << 6) | (lv[:, 3] << 9)
        index[:, cols] = g.kmap[u]
        scale[cols] = sc
    if xxs:
        signs &= 127
        signs[:, ~stored] = 0  # C leaves a skipped block's sign word as zeros
    return scale, index, signs, stored


def _superblock_scales(scale: np.ndarray, fudge: np.float32):
    """Block scales [B] -> (fp16 d bits [nsb], 4-bit scale codes [nsb, 8], all-zero [nsb])."""
    s = scale.reshape(-1, 8)
    max_scale = np.maximum.reduce(s, axis=1)
    zero = max_scale == 0
    d = max_scale / F32(31.0)
    dh = fp16_bits(d * fudge)
    idv = F32(1.0) / d
    ls = np.clip(nearest_int(F32(0.5) * (idv[:, None] * s - F32(1.0))), 0, 15)
    if not np.isfinite(dh.view(np.float16)).all():
        raise SuperblockOverflow(int(np.argmax(~np.isfinite(dh.view(np.float16)))))
    return dh, ls.astype(np.uint32), zero


def _xxs_chunk(xb: np.ndarray, qwb: np.ndarray | None) -> np.ndarray:
    nsb = xb.shape[0]
    scale, index, signs, _ = _quantize_blocks(xb, qwb, grid(256), xxs=True)
    dh, ls, zero = _superblock_scales(scale, F32(1.0125))
    s = signs.astype(np.uint32)
    words = (s[0] | (s[1] << 7) | (s[2] << 14) | (s[3] << 21)).reshape(nsb, 8) | (ls << 28)
    out = np.empty((nsb, IQ3_XXS_SIZE), np.uint8)
    out[:, 0:2] = dh.reshape(-1, 1).view(np.uint8)
    out[:, 2:66] = index.astype(np.uint8).T.reshape(nsb, 64)  # q3[8*ib + k]
    out[:, 66:98] = words.astype("<u4").view(np.uint8)
    out[zero, 2:] = 0  # C copies nothing then
    return out


def _s_chunk(xb: np.ndarray, qwb: np.ndarray | None) -> np.ndarray:
    nsb = xb.shape[0]
    scale, index, signs, stored = _quantize_blocks(xb, qwb, grid(512), xxs=False)
    dh, ls, zero = _superblock_scales(scale, F32(1.033))
    out = np.zeros((nsb, IQ3_S_SIZE), np.uint8)
    out[:, 0:2] = np.where(zero, np.uint16(0), dh).reshape(-1, 1).view(np.uint8)
    # C advances its qs/signs pointers only past blocks it stored: the blocks after an all-zero
    # block move up one slot (and the dequantizer reads them one block off); qh is not moved.
    st = stored.reshape(nsb, 8)
    slot = np.cumsum(st, axis=1) - 1
    sb, ib = np.nonzero(st)
    qs = (index & 255).astype(np.uint8).T.reshape(nsb, 8, 8)  # [sb, ib, k]
    sg = signs.T.reshape(nsb, 8, 4)
    dst_qs = out[:, 2:66].reshape(nsb, 8, 8)
    dst_sg = out[:, 74:106].reshape(nsb, 8, 4)
    dst_qs[sb, slot[sb, ib]] = qs[sb, ib]
    dst_sg[sb, slot[sb, ib]] = sg[sb, ib]
    hi = ((index >> 8) & 1).astype(np.uint8) << np.arange(8, dtype=np.uint8)[:, None]
    out[:, 66:74] = np.bitwise_or.reduce(hi, axis=0).reshape(nsb, 8)
    lsz = np.where(zero[:, None], np.uint32(0), ls).astype(np.uint8)
    out[:, 106:110] = lsz[:, 0::2] | (lsz[:, 1::2] << 4)
    return out


def _over(x: np.ndarray, qw: np.ndarray | None, type_size: int, fn) -> np.ndarray:
    return quantize_superblocks(x, qw, type_size, fn, CHUNK_SUPERBLOCKS)


def iq3_xxs_quantize(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    return _over(x, qw, IQ3_XXS_SIZE, _xxs_chunk)


def iq3_s_quantize(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    return _over(x, qw, IQ3_S_SIZE, _s_chunk)


# ---------------------------------------------------------------- dequantization

# The dequantizers' grids (ggml-common.h iq3xxs_grid, iq3s_grid), from the same points: IQ3_S
# stores the levels 2l + 1; IQ3_XXS stores 4 * (2l + 1), except 62 for the top level, and
# halves its block scale instead.
_XXS_LEVEL_VALUES = np.array([4, 12, 20, 28, 36, 44, 52, 62], F32)
_S_LEVEL_VALUES = np.arange(1, 16, 2).astype(F32)


def _grid_values(size: int, level_values: np.ndarray) -> np.ndarray:
    return level_values[grid(size).codes]  # [size, 4]


def _sign_factors(bits: np.ndarray) -> np.ndarray:
    """uint8 [..., 4] sign bytes -> float32 [..., 32]: -1 where bit j of byte l is set."""
    b = np.unpackbits(bits[..., None], axis=-1, bitorder="little")  # [..., 4, 8]
    return (F32(1.0) - F32(2.0) * b.astype(F32)).reshape(*bits.shape[:-1], 32)


def iq3_xxs_dequantize(b: np.ndarray) -> np.ndarray:
    b = np.ascontiguousarray(b, dtype=np.uint8)
    rows = b.shape[0]
    blk = b.reshape(-1, IQ3_XXS_SIZE)
    nsb = blk.shape[0]
    d = blk[:, 0:2].copy().view(np.float16).astype(F32)  # [nsb, 1]
    words = blk[:, 66:98].copy().view("<u4").astype(np.uint32)  # [nsb, 8]
    db = (d * (F32(0.5) + (words >> 28).astype(F32))) * F32(0.5)
    seven = np.stack([(words >> (7 * l)) & 127 for l in range(4)], axis=-1).astype(np.uint8)
    parity = (np.unpackbits(seven[..., None], axis=-1).sum(axis=-1) & 1).astype(np.uint8)
    signs = _sign_factors(seven | (parity << 7))  # [nsb, 8, 32]
    vals = _grid_values(256, _XXS_LEVEL_VALUES)[blk[:, 2:66].reshape(nsb, 8, 8)].reshape(nsb, 8, 32)
    return ((db[:, :, None] * vals) * signs).reshape(rows, -1)


def iq3_s_dequantize(b: np.ndarray) -> np.ndarray:
    b = np.ascontiguousarray(b, dtype=np.uint8)
    rows = b.shape[0]
    blk = b.reshape(-1, IQ3_S_SIZE)
    nsb = blk.shape[0]
    d = blk[:, 0:2].copy().view(np.float16).astype(F32)  # [nsb, 1]
    sc = blk[:, 106:110]
    ls = np.stack([sc & 15, sc >> 4], axis=-1).reshape(nsb, 8).astype(np.int32)
    db = d * (1 + 2 * ls).astype(F32)  # [nsb, 8]
    hi = np.unpackbits(blk[:, 66:74, None], axis=-1, bitorder="little").astype(np.int32)  # [nsb, 8, 8]
    index = blk[:, 2:66].reshape(nsb, 8, 8).astype(np.int32) | (hi << 8)
    vals = _grid_values(512, _S_LEVEL_VALUES)[index].reshape(nsb, 8, 32)
    signs = _sign_factors(blk[:, 74:106].reshape(nsb, 8, 4))
    return ((db[:, :, None] * vals) * signs).reshape(rows, -1)
