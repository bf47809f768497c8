"""The screened neighbour search (iq_screen.screened_neighbours) against the exact one
(best_neighbours, C's float32 order): wherever the screen decides, it must pick C's point, also
on the searches built to be hard for it: exact ties (a magnitude on the midpoint of two levels
at a power-of-two scale, where two candidates' float32 distances are equal), near ties (one ulp
off), negated magnitudes, zero and repeated weights, and magnitudes far below the scale."""

from __future__ import annotations

import numpy as np
import pytest

from llmconv.quantize import iq2, iq_grid, iq_screen
from llmconv.quantize.iq3_grid import grid as iq3_grid

F32 = np.float32


def _grids():
    return {
        "iq2_xxs": iq2.grid("iq2_xxs"),
        "iq2_xs": iq2.grid("iq2_xs"),
        "iq2_s": iq2.grid("iq2_s"),
        "iq3_xxs": iq3_grid(256).base,
        "iq3_s": iq3_grid(512).base,
    }


def _searches(g: iq_grid.Grid, n: int, seed: int):
    """n groups with their scale and off-grid code, as the quantizers produce them."""
    rng = np.random.default_rng(seed)
    dim, nl = g.dim, g.n_levels
    s = (2.0 ** rng.integers(-9, -3, n)).astype(F32)
    s[rng.random(n) < 0.3] *= F32(1.37)  # and scales that are not
    lv = rng.integers(0, nl, (n, dim))
    kind = rng.integers(0, 5, (n, dim))
    t = np.select(
        [kind == 0, kind == 1, kind == 2],
        [2 * lv + 2, 2 * lv + 1, rng.uniform(0.0, 2.0 * nl, (n, dim))],
        rng.uniform(0.0, 0.05, (n, dim)),
    )
    x = (t * s[:, None]).astype(F32)
    x = np.where(rng.random((n, dim)) < 0.1, np.nextafter(x, F32(np.inf)), x)  # one ulp off a tie
    x = np.where(rng.random((n, dim)) < 0.05, -x, x)  # parity-negated
    w = rng.choice(np.array([0.0, 1.0, 0.25, 3.0], F32), (n, dim))
    w = np.where(rng.random((n, dim)) < 0.5, rng.gamma(0.5, 1.0, (n, dim)).astype(F32), w)
    w[rng.random(n) < 0.05] = F32(1.0)  # all equal
    levels = np.clip(np.rint(F32(0.5) * (x / s[:, None] - F32(1.0))), 0, nl - 1).astype(np.int64)
    codes = iq_grid.codes_of(levels, g.bits)
    off = g.nbr_count[codes] > 0
    return codes[off], x[off], np.sqrt(w[off]), s[off]


@pytest.mark.parametrize("name", ["iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s"])
def test_screen_picks_c_choice_where_it_decides(name):
    g = _grids()[name]
    codes, x, w, s = _searches(g, 40000, seed=len(name))
    tables = iq_screen.group_tables(g, x, w)
    found, decided = iq_screen.screened_neighbours(g, codes, np.arange(len(codes)), s, tables)
    exact = iq_grid.best_neighbours(g, codes, x, w, s)
    wrong = np.flatnonzero(decided & (found != exact))
    assert wrong.size == 0, f"{name}: {wrong.size} screened choices differ from C's, first {wrong[:5].tolist()}"
    # the screen is what makes the search fast: it must decide most searches, and it must leave
    # the exact ties (equal float32 distances, where C's list order decides) to the exact search
    assert decided.mean() > 0.6, decided.mean()
    assert (~decided).sum() > 0.005 * len(codes)


def test_out_of_range_groups_are_not_screened():
    g = iq2.grid("iq2_xs")
    codes, x, w, s = _searches(g, 2000, seed=7)
    for scale_x, scale_w in ((1e-18, 1.0), (1e18, 1.0), (1.0, 1e36)):
        tables = iq_screen.group_tables(g, (x * F32(scale_x)).astype(F32), (w * F32(scale_w)).astype(F32))
        _, decided = iq_screen.screened_neighbours(
            g, codes, np.arange(len(codes)), (s * F32(scale_x)).astype(F32), tables
        )
        assert not decided.any(), (scale_x, scale_w)
    bad = x.copy()
    bad[::2, 0] = np.nan
    tables = iq_screen.group_tables(g, bad, w)
    _, decided = iq_screen.screened_neighbours(g, codes, np.arange(len(codes)), s, tables)
    assert not decided[::2].any() and decided[1::2].any()


@pytest.mark.parametrize("name", ["iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s"])
def test_searches_listed_by_group_and_scale_keep_c_choice(name):
    """The quantizers list a group's searches together, one per trial scale, and consecutive
    searches often share group and code (the screen then gathers their sums once). Here every
    group is searched at 7 scales (its code re-rounded at each), and groups with equal codes
    follow each other: runs must end where the group or the code changes."""
    g = _grids()[name]
    codes, x, w, s = _searches(g, 6000, seed=11)
    order = np.argsort(codes, kind="stable")
    x, w, s = x[order], w[order], s[order]
    factors = (F32(0.88) + F32(0.04) * np.arange(7)).astype(F32)
    group = np.repeat(np.arange(len(s)), len(factors))
    scale = (s[group] * np.tile(factors, len(s))).astype(F32)
    levels = np.clip(np.rint(F32(0.5) * (x[group] / scale[:, None] - F32(1.0))), 0, g.n_levels - 1)
    cd = iq_grid.codes_of(levels.astype(np.int64), g.bits)
    keep = g.nbr_count[cd] > 0
    group, scale, cd = group[keep], scale[keep], cd[keep]
    tables = iq_screen.group_tables(g, x, w)
    found, decided = iq_screen.screened_neighbours(g, cd, group, scale, tables)
    exact = iq_grid.best_neighbours(g, cd, x[group], w[group], scale)
    wrong = np.flatnonzero(decided & (found != exact))
    assert wrong.size == 0, f"{name}: {wrong.size} screened choices differ from C's, first {wrong[:5].tolist()}"
    assert decided.mean() > 0.6, decided.mean()
