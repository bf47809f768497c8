"""Legacy block quantizers (q8_0, q4_0, q4_1, q5_0, q5_1) against llama.cpp, byte for byte.

Oracle: llama.cpp's own quantizer (`llama_model_quantize`, pure, one thread) run through
llama-cpp-python on an f32 llama GGUF whose tensors hold the test data. gguf-py's numpy
quantizer is a second reference (exact for q8_0/q4_1/q5_1; reported only for q4_0/q5_0).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import gguf
from gguf import GGMLQuantizationType as GT

import llmconv.quantize as Q
from llmconv.quantize import _blocks as B_
from kernel_data import ROW, datasets, to_bf16_grid
from llmconv.testing.llama_gguf_util import LLAMA_MATRIX_NAMES, llama_quantize_file, read_tensors, write_f32_llama_gguf

LEGACY = ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"]
GGUF_PY_EXACT = {"q8_0", "q4_1", "q5_1"}


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    return datasets()


@pytest.fixture(scope="module")
def llama_outputs(tmp_path_factory, data):
    """type name -> {dataset name -> uint8 [rows, row bytes] from llama.cpp}."""
    tmp = tmp_path_factory.mktemp("quant")
    names = dict(zip(data, LLAMA_MATRIX_NAMES))
    src = write_f32_llama_gguf(tmp / "f32.gguf", {names[k]: v for k, v in data.items()}, n_embd=ROW)
    result = {}
    for t in LEGACY:
        dst = tmp / f"{t}.gguf"
        llama_quantize_file(src, dst, t, nthread=1)
        tensors = read_tensors(dst)
        result[t] = {}
        for k in data:
            ggml_type, raw = tensors[names[k]]
            assert ggml_type == Q.get(t).ggml_type
            result[t][k] = raw
    return result


def _diff(a: np.ndarray, b: np.ndarray, type_size: int) -> str:
    bad = np.flatnonzero((a.reshape(-1, type_size) != b.reshape(-1, type_size)).any(axis=1))
    return f"{len(bad)} blocks differ, first {bad[:5].tolist()}"


@pytest.mark.llamacpp
@pytest.mark.parametrize("t", LEGACY)
def test_bytes_equal_llama_cpp(t, data, llama_outputs):
    qt = Q.get(t)
    for name, x in data.items():
        ours = Q.quantize_tensor(x, qt)
        ref = llama_outputs[t][name]
        assert ours.shape == ref.shape, name
        assert np.array_equal(ours, ref), f"{t} {name}: {_diff(ours, ref, qt.type_size)}"


@pytest.mark.llamacpp
@pytest.mark.parametrize("t", LEGACY)
def test_bytes_equal_llama_cpp_cut_in_odd_pieces(t, data, llama_outputs, monkeypatch):
    """The block kernels work on chunks of CHUNK_BLOCKS blocks and transpose them LANES_PIECE
    blocks at a time; cuts at odd places (uneven last chunk and piece) keep the bytes."""
    monkeypatch.setattr(B_, "CHUNK_BLOCKS", 100)
    monkeypatch.setattr(B_, "LANES_PIECE", 7)
    qt = Q.get(t)
    for name, x in data.items():
        ours = qt.quantize(x)
        assert np.array_equal(ours, llama_outputs[t][name]), (
            f"{t} {name}: {_diff(ours, llama_outputs[t][name], qt.type_size)}"
        )


@pytest.mark.llamacpp
def test_edge_dataset_hits_the_edge_cases(data, llama_outputs):
    """The edge data really exercises what it claims (guards the data, not the kernels)."""
    q4 = llama_outputs["q4_0"]["edges"].reshape(-1, 18)
    d = q4[:, :2].copy().view(np.float16).ravel()
    assert (d.view(np.uint16) == 0x8000).any()  # -0.0 scale of an all-zero block
    q8 = llama_outputs["q8_0"]["edges"].reshape(-1, 34)
    assert (q8[:, :2].copy().view(np.float16) == 1.0).any()  # the roundf tie blocks
    m = llama_outputs["q4_1"]["edges"].reshape(-1, 20)[:, 2:4].copy().view(np.uint16).ravel()
    assert (m == 0x8000).any() and (m == 0).any()  # both zero signs of m occur


def _plus_zero_m(raw: np.ndarray, type_size: int) -> np.ndarray:
    blocks = raw.reshape(-1, type_size).copy()
    m = blocks[:, 2:4].view(np.uint16)
    m[m == 0x8000] = 0
    return blocks


@pytest.mark.parametrize("t", LEGACY)
def test_against_gguf_py(t, data):
    qt = Q.get(t)
    for name, x in data.items():
        ours = Q.quantize_tensor(x, qt)
        ref = gguf.quants.quantize(x, qt.ggml_type)
        if t in GGUF_PY_EXACT:
            if t in ("q4_1", "q5_1"):
                # gguf-py takes np.min, which loses the sign of a zero minimum; ggml keeps the
                # first zero (llama.cpp's bytes, asserted above, have m = -0.0 there).
                ours, ref = _plus_zero_m(ours, qt.type_size), _plus_zero_m(ref, qt.type_size)
            assert np.array_equal(ours, ref), f"{t} {name}: {_diff(ours, ref, qt.type_size)}"
        elif not np.array_equal(ours, ref):
            # gguf-py is not the oracle here (llama.cpp is): report, don't fail.
            warnings.warn(f"gguf-py differs from llama.cpp-exact {t} on {name}: {_diff(ours, ref, qt.type_size)}")


@pytest.mark.llamacpp
@pytest.mark.parametrize("t", LEGACY)
def test_dequantize_equals_gguf_py(t, llama_outputs):
    qt = Q.get(t)
    for name, raw in llama_outputs[t].items():
        ours = Q.dequantize_tensor(raw, qt)
        ref = gguf.quants.dequantize(raw, qt.ggml_type)
        assert ours.dtype == np.float32 and ours.shape == ref.shape
        assert np.array_equal(ours.view(np.uint32), ref.astype(np.float32).view(np.uint32)), f"{t} {name}"


@pytest.mark.parametrize("t", LEGACY)
def test_module_functions_match_registry(t, data):
    qt = Q.get(t)
    x = data["bf16"]
    raw = qt.quantize(x)
    assert raw.dtype == np.uint8 and raw.shape == (x.shape[0], x.shape[1] // 32 * qt.type_size)
    assert np.array_equal(raw, Q.quantize_tensor(x, t))
    assert qt.dequantize(raw).shape == x.shape


@pytest.mark.parametrize("t", LEGACY)
def test_threads_give_identical_bytes(t, monkeypatch):
    monkeypatch.setattr(Q, "CHUNK_BYTES", 64 * 1024)  # many chunks, uneven last one
    rng = np.random.default_rng(7)
    x = to_bf16_grid(rng.standard_normal((3, 37, 1024)) * 0.05)
    one = Q.quantize_tensor(x, t, threads=1)
    four = Q.quantize_tensor(x, t, threads=4)
    assert one.shape == (3, 37, 1024 // 32 * Q.get(t).type_size)
    assert np.array_equal(one, four)
    assert np.array_equal(one.reshape(-1, one.shape[-1]), Q.get(t).quantize(x.reshape(-1, 1024)))


@pytest.mark.parametrize("t", LEGACY)
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_names_first_bad_row(t, threads, bad, monkeypatch):
    monkeypatch.setattr(Q, "CHUNK_BYTES", 16 * 1024)
    x = np.random.default_rng(3).standard_normal((100, 256)).astype(np.float32)
    x[93, 255] = bad
    x[41, 100] = bad  # first bad row: 41, chunk 10
    x[77, 0] = bad
    with pytest.raises(Q.NonFiniteError) as e:
        Q.quantize_tensor(x, t, threads=threads)
    assert e.value.row == 41 and "NaN or inf" in str(e.value)


@pytest.mark.parametrize("t", LEGACY)
def test_scale_overflow_names_row(t):
    x = np.random.default_rng(4).standard_normal((20, 256)).astype(np.float32)
    x[12, 70] = 1e7  # d > 65504 for every legacy type
    x[15, 3] = np.nan  # a later NaN row does not win
    with pytest.raises(Q.NonFiniteError) as e:
        Q.quantize_tensor(x, t)
    assert e.value.row == 12 and "fp16" in str(e.value)


@pytest.mark.parametrize("t", ["q4_1", "q5_1"])
def test_min_overflow_names_row(t):
    x = np.zeros((4, 256), np.float32)
    x[2, 32:64] = -70000.0  # d = 0 but m = fp16(-70000) = -inf
    with pytest.raises(Q.NonFiniteError) as e:
        Q.quantize_tensor(x, t)
    assert e.value.row == 2
    Q.quantize_tensor(x, "q4_0")  # q4_0 only stores d = 8750: fine


@pytest.mark.llamacpp
@pytest.mark.parametrize("t", ["q8_0", "q4_1"])
def test_llama_cpp_also_rejects_overflow(t, tmp_path):
    """Raising is right: llama.cpp refuses to write an inf scale too."""
    x = np.zeros((2, 256), np.float32)
    x[1, 40] = 1e7 if t == "q8_0" else -1e5
    if t == "q4_1":
        x[1, 32:64] = -1e5
    with pytest.raises(Q.NonFiniteError):
        Q.quantize_tensor(x, t)
    src = write_f32_llama_gguf(tmp_path / "f32.gguf", {"blk.0.attn_q.weight": x})
    with pytest.raises(RuntimeError):
        llama_quantize_file(src, tmp_path / "out.gguf", t)


@pytest.mark.parametrize("t", LEGACY)
@pytest.mark.parametrize("shape", [(1, 32), (5, 32), (3, 96), (1, 160)])
def test_odd_block_counts(t, shape):
    """Packing works on word views of the block array; an odd number of blocks must not break
    it. Blocks are independent, so the bytes of a row are the same inside a larger matrix with
    an even block count, and equal gguf-py's where gguf-py is exact."""
    rng = np.random.default_rng(sum(shape))
    x = to_bf16_grid(rng.standard_normal(shape).astype(np.float32))
    got = Q.quantize_tensor(x, t)
    padded = Q.quantize_tensor(np.concatenate([x, x[:1]]), t)
    assert np.array_equal(got, padded[: shape[0]])
    if t in GGUF_PY_EXACT:
        assert np.array_equal(got, gguf.quants.quantize(x, getattr(GT, t.upper())))
