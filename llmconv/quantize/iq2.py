"""IQ2_XXS, IQ2_XS and IQ2_S: 2-bit grid quantization, ggml's quantize_row_iq2_{xxs,xs,s}_impl.

Every group of 8 weights is stored as a sign mask plus one point of a grid (iq_grid.py) of
8 levels in {1, 3, 5} (dequantized through {8, 25, 43}/8 ... see `_DEQUANT_VALUES`):

    IQ2_XXS  66 bytes / 256: fp16 d, then per 32 weights two uint32: four 8-bit grid indices
             (256-point grid); four 7-bit sign masks and a 4-bit block scale (bits 28..31)
    IQ2_XS   74 bytes / 256: fp16 d, per 8 weights a uint16 (9-bit index into 512 points,
             7-bit signs), then eight bytes of two 4-bit scales (one per 16 weights)
    IQ2_S    82 bytes / 256: fp16 d (stored times 0.9875), 32 low index bytes, 32 sign bytes
             (all 8 signs), 8 bytes of index bits 8..9, 8 bytes of scales (1024 points)

A block's value is d * (0.5 + scale) * 0.25 * grid * sign. With 7-bit signs (XXS, XS) the
eighth sign is the parity of the other seven: a group with an odd number of negative weights
flips the sign of its least important weight (smallest w*x*x) first.

Per block (32 weights for XXS, 16 for XS and S) the search tries 13 (XXS) or 19 scales
around its start (make_qp_quants' scale for XXS, max/5 otherwise): round |x| to levels,
replace each group that is off the grid by its best neighbour, keep the scale with the best
weighted fit, then requantize once with the fitted scale. Weights are
qw * sqrt(sigma2 + x*x) with an imatrix; IQ2_S alone also runs without one (0.25*sigma2 + x*x),
as ggml does (llama-quantize requires an imatrix for all three, see mixes.py).

Conventions as in k_common: float32, C's operation order. Arrays are [.., blocks, 32|16]
(block-major): the sums over a block's weights loop over its elements, vectorized across
blocks and trial scales.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from . import iq2_tables
from ._blocks import ImatrixRequired
from .iq_grid import Grid, best_neighbours, best_trial, codes_of_packed_bytes, levels_packed, make_grid
from .iq_grid import quantize_superblocks
from .iq_screen import GroupTables, group_tables, screened_neighbours
from .k_common import F32, GROUP_MAX_EPS, QK_K, fp16_bits, nearest_int, nearest_int_clip, seq_sum_from_zero
from .k_weighted import block_sigma2, make_qp_quants

IQ2_XXS_SIZE = GGML_QUANT_SIZES[GGMLQuantizationType.IQ2_XXS][1]  # 66 bytes per 256 weights
IQ2_XS_SIZE = GGML_QUANT_SIZES[GGMLQuantizationType.IQ2_XS][1]  # 74
IQ2_S_SIZE = GGML_QUANT_SIZES[GGMLQuantizationType.IQ2_S][1]  # 82
GROUP_MAX_EPS_IQ2_S = F32(1e-8)
# super-blocks per numpy pass. The neighbour tables are ~G*16 bytes per group of 8 weights
# (1/4 MB per super-block for IQ2_S), so passes stay small; IQ2_XXS's tables are the smallest
# and its make_qp_quants sweeps (numpy calls over one value per block) want long passes.
CHUNK_SUPERBLOCKS = {"iq2_xxs": 128, "iq2_xs": 64, "iq2_s": 64}
_KMAXQ = 3
_DEQUANT_VALUES = np.array([8, 25, 43], dtype=F32)  # the byte ggml's iq2*_grid tables hold per level


@lru_cache(maxsize=None)
def grid(name: str) -> Grid:
    """The grid of an IQ2 type, built on first use (iq2xs_init_impl: nwant 2, IQ2_S 1)."""
    kgrid, nwant = {
        "iq2_xxs": (iq2_tables.KGRID_IQ2_XXS, 2),
        "iq2_xs": (iq2_tables.KGRID_IQ2_XS, 2),
        "iq2_s": (iq2_tables.KGRID_IQ2_S, 1),
    }[name]
    return make_grid(kgrid, dim=8, bits=2, nwant=nwant, max_level=_KMAXQ - 1)


# ---------------------------------------------------------------- shared steps


def _block_sums(w: np.ndarray, xval: np.ndarray, L: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """C: sumqx += w*xval*q; sumq2 += w*q*q over a block, q = 2L+1, from 0. L uint8
    [..., B, bs], w and xval [B, bs] -> sums [..., B]. Computed element-major ([bs, ..., B]):
    each of C's bs sequential additions is then one contiguous pass (seq_sum)."""
    bs, lead = L.shape[-1], L.shape[:-1]
    q = np.ascontiguousarray(L.reshape(-1, bs).T).astype(F32).reshape(bs, *lead)
    q *= F32(2.0)
    q += F32(1.0)
    per_block = (bs,) + (1,) * (len(lead) - 1) + (lead[-1],)  # [bs, 1.., B]
    pqx = np.ascontiguousarray((w * xval).T).reshape(per_block) * q
    q *= np.ascontiguousarray(w.T).reshape(per_block) * q  # (w*q)*q
    return seq_sum_from_zero(pqx.reshape(bs, -1)).reshape(lead), seq_sum_from_zero(q.reshape(bs, -1)).reshape(lead)


def _to_grid(
    g: Grid,
    xval: np.ndarray,
    waux: np.ndarray,
    inv: np.ndarray,
    scale: np.ndarray,
    tables: GroupTables,
    blocks: np.ndarray,
    groups: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Round xval [B, bs] at 1/`inv` ([T, B] trial scales, or [B]) to levels, and move every
    group of 8 that is off the grid to its best neighbour (at `scale`). Returns (levels uint8
    [(T,) B, bs], grid index [(T,) B, bs/8], off-grid mask [(T,) B, bs/8]). `groups` ([B, bs/8]
    bool) limits the work to those groups. `tables` holds the screened search's per-group sums,
    block `blocks[b]` for row b of xval."""
    one = inv.ndim == 1
    inv2, scale2 = (inv[None], scale[None]) if one else (inv, scale)
    nt, nb = inv2.shape
    bs = xval.shape[-1]
    k_per = bs // 8
    t = inv2[..., None] * xval  # C: nearest_int(0.5f*(id*xval[i] - 1)), clamped to 0..2
    t -= F32(1.0)
    t *= F32(0.5)
    lv = nearest_int_clip(t, 0, _KMAXQ - 1).astype(np.uint8)  # [T, B, bs]
    packed = lv.view(np.uint64)  # [T, B, K]: a group's 8 levels
    code = codes_of_packed_bytes(packed)
    gi = g.index[code]
    off = gi < 0
    search = off if groups is None else off & groups
    # a group's searches listed together, in trial order (its table row stays in cache, and
    # the screen gathers once per run of equal codes): index (b*K + k)*T + t
    hit = np.flatnonzero(search.transpose(1, 2, 0))
    if hit.size:
        bk = hit // nt
        f = (hit - bk * nt) * (nb * k_per) + bk  # flat index in [T, B, K]
        b = bk // k_per
        cw = code.reshape(-1)[f]
        sc = scale2.reshape(-1)[f // k_per]
        found, decided = screened_neighbours(g, cw, blocks[b] * k_per + (bk - b * k_per), sc, tables)
        rest = np.flatnonzero(~decided)
        if rest.size:
            r = bk[rest]
            found[rest] = best_neighbours(g, cw[rest], xval.reshape(-1, 8)[r], waux.reshape(-1, 8)[r], sc[rest])
        gi.reshape(-1)[f] = found
        packed.reshape(-1)[f] = levels_packed(g)[found]
    if one:
        return lv[0], gi[0], off[0]
    return lv, gi, off


def _signed(xb: np.ndarray, w: np.ndarray, parity: bool) -> tuple[np.ndarray, np.ndarray]:
    """xval = |x| (C's x >= 0 ? x : -x) and the sign masks [B, bs/8] (uint8). With `parity`,
    a group with an odd number of negatives flips its smallest w*x*x back to a "negative" xval."""
    neg = ~(xb >= 0)
    xval = np.where(neg, -xb, xb)
    B, bs = xb.shape
    bits = (neg.reshape(B, bs // 8, 8).astype(np.uint8) << np.arange(8, dtype=np.uint8)).sum(axis=2, dtype=np.uint8)
    if parity:
        odd = (np.unpackbits(bits[..., None], axis=-1).sum(axis=-1) & 1).astype(bool)
        if odd.any():
            imp = ((w * xb) * xb).reshape(B, bs // 8, 8)
            imin = np.argmin(imp, axis=2)  # the first of equal minima, as C
            b, k = np.nonzero(odd)
            col = k * 8 + imin[b, k]
            xval[b, col] = -xval[b, col]
            bits[b, k] ^= np.uint8(1) << imin[b, k].astype(np.uint8)
        bits &= 127
    return xval, bits


@dataclass
class _Blocks:
    """A chunk's per-block results: scale [B], grid indices [B, K], signs [B, K]."""

    scale: np.ndarray
    gi: np.ndarray
    signs: np.ndarray


def _search(
    g: Grid, xb: np.ndarray, w: np.ndarray, parity: bool, eps: F32, qp_scale: np.ndarray | None = None
) -> _Blocks:
    """The per-block search shared by the three types (see the module docstring); XXS passes
    its blocks' make_qp_quants scales (_xxs_start_scales)."""
    B, bs = xb.shape
    waux = np.sqrt(w)
    xval, signs = _signed(xb, w, parity)
    mx = xval.max(axis=1)
    zero = mx < eps
    xxs = qp_scale is not None
    if xxs:
        eff_max = qp_scale * F32(_KMAXQ)
        zero |= ~(eff_max > 0)
        scale, top, trials = qp_scale, eff_max, range(-6, 7)
    else:
        scale, top, trials = mx / F32(2 * _KMAXQ - 1), mx, range(-9, 10)
    live = np.flatnonzero(~zero)
    xv, wv, wa = xval[live], w[live], waux[live]
    scale = scale[live]
    ids = np.stack([(F32(2 * _KMAXQ - 1) + F32(s) * F32(0.1)) / top[live] for s in trials])  # [T, b]
    tables = group_tables(g, xv.reshape(-1, 8), wa.reshape(-1, 8))
    blocks = np.arange(len(live))
    lv, gi, off = _to_grid(g, xv, wa, ids, F32(1.0) / ids, tables, blocks)
    sumqx, sumq2 = _block_sums(wv, xv, lv)

    pick, scale = best_trial(sumqx, sumq2, scale)
    cols = np.arange(len(live))
    got = pick >= 0
    L = np.where(got[:, None], lv[pick, cols], 0)
    gi_best = np.where(got[:, None], gi[pick, cols], 0)
    off_best = np.where(got[:, None], off[pick, cols], False)

    redo = scale > 0 if xxs else (scale > 0) & off_best.any(axis=1)
    r = np.flatnonzero(redo)
    if r.size:
        s = scale[r]
        groups = None if xxs else off_best[r]
        lv2, gi2, _ = _to_grid(g, xv[r], wa[r], F32(1.0) / s, s, tables, r, groups)
        if xxs:
            L[r], gi_best[r] = lv2, gi2
        else:
            L[r] = np.where(np.repeat(groups, 8, axis=1), lv2, L[r])
            gi_best[r] = np.where(groups, gi2, gi_best[r])
        sqx, sq2 = _block_sums(wv[r], xv[r], L[r])
        scale[r] = np.where(sq2 > 0, sqx / sq2, s)

    neg = scale < 0
    scale = np.where(neg, -scale, scale)
    sg = signs[live]
    sg[neg] = ~sg[neg] & (127 if parity else 255)

    out = _Blocks(np.zeros(B, F32), np.zeros((B, bs // 8), np.int32), np.zeros((B, bs // 8), np.uint8))
    out.scale[live], out.gi[live], out.signs[live] = scale, gi_best, sg
    return out


def _super_scales(scale: np.ndarray, per_super: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(max_scale [nsb], d = max_scale/31 [nsb], 4-bit scales [nsb, per_super])."""
    s = scale.reshape(-1, per_super)
    max_scale = np.maximum(s.max(axis=1), F32(0.0))
    d = max_scale / F32(31)
    inv = F32(1.0) / np.where(max_scale > 0, d, F32(1.0))
    ls = np.clip(nearest_int(F32(0.5) * (inv[:, None] * s - F32(1.0))), 0, 15)
    ls[max_scale == 0] = 0
    return max_scale, d, ls.astype(np.uint32)


def _weights(xb: np.ndarray, qwb: np.ndarray | None, bs: int, sigma_factor: int) -> np.ndarray:
    """weight [B, bs]: qw*sqrt(sigma2 + x*x), or IQ2_S's 0.25*sigma2 + x*x without qw."""
    sigma2 = np.repeat(block_sigma2(xb, sigma_factor), QK_K // bs)[:, None]
    x = xb.reshape(-1, bs)
    if qwb is None:
        return F32(0.25) * sigma2 + x * x
    return qwb.reshape(-1, bs) * np.sqrt(sigma2 + x * x)


# ---------------------------------------------------------------- the three types


def _xxs_start_scales(xb: np.ndarray, qwb: np.ndarray) -> np.ndarray:
    """make_qp_quants' scale of every block of 32 [nsb, 8], the start of XXS's search. Its
    sweeps are numpy calls over one value per block, so they run over all super-blocks at once."""
    x = xb.reshape(-1, 32)
    w = _weights(xb, qwb, 32, 1)
    xval, _ = _signed(x, w, True)
    scale, _ = make_qp_quants(np.ascontiguousarray(xval.T), _KMAXQ + 1, np.ascontiguousarray(w.T))
    return scale.reshape(-1, 8)


def _xxs_chunk(xb: np.ndarray, qwb: np.ndarray, qp_scale: np.ndarray) -> np.ndarray:
    nsb = xb.shape[0]
    r = _search(
        grid("iq2_xxs"), xb.reshape(-1, 32), _weights(xb, qwb, 32, 1), True, GROUP_MAX_EPS, qp_scale.reshape(-1)
    )
    max_scale, d, ls = _super_scales(r.scale, 8)
    gi = r.gi.astype(np.uint32).reshape(nsb, 8, 4)
    sg = r.signs.astype(np.uint32).reshape(nsb, 8, 4)
    q2 = np.empty((nsb, 8, 2), np.uint32)
    q2[..., 0] = gi[..., 0] | gi[..., 1] << 8 | gi[..., 2] << 16 | gi[..., 3] << 24
    q2[..., 1] = sg[..., 0] | sg[..., 1] << 7 | sg[..., 2] << 14 | sg[..., 3] << 21 | ls << 28
    q2[max_scale == 0] = 0
    out = np.empty((nsb, IQ2_XXS_SIZE), np.uint8)
    out[:, 0:2] = fp16_bits(np.where(max_scale > 0, d, F32(0.0))).reshape(-1, 1).view(np.uint8)
    out[:, 2:] = q2.reshape(nsb, 16).view(np.uint8)
    return out


def _xs_chunk(xb: np.ndarray, qwb: np.ndarray) -> np.ndarray:
    nsb = xb.shape[0]
    r = _search(grid("iq2_xs"), xb.reshape(-1, 16), _weights(xb, qwb, 16, 1), True, GROUP_MAX_EPS)
    max_scale, d, ls = _super_scales(r.scale, 16)
    q2 = (r.gi.astype(np.uint16) | (r.signs.astype(np.uint16) << 9)).reshape(nsb, 32)
    q2[max_scale == 0] = 0
    out = np.empty((nsb, IQ2_XS_SIZE), np.uint8)
    out[:, 0:2] = fp16_bits(np.where(max_scale > 0, d, F32(0.0))).reshape(-1, 1).view(np.uint8)
    out[:, 2:66] = q2.view(np.uint8)
    out[:, 66:74] = (ls[:, 0::2] | ls[:, 1::2] << 4).astype(np.uint8)
    return out


def _s_chunk(xb: np.ndarray, qwb: np.ndarray | None) -> np.ndarray:
    nsb = xb.shape[0]
    r = _search(grid("iq2_s"), xb.reshape(-1, 16), _weights(xb, qwb, 16, 2), False, GROUP_MAX_EPS_IQ2_S)
    max_scale, d, ls = _super_scales(r.scale, 16)
    gi = r.gi.reshape(nsb, 32).astype(np.uint32)
    out = np.zeros((nsb, IQ2_S_SIZE), np.uint8)
    # ggml writes the grid and sign bytes even when every block scale ends up 0 (then d = 0)
    out[:, 0:2] = fp16_bits(np.where(max_scale > 0, d * F32(0.9875), F32(0.0))).reshape(-1, 1).view(np.uint8)
    out[:, 2:34] = (gi & 255).astype(np.uint8)
    out[:, 34:66] = r.signs.reshape(nsb, 32)
    hi = (gi >> 8).reshape(nsb, 8, 4) << (2 * np.arange(4, dtype=np.uint32))
    out[:, 66:74] = np.bitwise_or.reduce(hi, axis=2).astype(np.uint8)
    out[:, 74:82] = (ls[:, 0::2] | ls[:, 1::2] << 4).astype(np.uint8)
    return out


def _over(x: np.ndarray, qw: np.ndarray | None, type_size: int, fn, name: str, prepare=None) -> np.ndarray:
    return quantize_superblocks(x, qw, type_size, fn, CHUNK_SUPERBLOCKS[name], prepare)


def _needs_imatrix(name: str):
    def quantize(x: np.ndarray) -> np.ndarray:
        raise ImatrixRequired(f"{name} needs an importance matrix (--imatrix), as llama.cpp's quantizer does")

    return quantize


iq2_xxs_quantize_unweighted = _needs_imatrix("iq2_xxs")
iq2_xs_quantize_unweighted = _needs_imatrix("iq2_xs")


def iq2_xxs_quantize(x: np.ndarray, qw: np.ndarray) -> np.ndarray:
    return _over(x, qw, IQ2_XXS_SIZE, _xxs_chunk, "iq2_xxs", _xxs_start_scales)


def iq2_xs_quantize(x: np.ndarray, qw: np.ndarray) -> np.ndarray:
    return _over(x, qw, IQ2_XS_SIZE, _xs_chunk, "iq2_xs")


def iq2_s_quantize(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    return _over(x, qw, IQ2_S_SIZE, _s_chunk, "iq2_s")


# ---------------------------------------------------------------- dequantization


@lru_cache(maxsize=None)
def _values(name: str) -> np.ndarray:
    """float32 [G, 8]: the grid as ggml's iq2*_grid tables dequantize it."""
    return _DEQUANT_VALUES[grid(name).levels]


def _sign_table() -> np.ndarray:
    """ksigns_iq2xs as ±1 [128, 8]: the 7 stored bits plus their parity as bit 7."""
    i = np.arange(128, dtype=np.uint8)
    parity = np.unpackbits(i[:, None], axis=1).sum(axis=1) & 1
    full = i | (parity.astype(np.uint8) << 7)
    return _bits_to_signs(full)


def _bits_to_signs(b: np.ndarray) -> np.ndarray:
    bits = (b[..., None] >> np.arange(8, dtype=np.uint8)) & 1
    return np.where(bits == 1, F32(-1.0), F32(1.0))


_SIGNS7 = _sign_table()


def _scale_of(d: np.ndarray, nibble: np.ndarray) -> np.ndarray:
    """C: d * (0.5f + nibble) * 0.25f."""
    return (d * (F32(0.5) + nibble.astype(F32))) * F32(0.25)


def _dequant(db: np.ndarray, vals: np.ndarray, signs: np.ndarray, rows: int) -> np.ndarray:
    """db [nsb, 32] per group of 8, grid values [nsb, 32, 8], signs ±1 [nsb, 32, 8]."""
    return ((db[..., None] * vals) * signs).reshape(rows, -1)


def iq2_xxs_dequantize(b: np.ndarray) -> np.ndarray:
    b = np.ascontiguousarray(b, dtype=np.uint8)
    blk = b.reshape(-1, IQ2_XXS_SIZE)
    d = blk[:, 0:2].copy().view(np.float16).astype(F32)  # [nsb, 1]
    q2 = blk[:, 2:].copy().view(np.uint32).reshape(-1, 8, 2)
    idx = (q2[..., 0:1] >> (8 * np.arange(4, dtype=np.uint32))) & 255  # [nsb, 8, 4]
    sg = (q2[..., 1:2] >> (7 * np.arange(4, dtype=np.uint32))) & 127
    db = np.repeat(_scale_of(d, q2[..., 1] >> 28), 4, axis=1)  # [nsb, 32]
    return _dequant(db, _values("iq2_xxs")[idx.reshape(-1, 32)], _SIGNS7[sg.reshape(-1, 32)], b.shape[0])


def iq2_xs_dequantize(b: np.ndarray) -> np.ndarray:
    b = np.ascontiguousarray(b, dtype=np.uint8)
    blk = b.reshape(-1, IQ2_XS_SIZE)
    d = blk[:, 0:2].copy().view(np.float16).astype(F32)
    qs = blk[:, 2:66].copy().view(np.uint16)  # [nsb, 32]
    sc = blk[:, 66:74]
    nib = np.stack([sc & 15, sc >> 4], axis=2).reshape(-1, 16)  # one per 16 weights
    db = np.repeat(_scale_of(d, nib), 2, axis=1)
    return _dequant(db, _values("iq2_xs")[qs & 511], _SIGNS7[qs >> 9], b.shape[0])


def iq2_s_dequantize(b: np.ndarray) -> np.ndarray:
    b = np.ascontiguousarray(b, dtype=np.uint8)
    blk = b.reshape(-1, IQ2_S_SIZE)
    d = blk[:, 0:2].copy().view(np.float16).astype(F32)
    qh = blk[:, 66:74].astype(np.int64)
    hi = (qh[:, :, None] >> (2 * np.arange(4))) & 3  # [nsb, 8, 4]
    idx = blk[:, 2:34].astype(np.int64) | (hi.reshape(-1, 32) << 8)
    sc = blk[:, 74:82]
    nib = np.stack([sc & 15, sc >> 4], axis=2).reshape(-1, 16)
    db = np.repeat(_scale_of(d, nib), 2, axis=1)
    return _dequant(db, _values("iq2_s")[idx], _bits_to_signs(blk[:, 34:66]), b.shape[0])
