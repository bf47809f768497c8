"""K-quant kernels (q2_K ... q6_K) against llama.cpp.

The oracle is llama.cpp's own quantizer: an f32 llama GGUF holding test matrices goes through
`llama_model_quantize` (pure, no imatrix, one thread), and every quantized tensor it writes must
be byte-identical to llmconv's. Dequantization is checked against gguf-py's reader code.
"""

from __future__ import annotations

import numpy as np
import pytest
import gguf
from gguf import GGMLQuantizationType

from llmconv.quantize import TYPES, dequantize_tensor, k_common, q3_k, q3_search, quantize_tensor
from llmconv.quantize.k_common import fp16_bits, nearest_int, seq_sum

from llmconv.testing.llama_gguf_util import (
    LLAMA_MATRIX_NAMES,
    ggml_quantize_chunk,
    llama_quantize_file,
    read_tensors,
    write_f32_llama_gguf,
)

K_TYPES = ["q6_k", "q5_k", "q4_k", "q3_k", "q2_k"]
# llama.cpp has no "mostly q4_K" ftype; with `pure` every matrix gets the ftype's base type.
LLAMA_FTYPE_NAME = {"q6_k": "q6_k", "q5_k": "q5_k_s", "q4_k": "q4_k_s", "q3_k": "q3_k_s", "q2_k": "q2_k"}

ROWS, COLS = 48, 1024  # 192 super-blocks per matrix, 9 matrices per file


def bf16_grid(a: np.ndarray) -> np.ndarray:
    """Round-toward-zero onto the bf16 grid, like weights that came from a bf16 checkpoint."""
    return (np.asarray(a, dtype=np.float32).view(np.uint32) & 0xFFFF0000).view(np.float32)


def make_test_matrices(seed: int = 0) -> dict[str, np.ndarray]:
    """One matrix per llama tensor name, each probing a different kind of data."""
    rng = np.random.default_rng(seed)
    normal = lambda scale: bf16_grid(rng.standard_normal((ROWS, COLS)) * scale)

    outliers = normal(0.02)  # real-model-like: a few hot channels
    outliers[:, rng.choice(COLS, 12, replace=False)] *= 40

    special = normal(0.05)
    special[0] = 0  # all-zero super-blocks
    special[1, :300] = 0  # zero groups next to live ones
    special[2] = 0.375  # constant rows
    special[3, 7] = 3e4  # single huge values
    special[4, 700] = -5e3
    special[5, ::2] = 0  # half zeros
    special[6] = -np.abs(special[6]) - 1  # all negative (min far below 0)
    special[7] = np.abs(special[7]) + 1  # all positive (min clamps to 0)
    special[8, 256:512] = rng.integers(-8, 8, 256)  # exact small integers: rounding ties
    special[9] = np.where(rng.random(COLS) < 0.98, 0, rng.standard_normal(COLS) * 10)

    tiny = normal(1e-6)
    tiny[: ROWS // 2] *= 1e-3  # scales near/below fp16's subnormal range

    mixed = normal(1.0)
    mixed[:, :128] *= 1e-20  # vanishing half-blocks next to normal ones

    return {
        "token_embd.weight": normal(0.02),
        "blk.0.attn_q.weight": normal(1.0),
        "blk.0.attn_k.weight": normal(1e-3),
        "blk.0.attn_v.weight": outliers,
        "blk.0.attn_output.weight": special,
        "blk.0.ffn_gate.weight": tiny,
        "blk.0.ffn_up.weight": mixed,
        "blk.0.ffn_down.weight": bf16_grid(rng.uniform(-1, 1, (ROWS, COLS))),
        "output.weight": normal(30.0),
    }


@pytest.fixture(scope="module")
def f32_model(tmp_path_factory):
    mats = make_test_matrices()
    assert list(mats) == LLAMA_MATRIX_NAMES
    path = write_f32_llama_gguf(tmp_path_factory.mktemp("kq") / "f32.gguf", mats)
    return path, mats


@pytest.mark.llamacpp
@pytest.mark.parametrize("name", K_TYPES)
def test_quantize_bytes_match_llama_cpp(f32_model, tmp_path, name):
    src, mats = f32_model
    dst = tmp_path / f"{name}.gguf"
    llama_quantize_file(src, dst, LLAMA_FTYPE_NAME[name], nthread=1)
    qt = TYPES[name]
    theirs = read_tensors(dst)
    for tname, x in mats.items():
        ttype, raw = theirs[tname]
        assert ttype == qt.ggml_type, f"{tname}: llama.cpp wrote {ttype.name}"
        ref = np.asarray(raw, dtype=np.uint8).reshape(x.shape[0], -1)
        ours = quantize_tensor(x, qt)
        assert ours.shape == ref.shape
        bad_blocks = (ours.reshape(-1, qt.type_size) != ref.reshape(-1, qt.type_size)).any(axis=1)
        # every super-block is expected to be bit-identical: libggml-base is built for plain
        # x86-64 (no FMA contraction), so there is no float ambiguity to allow for
        assert not bad_blocks.any(), f"{tname}: {bad_blocks.sum()} of {bad_blocks.size} blocks differ"

        # dequantization of llama.cpp's bytes: identical to gguf-py's reference code
        ours_deq = dequantize_tensor(ref, qt)
        gguf_deq = gguf.quants.dequantize(ref, qt.ggml_type)
        np.testing.assert_array_equal(ours_deq, gguf_deq.reshape(ours_deq.shape))


@pytest.mark.llamacpp
def test_q3_k_cut_in_odd_chunks_matches_llama_cpp(f32_model, tmp_path, monkeypatch):
    """q3_K runs CHUNK_SUPERBLOCKS super-blocks at a time (the descent of its scale search on the
    groups of the whole chunk still changing), the start of the search START_GROUPS groups at a
    time: cuts at odd places keep llama.cpp's bytes."""
    src, mats = f32_model
    monkeypatch.setattr(q3_k, "CHUNK_SUPERBLOCKS", 7)
    monkeypatch.setattr(q3_search, "START_GROUPS", 40)
    dst = tmp_path / "q3_k.gguf"
    llama_quantize_file(src, dst, LLAMA_FTYPE_NAME["q3_k"], nthread=1)
    theirs = read_tensors(dst)
    for tname, x in mats.items():
        ref = np.asarray(theirs[tname][1], dtype=np.uint8).reshape(x.shape[0], -1)
        assert np.array_equal(q3_k.quantize(x), ref), tname


@pytest.mark.llamacpp
def test_q3_k_search_stops_after_five_sweeps_as_llama_cpp(monkeypatch):
    """make_q3_quants gives up after 5 sweeps of its descent; q3_search counts steps across sweeps
    to stop where C does. Weights near four values take long descents: a few of these 65536 groups
    would still change in a 6th sweep, and the bytes show it."""
    rng = np.random.default_rng(2)
    x = rng.choice(np.array([-1, -0.5, 0.5, 1], np.float32), (256, 4096))
    x += np.float32(0.05) * rng.standard_normal(x.shape, np.float32)
    ref = ggml_quantize_chunk(GGMLQuantizationType.Q3_K, x)
    assert np.array_equal(q3_k.quantize(x), ref)
    monkeypatch.setattr(q3_search, "SWEEPS", 6)  # the data reaches the limit: one more sweep shows
    assert not np.array_equal(q3_k.quantize(x), ref)


def test_element_major_in_tiles_is_the_transpose(monkeypatch):
    """element_major transposes TRANSPOSE_TILE sub-blocks at a time: uneven tiles included."""
    monkeypatch.setattr(k_common, "TRANSPOSE_TILE", 5)
    xb = np.random.default_rng(5).standard_normal((3, 256)).astype(np.float32)
    for group in (16, 32):
        np.testing.assert_array_equal(k_common.element_major(xb, group), xb.reshape(-1, group).T)


@pytest.mark.parametrize("name", K_TYPES)
def test_roundtrip_error_is_small(name):
    """Independent of llama.cpp: the reconstruction error stays within what the bit width allows."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((16, 512)).astype(np.float32)
    y = dequantize_tensor(quantize_tensor(x, name), name)
    assert y.shape == x.shape
    rel_rmse = float(np.sqrt(np.mean((y - x) ** 2)) / np.sqrt(np.mean(x**2)))
    bits = int(name[1])
    # uniform quantization of a Gaussian over about +-3 sigma with 2**bits levels
    assert rel_rmse < 6.0 / 2**bits / np.sqrt(3), rel_rmse


@pytest.mark.parametrize("name", K_TYPES)
def test_block_size_and_layout_constants(name):
    qt = TYPES[name]
    assert (qt.block_size, qt.type_size) == gguf.GGML_QUANT_SIZES[qt.ggml_type]
    assert TYPES[name].ggml_type == GGMLQuantizationType[name.upper()]
    x = np.zeros((3, 512), np.float32)
    out = quantize_tensor(x, name)
    assert out.shape == (3, 2 * qt.type_size) and out.dtype == np.uint8
    assert not out.any()  # zeros quantize to all-zero blocks


@pytest.mark.parametrize("groups", [1, 2, 3, 7, 8, 9, 17, 100, 4097])
def test_seq_sum_is_c_order(groups):
    """The kernels rely on seq_sum adding rows strictly one after another, as C's loops do."""
    rng = np.random.default_rng(groups)
    a = (rng.standard_normal((32, groups)) * rng.uniform(0, 1e4, (32, groups))).astype(np.float32)
    expected = np.zeros(groups, np.float32)
    for row in a:
        expected = (expected + row).astype(np.float32)
    np.testing.assert_array_equal(seq_sum(a), expected)


@pytest.mark.parametrize("groups", [1, 2, 3, 16, 17, 4097])
@pytest.mark.parametrize("n_factors", [2, 3])
def test_seq_sum_of_products_is_c_order(groups, n_factors):
    """seq_sum_of_products must be C's loop: +0, then each product (a*b, or (a*b)*c) rounded to
    float32 and added in element order. Terms spanning many binades and of mixed signs make a
    different order, a wider accumulator or a fused multiply-add show in most groups."""
    rng = np.random.default_rng(groups)
    factors = [
        (rng.standard_normal((16, groups)) * 2.0 ** rng.uniform(-20, 20, (16, groups))).astype(np.float32)
        for _ in range(n_factors)
    ]
    expected = np.zeros(groups, np.float32)
    for i in range(16):
        term = factors[0][i] * factors[1][i]
        for f in factors[2:]:
            term = term * f[i]
        expected = expected + term
    np.testing.assert_array_equal(k_common.seq_sum_of_products(*factors), expected)
    out = np.empty(groups, np.float32)
    assert k_common.seq_sum_of_products(*factors, out=out) is out
    np.testing.assert_array_equal(out, expected)


def _fused_einsum(subscripts, *factors):
    """einsum's loop as a build with FMA runs it: out = fma(a, b, out) (products kept exact)."""
    f = [np.asarray(x, np.float64) for x in factors]
    out = np.zeros(f[0].shape[1], np.float32)
    for i in range(f[0].shape[0]):
        p = f[0][i] * f[1][i]
        if len(f) == 3:  # fma(fl(a*b), c, out)
            p = p.astype(np.float32).astype(np.float64) * f[2][i]
        out = (p + out).astype(np.float32)
    return out


def _pairwise_einsum(subscripts, *factors):
    """Products rounded as C's, summed in halves instead of in element order."""
    t = factors[0] * factors[1]
    for f in factors[2:]:
        t = t * f
    return t[::2].sum(axis=0, dtype=np.float32) + t[1::2].sum(axis=0, dtype=np.float32)


def test_einsum_check_tells_c_loop_from_fused_or_reordered():
    """seq_sum_of_products uses np.einsum only where einsum_runs_c_loop says its loop is C's:
    a multiply-add that keeps the product unrounded, or another order, must fail that check."""

    def c_loop(subscripts, *factors):
        return k_common._c_loop_sum_of_products(list(factors))

    assert k_common.einsum_runs_c_loop(c_loop)
    assert not k_common.einsum_runs_c_loop(_fused_einsum)
    assert not k_common.einsum_runs_c_loop(_pairwise_einsum)


def test_nearest_int_rounds_half_to_even():
    v = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 2.4999998, 7.5000005, 0.0, -31.5, 4194303.0], dtype=np.float32)
    np.testing.assert_array_equal(nearest_int(v), np.rint(v.astype(np.float64)).astype(np.int64))


def test_fp16_bits_equals_numpys_cast():
    """fp16_bits rounds by integer and float32 operations (numpy's cast is slow): every float32
    exponent, both signs, random and rounding-edge mantissas, give numpy's (round-to-even) bits."""
    rng = np.random.default_rng(3)
    edges = np.array(
        [
            0,
            1,
            0xFFF,
            0x1000,
            0x1001,
            0x1FFF,
            0x2000,
            0x3000,
            0x5000,
            0x6000,
            0x7FE000,
            0x7FF000,
            0x7FEFFF,
            0x7FF001,
            0x7FFFFF,
        ],
        dtype=np.uint32,
    )
    mantissas = np.concatenate([rng.integers(0, 1 << 23, 2000, dtype=np.uint32), edges])
    exponents = np.arange(256, dtype=np.uint32)[:, None] << np.uint32(23)
    bits = (exponents | mantissas).reshape(-1)
    f = np.concatenate([bits, bits | np.uint32(0x80000000)]).view(np.float32)
    with np.errstate(all="ignore"):
        expected = f.astype(np.float16).view(np.uint16)
    np.testing.assert_array_equal(fp16_bits(f), expected)
    # fp16_bits takes one of three paths by the array's range: numpy's cast with NaN present,
    # float32 rounding with fp16 subnormals or overflow, integer rounding when all are normal
    finite = ~np.isnan(f)
    np.testing.assert_array_equal(fp16_bits(f[finite]), expected[finite])
    normal = (np.abs(f) >= 2.0**-14) & (np.abs(f) < 65504.0)
    assert normal.sum() > 100_000
    np.testing.assert_array_equal(fp16_bits(f[normal]), expected[normal])
    np.testing.assert_array_equal(fp16_bits(f[:6].reshape(2, 3)), expected[:6].reshape(2, 3))
    assert fp16_bits(np.float32(1e-6)) == np.float32(1e-6).astype(np.float16).view(np.uint16)
