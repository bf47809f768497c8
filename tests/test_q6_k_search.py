"""q6_K's scale search (q6_search.search_unweighted) against llama.cpp, on data aimed at its shortcuts.

Oracle: `ggml_quantize_chunk(Q6_K, x, NULL)` from llama-cpp-python's libggml-base, i.e.
quantize_row_q6_K_ref. The shortcuts (see q6_search.py): no clamp on the candidates that
provably cannot reach it, C's comparison on float bits as integers, the winner's levels computed
only where the stored scale is 0, chunks with huge or non-finite values on the general path."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType

from llmconv.quantize import TYPES, k_common, q6_k, q6_search, quantize_tensor
from llmconv.quantize.k_common import F32
from llmconv.testing.llama_gguf_util import ggml_quantize_chunk


def clamp_edge_rows(seed: int, rows: int = 24, cols: int = 4096) -> np.ndarray:
    """Groups of 16 whose levels sit at the clamp's edges for every candidate: a signed max m,
    an opposite-sign weight -m*h/c and a same-sign one m*h/c with h = 31.5 or 32.5 and c each
    candidate's |numerator| (times 1 +- a few ulps: both sides of the rounding), the rest random
    below |m|. Without a clamp where C has one, some of these levels leave [-32, 31]."""
    rng = np.random.default_rng(seed)
    x = (rng.uniform(-0.9, 0.9, (rows * cols // 16, 16))).astype(F32)
    m = (rng.choice([-1, 1], x.shape[0]) * 2.0 ** rng.uniform(-12, 8, x.shape[0])).astype(F32)
    c = np.abs(q6_search.NUMERATORS.astype(np.float64))[rng.integers(0, len(q6_search.NUMERATORS), x.shape[0])]
    h = rng.choice([31.5, 32.5], x.shape[0])
    ratio = np.minimum(h / c * (1 + rng.integers(-4, 5, x.shape[0]) * 2.0**-24), 1.0)
    x *= np.abs(m)[:, None]
    x[:, 0] = m
    x[:, 1] = -m * ratio
    x[:, 2] = m * ratio
    pos = np.argsort(rng.random(x.shape), axis=1)  # the max anywhere in its group
    x = np.take_along_axis(x, pos, axis=1)
    return x.reshape(rows, cols)


def scale_zero_rows(seed: int, rows: int = 8, cols: int = 2048) -> np.ndarray:
    """Super-blocks where some groups' int8 scales round to 0 (one huge group next to tiny ones,
    all-zero groups, -0 weights): there C keeps the search's levels, computed here only for them."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows * cols // 256, 16, 16)).astype(F32)
    x[:, 1:] *= F32(1e-4)  # scale of these groups ~ 1e-4 of group 0's: int8 scale 0
    x[::3, 5] = 0.0
    x[1::3, 6] = -0.0
    x[2::5, 7] = F32(1e-30)  # live but tiny
    return x.reshape(rows, cols)


def huge_rows(seed: int, rows: int = 4, cols: int = 1024) -> np.ndarray:
    """Groups from 2**15 to 2**40 (chunks with |x| >= X_LIMIT take make_qx_quants_rmse1's path;
    past ~2**20 C's sumlx**2 overflows to inf, past ~2**40 sumlx itself)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols)) * 2.0 ** rng.uniform(15, 40, (rows, cols // 16)).repeat(16, axis=1)
    return x.astype(F32)


@pytest.mark.llamacpp
@pytest.mark.parametrize("make", [clamp_edge_rows, scale_zero_rows, huge_rows])
@pytest.mark.parametrize("seed", [0, 1])
def test_search_shortcuts_keep_c_bytes(make, seed):
    x = make(seed)
    ref = ggml_quantize_chunk(int(GGMLQuantizationType.Q6_K), x)
    ours = q6_k.quantize(x)
    bad = np.flatnonzero((ours.reshape(-1, 210) != ref.reshape(-1, 210)).any(axis=1))
    assert not bad.size, f"{bad.size} of {ref.size // 210} blocks differ, first {bad[:5].tolist()}"


@pytest.mark.llamacpp
@pytest.mark.parametrize("qtype", ["q6_k", "q4_k", "q2_k"])
def test_bytes_without_einsum(qtype, monkeypatch):
    """Where np.einsum's loop is not C's (a build with FMA), seq_sum_of_products takes the
    explicit products and sums: the bytes stay llama.cpp's."""
    monkeypatch.setattr(k_common, "einsum_runs_c_loop", lambda: False)
    x = clamp_edge_rows(2, rows=4, cols=2048)
    qt = TYPES[qtype]
    ref = ggml_quantize_chunk(int(qt.ggml_type), x)
    assert np.array_equal(quantize_tensor(x, qt), ref)


def test_clamp_free_candidates_stay_in_range():
    """The bound behind NEEDS_CLAMP, on its worst case (x = +-max, every float32 exponent and
    random mantissas): a candidate without the clamp never rounds outside [-31, 31], and the
    clamp is kept on at least the candidates where C's clamp can bite."""
    rng = np.random.default_rng(7)
    m = (2.0 ** rng.integers(-49, 60, 20000) * rng.uniform(1, 2, 20000)).astype(F32)
    m = np.concatenate([m, -m, np.nextafter(m, F32(np.inf))])
    for clamp, c in zip(q6_search.NEEDS_CLAMP, q6_search.NUMERATORS):
        iscale = np.divide(c, m)
        levels = np.rint(np.concatenate([m * iscale, -m * iscale]))
        if not clamp:
            assert np.abs(levels).max() <= 31, c
    assert sum(not c for c in q6_search.NEEDS_CLAMP) == 4  # is = -9..-6; at -5 x*iscale can be 31.5


def test_non_finite_or_huge_chunk_takes_the_exact_path():
    x = np.ones((16, 16), F32)
    assert q6_search.search_unweighted(x) is not None
    x[3, 3] = q6_search.X_LIMIT
    assert q6_search.search_unweighted(x) is None
    x[3, 3] = np.inf
    assert q6_search.search_unweighted(x) is None
    x[3, 3] = np.nan
    assert q6_search.search_unweighted(x) is None
