"""Importance-weighted quantization against llama.cpp, byte for byte.

Oracle: `ggml_quantize_chunk(type, x, imatrix)` from llama-cpp-python's libggml-base (what
llama_model_quantize calls for every chunk of rows, with the tensor's imatrix), on bf16-grid
data, the legacy edge-case blocks, and importance vectors from realistic to degenerate.
"""

from __future__ import annotations

import numpy as np
import pytest

import llmconv.quantize as Q
from llmconv.quantize import k_search, k_weighted, legacy_weighted
from llmconv.testing.llama_gguf_util import ggml_quantize_chunk
from kernel_data import datasets, importance_vectors, to_bf16_grid

WEIGHTED = ["q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]

pytestmark = pytest.mark.llamacpp


@pytest.fixture(scope="module")
def data():
    return datasets()


def _scales_overflow(raw: np.ndarray, t: str) -> bool:
    """True if a block of llama.cpp's output stores an inf/NaN fp16 scale (llama_model_quantize
    then refuses the tensor: ggml_validate_row_data)."""
    qt = Q.get(t)
    blocks = raw.reshape(-1, qt.type_size)
    heads = blocks[:, : 4 if t in ("q4_1", "q5_1") else 2].copy().view(np.float16)
    return not np.isfinite(heads).all()


def _first_diff(a, b, type_size) -> str:
    bad = np.flatnonzero((a.reshape(-1, type_size) != b.reshape(-1, type_size)).any(axis=1))
    return f"{len(bad)} of {a.size // type_size} blocks differ, first {bad[:5].tolist()}"


@pytest.mark.parametrize("t", WEIGHTED)
def test_weighted_bytes_equal_llama_cpp(t, data):
    qt = Q.get(t)
    checked = refused = 0
    for name, x in data.items():
        for iname, qw in importance_vectors(x.shape[1]).items():
            qw = qw.astype(np.float32)
            ref = ggml_quantize_chunk(qt.ggml_type, x, qw)
            try:
                ours = Q.quantize_tensor(x, qt, imatrix=qw)
            except Q.NonFiniteError as e:
                # ours refuses exactly where llama.cpp writes a scale fp16 cannot hold
                assert _scales_overflow(ref[e.row], t), f"{t} {name} {iname}: {e}"
                refused += 1
                continue
            assert np.array_equal(ours, ref), f"{t} {name} {iname}: {_first_diff(ours, ref, qt.type_size)}"
            checked += 1
    assert checked >= 40 and refused <= 6


@pytest.mark.parametrize("t", WEIGHTED)
def test_imatrix_changes_the_bytes(t, data):
    """The weighted path is really taken (and differs from the unweighted one, as in llama.cpp)."""
    x = data["bf16"]
    qw = importance_vectors(x.shape[1])["realistic"].astype(np.float32)
    plain = Q.quantize_tensor(x, t)
    weighted = Q.quantize_tensor(x, t, imatrix=qw)
    assert not np.array_equal(plain, weighted)
    assert np.array_equal(plain, ggml_quantize_chunk(Q.get(t).ggml_type, x, None))


def test_q8_0_ignores_the_imatrix(data):
    x = data["bf16"]
    qw = importance_vectors(x.shape[1])["realistic"].astype(np.float32)
    ours = Q.quantize_tensor(x, "q8_0", imatrix=qw)
    assert np.array_equal(ours, Q.quantize_tensor(x, "q8_0"))
    assert np.array_equal(ours, ggml_quantize_chunk(Q.get("q8_0").ggml_type, x, qw))


@pytest.mark.parametrize("t", WEIGHTED)
def test_chunking_and_threads_keep_the_bytes(t, monkeypatch):
    """Rows of several super-blocks, cut into chunks that start mid-row: each block must still
    get its own columns' weights (and, for the legacy types, its whole row's sigma2)."""
    monkeypatch.setattr(Q, "CHUNK_BYTES", 3 * 768 * 4)
    monkeypatch.setattr(k_weighted, "CHUNK_SUPERBLOCKS", 5)
    monkeypatch.setattr(legacy_weighted, "ROWS_BLOCKS", 50)
    rng = np.random.default_rng(21)
    x = to_bf16_grid(rng.standard_normal((11, 768)) * 0.03)
    qw = importance_vectors(768)["realistic"].astype(np.float32)
    one = Q.quantize_tensor(x, t, threads=1, imatrix=qw)
    three = Q.quantize_tensor(x, t, threads=3, imatrix=qw)
    assert np.array_equal(one, three)
    assert np.array_equal(one, ggml_quantize_chunk(Q.get(t).ggml_type, x, qw))


@pytest.mark.parametrize("t", ["q4_0", "q4_1", "q5_0", "q5_1"])
def test_legacy_rows_not_multiple_of_256(t):
    rng = np.random.default_rng(5)
    x = to_bf16_grid(rng.standard_normal((7, 96)))
    qw = importance_vectors(96)["realistic"].astype(np.float32)
    assert np.array_equal(Q.quantize_tensor(x, t, imatrix=qw), ggml_quantize_chunk(Q.get(t).ggml_type, x, qw))


def test_imatrix_length_must_match_rows():
    with pytest.raises(ValueError, match="imatrix has 255 values"):
        Q.quantize_tensor(np.zeros((2, 256), np.float32), "q4_k", imatrix=np.ones(255, np.float32))


def test_first_min_clamped_keeps_c_zero_sign():
    x = np.array(
        [[0.5, -0.0, 2.0, 0.0], [-0.0, 0.0, 1.0, -0.0], [0.0, 0.25, 3.0, -0.0]], np.float32
    )  # groups are columns
    got = k_search.first_min_clamped(x)
    assert np.array_equal(np.signbit(got), [True, True, False, False])
    assert np.array_equal(got, [0, 0, 0, 0])


def _make_qp_quants_scalar(x: np.ndarray, nmax: int, w: np.ndarray) -> tuple[np.float32, np.ndarray]:
    """ggml's make_qp_quants for one group, statement by statement in float32 scalars (L a
    uint8_t array, as in C): the reference for the vectorized one's shortcuts below."""
    f, n = np.float32, len(x)

    def nearest_int(v):
        return int((np.array(v + f(12582912.0), np.float32).view(np.int32) & 0x007FFFFF) - 0x00400000)

    mx = f(0)
    for v in x:
        mx = max(mx, v)
    L = np.zeros(n, np.uint8)
    if mx < f(1e-15):
        return f(0), L
    iscale = f(nmax) / mx
    for i in range(n):
        L[i] = nearest_int(iscale * x[i]) & 0xFF
    scale, best = f(1) / iscale, f(0)
    for i in range(n):
        diff = x[i] - scale * f(L[i])
        best += w[i] * diff * diff
    for k in (-4, -3, -2, -1, 1, 2, 3, 4):
        isc = (f(0.1) * f(k) + f(nmax)) / mx
        sc, mse = f(1) / isc, f(0)
        for i in range(n):
            diff = x[i] - sc * f(min(nmax, nearest_int(isc * x[i])))
            mse += w[i] * diff * diff
        if mse < best:
            best, iscale = mse, isc
    sumlx = suml2 = f(0)
    for i in range(n):
        li = min(nmax, nearest_int(iscale * x[i]))
        L[i] = li & 0xFF
        sumlx += w[i] * x[i] * f(li)
        suml2 += w[i] * f(li) * f(li)
    for _ in range(5):
        changed = 0
        for i in range(n):
            slx = sumlx - w[i] * x[i] * f(L[i])
            sl2 = suml2 - w[i] * f(L[i]) * f(L[i])
            if slx > 0 and sl2 > 0:
                new_l = min(nmax, nearest_int(x[i] * sl2 / slx))
                if new_l != L[i]:
                    slx += w[i] * x[i] * f(new_l)
                    sl2 += w[i] * f(new_l) * f(new_l)
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i], sumlx, suml2 = new_l & 0xFF, slx, sl2
                        changed += 1
        if not changed:
            break
    return (sumlx / suml2 if suml2 > 0 else f(0)), L


def test_make_qp_quants_pair_equals_the_scalar_search():
    """make_qp_quants_pair (both searches in one call, later sweeps only on the groups the last
    one changed, C's wrapping uint8 stores) against C's loop: sub-block scales as the weighted
    K-quants produce them, plus negative values (L wraps), zero groups, zero weights, ties."""
    rng = np.random.default_rng(8)
    nb, n = 48, 8
    a = np.abs(rng.standard_normal((nb, n))).astype(np.float32) * 1e-3
    b = np.abs(rng.standard_normal((nb, n))).astype(np.float32) * 1e-3
    a[0] = 0  # all-zero group
    a[1, :4] = -a[1, :4]  # negatives: nearest_int < 0, stored wrapped
    b[2] = -b[2]
    a[3] = np.float32(1e-3)  # constant
    b[4, ::2] = 0
    a[5] = rng.integers(0, 64, n) / np.float32(63) * np.float32(2e-3)  # on the level grid: ties
    w = rng.gamma(0.5, 1.0, (nb, n)).astype(np.float32)
    w[6] = 0  # weightless group
    w[7, 3] = 0
    with np.errstate(all="ignore"):  # 0/0 where C discards it too
        (da, La), (db, Lb) = k_weighted.make_qp_quants_pair(a, b, 63, w)
    for got_d, got_L, x in ((da, La, a), (db, Lb, b)):
        for g in range(nb):
            d, L = _make_qp_quants_scalar(x[g], 63, w[g])
            assert got_d[g].tobytes() == np.float32(d).tobytes() and np.array_equal(got_L[:, g], L), g
