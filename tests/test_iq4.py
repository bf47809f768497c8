"""IQ4_NL and IQ4_XS against llama.cpp: kernels (ggml_quantize_chunk, with and without an
imatrix), dequantizers (gguf-py), and whole files with the iq4_nl/iq4_xs mixes
(llama_model_quantize), including the IQ4_NL fallback for rows that do not split into 256."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

import llmconv.quantize as Q
import llmconv
from llmconv.convert.gguf_source import open_gguf_source
from llmconv.convert.pipeline import gguf_model_shape
from llmconv.convert.plan import TypePolicy, make_plan
from llmconv.imatrix import write_imatrix_gguf
from llmconv.quantize.iq4 import KVALUES, best_index
from llmconv.testing.llama_gguf_util import ggml_quantize_chunk
from mix_util import (
    assert_same_file,
    llama_quantize,
    llama_quantize_with_imatrix,
    read,
    synthetic_imatrix,
    write_tensor_only_llama,
)
from kernel_data import datasets, importance_vectors, to_bf16_grid

IQ4 = ["iq4_nl", "iq4_xs"]
pytestmark = pytest.mark.llamacpp


@pytest.mark.parametrize("t", IQ4)
def test_kernel_bytes_equal_llama_cpp(t):
    qt = Q.get(t)
    for name, x in datasets().items():
        ims = {"none": None, **importance_vectors(x.shape[1])}
        for iname, qw in ims.items():
            qw = None if qw is None else qw.astype(np.float32)
            ours = Q.quantize_tensor(x, qt, imatrix=qw) if qw is not None else Q.quantize_tensor(x, qt)
            ref = ggml_quantize_chunk(qt.ggml_type, x, qw)
            assert np.array_equal(ours, ref), f"{t} {name} {iname}"


def test_iq4_nl_short_rows_and_chunks(monkeypatch):
    monkeypatch.setattr("llmconv.quantize.iq4.CHUNK_WEIGHTS", 32 * 7)  # chunks start mid-row
    rng = np.random.default_rng(9)
    x = to_bf16_grid(rng.standard_normal((13, 96)) * 0.1)
    qw = importance_vectors(96)["realistic"].astype(np.float32)
    for w in (None, qw):
        ours = Q.quantize_tensor(x, "iq4_nl", imatrix=w, threads=2)
        assert np.array_equal(ours, ggml_quantize_chunk(Q.get("iq4_nl").ggml_type, x, w))


def test_best_index_is_ggml_nearest_with_ties_up():
    a = np.array([-300, -127, -115.5, -115.49, 0, -4.5, 7.0, 6.99, 101, 112.9, 113, 500, np.nan], np.float32)
    got = best_index(a)
    vals = KVALUES.astype(np.float32)
    for v, g in zip(a, got):
        if np.isnan(v):
            assert g == 15
            continue
        d = np.abs(vals - v)
        best = np.flatnonzero(d == d.min())
        assert g == best.max(), (v, g)  # nearest; the upper one on a tie


@pytest.mark.parametrize("t", IQ4)
def test_dequantize_equals_gguf_py(t):
    qt = Q.get(t)
    x = datasets()["bf16"]
    raw = ggml_quantize_chunk(qt.ggml_type, x, None)
    ours = Q.dequantize_tensor(raw, qt)
    ref = gguf.quants.dequantize(raw, qt.ggml_type).astype(np.float32)
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))
    assert np.abs(ours - x).max() < 0.2 * np.abs(x).max()


@pytest.mark.parametrize("model,mix", [("gqa2-ffn800", "iq4_xs"), ("fixture", "iq4_nl"), ("dim288", "iq4_xs")])
def test_mix_files_equal_llama_quantize(f32_mix_models, tmp_path, model, mix):  # noqa: F811
    """Types and bytes of every tensor, without and with an imatrix (which changes the rules:
    the first eighth of ffn_down gets q5_K only without one)."""
    src = f32_mix_models[model]
    theirs = llama_quantize(src, tmp_path / "theirs.gguf", mix)
    ours = tmp_path / "ours.gguf"
    llmconv.quantize(src, ours, outtype=mix)
    assert_same_file(theirs, ours)
    if model != "gqa2-ffn800":
        return
    im = synthetic_imatrix(src, seed=5)
    write_imatrix_gguf(tmp_path / "im.gguf", im)
    theirs_w = llama_quantize_with_imatrix(src, tmp_path / "theirs_w.gguf", mix, im)
    ours_w = tmp_path / "ours_w.gguf"
    llmconv.quantize(src, ours_w, outtype=mix, imatrix=tmp_path / "im.gguf")
    assert_same_file(theirs_w, ours_w)
    assert read(ours)[1]["blk.0.ffn_down.weight"][0] == "Q5_1"  # q5_K rule, row 800 -> q5_1
    assert read(ours_w)[1]["blk.0.ffn_down.weight"][0] == "IQ4_NL"  # with an imatrix: no rule
    assert read(ours)[1]["blk.5.ffn_down.weight"][0] == "IQ4_NL"  # fallback from iq4_xs


@pytest.mark.parametrize(
    "shape",
    [
        (8, 4, 4, False, None),
        (16, 8, 2, True, None),
        (32, 32, 8, False, None),
        (12, 8, 4, False, {(0, "ffn_down"): 200, (1, "ffn_down"): 96, (5, "attn_v"): 288}),
    ],
)
def test_iq4_rule_table_matches_llama_quantize_types(tmp_path, shape):
    src_path = write_tensor_only_llama(tmp_path / "m.gguf", *shape)
    src = open_gguf_source(src_path)
    model = gguf_model_shape(src)
    for mix in IQ4:
        _, theirs = read(llama_quantize(src_path, tmp_path / f"{mix}.gguf", mix))
        plan = make_plan(src.tensors, TypePolicy(mix, tied_embeddings=src.tied_embeddings, model=model))
        ours = {t.name: t.qtype.ggml_type.name for t in plan.tensors}
        assert ours == {n: v[0] for n, v in theirs.items()}, mix


def test_convert_iq4_xs_verifies(tmp_path):
    """An iq4_xs file of the trained fixture passes verify (candidate dequantizes IQ4 blocks)."""
    from mix_util import FIXTURE

    out = tmp_path / "iq4.gguf"
    llmconv.convert(FIXTURE, out, outtype="iq4_xs")
    assert llmconv.verify(out, FIXTURE, tokens=64, max_kld=0.05).passed
