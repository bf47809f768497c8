"""IQ3_XXS and IQ3_S against llama.cpp: kernels (ggml_quantize_chunk, with and without an
imatrix) on bf16-grid data and super-block edge cases, and the dequantizers (ggml's to_float)."""

from __future__ import annotations

import numpy as np
import pytest

import llmconv.quantize as Q
from llmconv.quantize import iq3
from llmconv.testing.llama_gguf_util import ggml_dequantize, ggml_quantize_chunk
from kernel_data import datasets, importance_vectors, to_bf16_grid

IQ3 = ["iq3_xxs", "iq3_s"]
ROW = 512  # two super-blocks per row
pytestmark = pytest.mark.llamacpp


def edge_rows(rng: np.random.Generator) -> np.ndarray:
    """One row per case, each a super-block pattern that takes a special path in ggml's search."""
    rows = []

    def normal(n=ROW, s=0.02):
        return to_bf16_grid(rng.standard_normal(n) * s)

    def blocks_zeroed(*which):  # some 32-blocks all zero, the rest normal
        r = normal().reshape(-1, 32)
        r[list(which)] = 0
        return r.ravel()

    rows.append(np.zeros(ROW))  # all-zero super-blocks
    rows.append(np.full(ROW, -0.0))
    rows.append(np.full(ROW, 0.5))  # constant rows
    rows.append(np.full(ROW, -3.0))
    rows.append(blocks_zeroed(0))  # IQ3_S stores the later blocks one slot up
    rows.append(blocks_zeroed(3, 7, 8, 15))
    rows.append(blocks_zeroed(1, 2, 3, 4, 5, 6, 7))  # one block left in the first super-block
    r = normal()
    r[:256] *= 1e-7  # blocks below IQ3_XXS's 1e-8 threshold
    r[40:44] = [2e-8, -3e-8, 5e-9, 1e-8]
    rows.append(r)
    rows.append(to_bf16_grid(rng.standard_normal(ROW) * 1e-40))  # subnormal: 1/max overflows
    rows.append(to_bf16_grid(rng.standard_normal(ROW) * 1e5))  # large, fp16 d still finite
    r = normal(s=1e-3)  # one huge weight among small ones: with an
    r[[25, 300]] = [-5e5, 7e5]  # odd sign count its magnitude may be negated
    rows.append(r)
    r = np.abs(normal())  # exactly one minus sign in every 8 weights
    r[::8] *= -1
    rows.append(r)
    r = np.tile([1.0, -1.0, 1.0, 1.0], ROW // 4) * 0.25  # equal |x|: ties in the sign choice
    rows.append(r)
    levels = rng.integers(0, 8, ROW)  # magnitudes on the level grid 2l + 1
    rows.append((2 * levels + 1) * np.where(rng.random(ROW) < 0.5, -0.01, 0.01))
    rows.append(to_bf16_grid(rng.integers(-3, 4, ROW) * 0.5))  # many rounding ties
    return np.stack(rows).astype(np.float32)


def _data() -> dict[str, np.ndarray]:
    d = datasets()
    return {
        "bf16": d["bf16"],
        "bf16_heavy": d["bf16_heavy"],
        "bf16_coarse": d["bf16_coarse"],
        "normal_1000": d["normal_1000"],
        "edges": d["edges_shuffled"],
        "iq3_edges": edge_rows(np.random.default_rng(3)),
    }


def _diff(a: np.ndarray, b: np.ndarray, type_size: int) -> str:
    bad = np.flatnonzero((a.reshape(-1, type_size) != b.reshape(-1, type_size)).any(axis=1))
    return f"{len(bad)} of {a.size // type_size} super-blocks differ, first {bad[:5].tolist()}"


@pytest.mark.parametrize("t", IQ3)
def test_kernel_bytes_equal_llama_cpp(t):
    qt = Q.get(t)
    for name, x in _data().items():
        ims = {"none": None, **importance_vectors(x.shape[1])}
        for iname, qw in ims.items():
            qw = None if qw is None else qw.astype(np.float32)
            ours = Q.quantize_tensor(x, qt, imatrix=qw)
            ref = ggml_quantize_chunk(qt.ggml_type, x, qw)
            assert np.array_equal(ours, ref), f"{t} {name} {iname}: {_diff(ours, ref, qt.type_size)}"


def test_edge_rows_reach_the_special_paths():
    """Guards the data: the IQ3_S row with a zero first block really has its blocks moved up
    (llama.cpp's dequantized block 0 is not zero), and the XXS threshold row has blocks that
    llama.cpp stores as zeros next to ones it does not."""
    x = edge_rows(np.random.default_rng(3))
    s = ggml_quantize_chunk(Q.get("iq3_s").ggml_type, x[4:5], None)
    assert np.abs(ggml_dequantize(Q.get("iq3_s").ggml_type, s, ROW)[0, :32]).max() > 0
    xxs = ggml_quantize_chunk(Q.get("iq3_xxs").ggml_type, x[7:8], None).reshape(-1, iq3.IQ3_XXS_SIZE)
    words = xxs[0, 66:98].copy().view("<u4")
    grid_bytes = xxs[0, 2:66].reshape(8, 8)
    assert (words == 0).any() and (grid_bytes[1] != 0).any()


@pytest.mark.parametrize("t", IQ3)
def test_scale_overflow_is_refused_where_llama_cpp_writes_inf(t):
    qt = Q.get(t)
    x = np.random.default_rng(4).standard_normal((3, 256)).astype(np.float32)
    x[2] *= 1e9  # d = max/15/31 * 1.01 > 65504
    ref = ggml_quantize_chunk(qt.ggml_type, x, None)
    d = ref[:, :2].copy().view(np.float16).ravel()
    assert np.isfinite(d[:2]).all() and np.isinf(d[2])  # llama_model_quantize rejects such rows
    with pytest.raises(Q.NonFiniteError) as e:
        Q.quantize_tensor(x, qt)
    assert e.value.row == 2 and "fp16" in str(e.value)
    assert np.array_equal(Q.quantize_tensor(x[:2], qt), ref[:2])


@pytest.mark.parametrize("t", IQ3)
def test_chunks_and_threads_keep_the_bytes(t, monkeypatch):
    """Chunks that start mid-row must still give each super-block its own imatrix columns."""
    monkeypatch.setattr(Q, "CHUNK_BYTES", 3 * 768 * 4)
    monkeypatch.setattr(iq3, "CHUNK_SUPERBLOCKS", 2)
    rng = np.random.default_rng(21)
    x = to_bf16_grid(rng.standard_normal((7, 768)) * 0.03)
    qw = importance_vectors(768)["realistic"].astype(np.float32)
    one = Q.quantize_tensor(x, t, threads=1, imatrix=qw)
    assert np.array_equal(one, Q.quantize_tensor(x, t, threads=3, imatrix=qw))
    assert np.array_equal(one, ggml_quantize_chunk(Q.get(t).ggml_type, x, qw))


@pytest.mark.parametrize("t", IQ3)
def test_dequantize_equals_llama_cpp(t):
    qt = Q.get(t)
    for name, x in _data().items():
        raw = ggml_quantize_chunk(qt.ggml_type, x, None)
        ours = Q.dequantize_tensor(raw, qt)
        ref = ggml_dequantize(qt.ggml_type, raw, x.shape[1])
        assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32)), f"{t} {name}"
    x = datasets()["bf16"]
    err = np.abs(Q.dequantize_tensor(Q.quantize_tensor(x, qt), qt) - x).max(axis=1)
    assert (err < 0.5 * np.abs(x).max(axis=1)).all()


def test_imatrix_changes_the_bytes():
    x = datasets()["bf16"]
    qw = importance_vectors(x.shape[1])["realistic"].astype(np.float32)
    for t in IQ3:
        assert not np.array_equal(Q.quantize_tensor(x, t), Q.quantize_tensor(x, t, imatrix=qw))


# ---- whole files: llama_model_quantize on the same f32 GGUF ------------------------------------


@pytest.fixture
def tiny_model(tmp_path):
    from mix_util import write_tensor_only_llama

    return write_tensor_only_llama(tmp_path / "m.gguf", 2, 8, 2, False, {(1, "ffn_down"): 512})


def test_pure_files_equal_llama_quantize(tiny_model, tmp_path):
    import llmconv
    from llmconv.imatrix import write_imatrix_gguf
    from mix_util import assert_same_file, llama_quantize, llama_quantize_with_imatrix, synthetic_imatrix

    im = synthetic_imatrix(tiny_model, seed=2)
    write_imatrix_gguf(tmp_path / "im.gguf", im)
    for t in IQ3:
        theirs = llama_quantize_with_imatrix(tiny_model, tmp_path / f"{t}-theirs.gguf", t, im, pure=True)
        ours = tmp_path / f"{t}-ours.gguf"
        llmconv.quantize(tiny_model, ours, outtype=t, pure=True, imatrix=tmp_path / "im.gguf")
        assert_same_file(theirs, ours)
    theirs = llama_quantize(tiny_model, tmp_path / "plain-theirs.gguf", "iq3_s", pure=True)
    ours = tmp_path / "plain-ours.gguf"
    llmconv.quantize(tiny_model, ours, outtype="iq3_s", pure=True)
    assert_same_file(theirs, ours)


def test_iq3_xxs_needs_an_imatrix_as_in_llama_quantize(tiny_model, tmp_path, capsys):
    """llama-quantize refuses IQ3_XXS outside token_embd/output without an imatrix, or with one
    that lacks the tensor; so does llmconv, with a one-line error naming the tensor."""
    from llmconv.cli import main
    from llmconv.imatrix import write_imatrix_gguf
    from mix_util import llama_quantize_with_imatrix, synthetic_imatrix
    from mix_util import llama_quantize

    out = tmp_path / "out.gguf"
    assert main(["quantize", str(tiny_model), str(out), "--type", "iq3_xxs", "--pure", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tensor blk.0.attn_q.weight" in err[0] and "importance matrix" in err[0], err
    with pytest.raises(AssertionError, match="returned"):
        llama_quantize(tiny_model, tmp_path / "theirs.gguf", "iq3_xxs", pure=True)

    im = synthetic_imatrix(tiny_model, seed=2)
    del im.entries["blk.1.ffn_up.weight"]
    write_imatrix_gguf(tmp_path / "im.gguf", im)
    assert (
        main(
            [
                "quantize",
                str(tiny_model),
                str(out),
                "--type",
                "iq3_xxs",
                "--pure",
                "--imatrix",
                str(tmp_path / "im.gguf"),
                "-q",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tensor blk.1.ffn_up.weight" in err[0] and "no entry" in err[0], err
    with pytest.raises(AssertionError, match="returned"):
        llama_quantize_with_imatrix(tiny_model, tmp_path / "theirs.gguf", "iq3_xxs", im, pure=True)
    assert not out.exists()


# ---- the --outtype mixes -----------------------------------------------------------------------

MIXES = ["iq3_xxs", "iq3_xs", "iq3_s", "iq3_m"]
NEED_IMATRIX = {"iq3_xxs", "iq3_xs"}  # llama-quantize refuses them without one


def _types_match(tmp_path, src_path, mix, im=None):
    """Per-tensor types of llmconv's plan and of llama_model_quantize (with `im`, or none)."""
    from llmconv.convert.gguf_source import open_gguf_source
    from llmconv.convert.pipeline import gguf_model_shape
    from llmconv.convert.plan import TypePolicy, make_plan
    from mix_util import llama_quantize_with_imatrix
    from mix_util import llama_quantize, read

    src = open_gguf_source(src_path)
    dst = tmp_path / f"{mix}-{im is not None}.gguf"
    theirs = read(llama_quantize_with_imatrix(src_path, dst, mix, im) if im else llama_quantize(src_path, dst, mix))[1]
    plan = make_plan(
        src.tensors, TypePolicy(mix, tied_embeddings=src.tied_embeddings, model=gguf_model_shape(src), imatrix=im)
    )
    ours = {t.name: t.qtype.ggml_type.name for t in plan.tensors}
    diff = {n: (theirs[n][0], ours[n]) for n in theirs if theirs[n][0] != ours[n]}
    assert not diff, f"{mix}, imatrix {im is not None}: (llama.cpp, llmconv) {diff}"
    return ours


@pytest.mark.parametrize(
    "shape",
    [
        (1, 8, 8, True, None),
        (8, 8, 2, False, None),
        (16, 8, 1, True, None),
        (33, 8, 4, False, None),
        (80, 8, 1, False, None),
        (12, 8, 4, False, {(0, "ffn_down"): 288, (5, "attn_q"): 96, (6, "ffn_up"): 200}),
    ],
    ids=["L1-tied", "L8-gqa4", "L16-gqa8-tied", "L33-gqa2", "L80-70B", "L12-oddrows"],
)
def test_mix_types_equal_llama_quantize(tmp_path, shape):
    """Every tensor's type, for every IQ3 mix, with an imatrix and (where llama-quantize makes
    the mix without one) without: layer bands, GQA, the 70B attn_v bump, tied embeddings, the
    iq4_nl / q8_0 / f16 fallbacks of rows that do not split into 256."""
    from mix_util import synthetic_imatrix
    from mix_util import write_tensor_only_llama

    src_path = write_tensor_only_llama(tmp_path / "m.gguf", *shape)
    im = synthetic_imatrix(src_path, seed=1)
    for mix in MIXES:
        _types_match(tmp_path, src_path, mix, im)
        if mix not in NEED_IMATRIX:
            _types_match(tmp_path, src_path, mix)


def test_iq3_xxs_rules_without_an_imatrix(tmp_path):
    """llama-quantize's IQ3_XXS has rules for files made without an imatrix (attn_v iq3_s,
    ffn_down q4_K/q3_K); they only run when no tensor needs one: here on a model without
    attn_q/attn_k/ffn_gate/ffn_up (which IQ3_XXS puts in iq2_s/iq3_xxs)."""
    from mix_util import write_tensor_only_llama

    for shape in [(16, 8, 2, False), (16, 8, 8, True)]:
        src_path = write_tensor_only_llama(tmp_path / "m.gguf", *shape, kinds=("attn_v", "attn_output", "ffn_down"))
        ours = _types_match(tmp_path, src_path, "iq3_xxs")
        assert ours["blk.0.ffn_down.weight"] == "Q4_K" and ours["blk.2.ffn_down.weight"] == "Q3_K"
        assert ours["blk.0.attn_v.weight"] == ("IQ3_S" if shape[2] == 8 else "Q4_K")  # GQA 1 or 4


@pytest.mark.parametrize("shape", [(32, 8), (12, 4)], ids=lambda s: f"L{s[0]}-x{s[1]}")
def test_moe_mix_types_equal_llama_quantize(tmp_path, shape):
    """Mixtral-like models: the 8-expert rules (attn_v/attn_k q8_0, attn_output q5_K, iq3_m's
    ffn_down bands) and the stacked experts' gate/up/down kinds."""
    from mix_util import write_tensor_only_moe

    src_path = write_tensor_only_moe(tmp_path / "m.gguf", *shape)
    for mix in ("iq3_s", "iq3_m"):
        _types_match(tmp_path, src_path, mix)


@pytest.mark.parametrize("mix", MIXES)
def test_mix_files_equal_llama_quantize(tmp_path, mix):
    """Types and bytes of every tensor (imatrix-weighted where llama.cpp weights them)."""
    import llmconv
    from llmconv.imatrix import write_imatrix_gguf
    from mix_util import llama_quantize_with_imatrix, synthetic_imatrix
    from mix_util import assert_same_file, write_tensor_only_llama

    src = write_tensor_only_llama(tmp_path / "m.gguf", 8, 8, 2, False, {(1, "ffn_down"): 512, (3, "attn_q"): 288})
    im = synthetic_imatrix(src, seed=4)
    write_imatrix_gguf(tmp_path / "im.gguf", im)
    theirs = llama_quantize_with_imatrix(src, tmp_path / "theirs.gguf", mix, im)
    ours = tmp_path / "ours.gguf"
    llmconv.quantize(src, ours, outtype=mix, imatrix=tmp_path / "im.gguf")
    assert_same_file(theirs, ours)


def test_mixes_without_an_imatrix_are_refused_as_in_llama_quantize(tmp_path, capsys):
    from llmconv.cli import main
    from mix_util import llama_quantize, write_tensor_only_llama

    src = write_tensor_only_llama(tmp_path / "m.gguf", 2, 8, 8, False)
    for mix in sorted(NEED_IMATRIX):
        with pytest.raises(AssertionError, match="returned"):
            llama_quantize(src, tmp_path / "theirs.gguf", mix)
        assert main(["quantize", str(src), str(tmp_path / "ours.gguf"), "--type", mix, "-q"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "importance matrix" in err[0], err


def test_dry_run_with_imatrix_text_plans_the_mix(capsys):
    """--dry-run --imatrix-text computes no imatrix: the plan must not call it missing."""
    from llmconv.cli import main
    from mix_util import FIXTURE

    assert main(["convert", str(FIXTURE), "--outtype", "iq3_xxs", "--dry-run", "--imatrix-text", "builtin"]) == 0
    plan = capsys.readouterr()
    rows = [line.split() for line in (plan.out + plan.err).splitlines()]
    assert any(r and r[0] == "blk.0.attn_q.weight" and "iq2_s" in r for r in rows)
