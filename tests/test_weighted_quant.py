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
    heads = blocks[:, :4 if t in ("q4_1", "q5_1") else 2].copy().view(np.float16)
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
    x = np.array([[0.5, -0.0, 2.0, 0.0],
                  [-0.0, 0.0, 1.0, -0.0],
                  [0.0, 0.25, 3.0, -0.0]], np.float32)             # groups are columns
    got = k_search.first_min_clamped(x)
    assert np.array_equal(np.signbit(got), [True, True, False, False])
    assert np.array_equal(got, [0, 0, 0, 0])
