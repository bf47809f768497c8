"""Issue 16: Mixtral (MixtralForCausalLM, Hugging Face layout) -> llama.cpp's llama architecture
with experts. Truth from outside: llama.cpp loads every output type and its logits follow an
independent float64 forward pass written from Mixtral's definition (llmconv/testing/moe_synth.py);
llama.cpp's own quantizer gives the per-tensor types and bytes of every mix."""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import llmconv
from llmconv.cli import main
from llmconv.convert import moe
from llmconv.convert.execute import write_gguf
from llmconv.convert.gguf_source import open_gguf_source
from llmconv.convert.pipeline import gguf_model_shape, plan_conversion
from llmconv.convert.plan import TypePolicy, make_plan
from llmconv.formats.gguf_reader import read_gguf
from llmconv.testing.moe_synth import (
    FIXTURE_TOKENIZER,
    mistral_tokenizer,
    mixtral_logits,
    write_hf_mixtral,
    write_mistral_mixtral,
)
from mix_util import MIXES, assert_same_file, llama_quantize, read, write_tensor_only_moe

TEXT = "Mixtral routes each token to two of its eight experts. Ünïcödé and 東京 fall back to bytes."
OUTTYPES = ["f32", "f16", "q8_0", "q4_0", "q4_K_M"]
BOUND_KEY = {"q4_K_M": "q4_k"}  # verify's bounds go by the file's main block type


def state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    sd = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return sd


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    """A 2-layer, 8-expert, top-2 Mixtral in 3 shards (every layer's experts spread over all
    three), with Mixtral's own 32000-token tokenizer when mistral-common is installed (else the
    fixture's); converted to each output type in one pass from the checkpoint. Its width (128)
    keeps the 32000-row embedding cheap; K-quant blocks are covered by `small` below."""
    root = tmp_path_factory.mktemp("mixtral")
    ckpt = write_hf_mixtral(
        root / "Tiny-Mixtral", shards=3, tokenizer=mistral_tokenizer() or FIXTURE_TOKENIZER, dim=128, ffn=128, seed=1
    )
    files = {}
    for t in OUTTYPES:
        files[t] = root / f"m-{t}.gguf"
        llmconv.convert(ckpt, files[t], outtype=t)
    return ckpt, files


def test_layout_and_metadata(mixtral):
    """What llama.cpp's converter writes: routers f32, experts stacked [n_expert, rows, cols]
    in expert order, no dense feed-forward, expert counts, an 8xN size label."""
    ckpt, files = mixtral
    sd = state_dict(ckpt)
    f = read_gguf(files["f32"])
    assert f.kvs["llama.expert_count"] == 8 and f.kvs["llama.expert_used_count"] == 2
    assert f.kvs["llama.feed_forward_length"] == 128
    assert f.kvs["general.size_label"].startswith("8x")
    names = {t.name for t in f.tensors}
    for i in range(2):
        assert not {f"blk.{i}.ffn_{k}.weight" for k in ("gate", "down", "up")} & names
        router = f.tensor(f"blk.{i}.ffn_gate_inp.weight")
        assert router.ggml_type == gguf.GGMLQuantizationType.F32
        np.testing.assert_array_equal(
            router.data.view(np.float32).reshape(router.shape),
            sd[f"model.layers.{i}.block_sparse_moe.gate.weight"].float().numpy(),
        )
        for w, kind in (("w1", "ffn_gate_exps"), ("w2", "ffn_down_exps"), ("w3", "ffn_up_exps")):
            want = (
                torch.stack([sd[f"model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight"] for e in range(8)])
                .float()
                .numpy()
            )
            t = f.tensor(f"blk.{i}.{kind}.weight")
            assert t.shape == want.shape
            np.testing.assert_array_equal(t.data.view(np.float32).reshape(t.shape), want)
    # the router stays f32 in every type, as llama.cpp's converter and llama-quantize keep it
    for t in OUTTYPES[1:]:
        assert read_gguf(files[t]).tensor("blk.0.ffn_gate_inp.weight").ggml_type == gguf.GGMLQuantizationType.F32


@pytest.mark.llamacpp
@pytest.mark.parametrize("outtype", OUTTYPES)
def test_llama_cpp_logits_follow_the_reference(mixtral, outtype):
    """llama.cpp loads each file, tokenizes as SentencePiece does, and its logits equal the
    float64 reference: f32 to ~1e-5 relative. Quantized types: the median token within verify's
    bound for the type (a quantized router input can flip a close expert choice for a single
    token, which moves that token's logits far: that is the model, not the file)."""
    import llama_cpp
    import sentencepiece as spm

    from llmconv.verify.run import LOGIT_BOUNDS

    ckpt, files = mixtral
    sp = spm.SentencePieceProcessor(model_file=str(ckpt / "tokenizer.model"))
    tokens = [sp.bos_id()] + sp.encode(TEXT)
    llm = llama_cpp.Llama(
        str(files[outtype]), n_ctx=128, logits_all=True, type_k=0, type_v=0, n_threads=1, verbose=False
    )
    assert llm.tokenize(TEXT.encode(), add_bos=True) == tokens
    llm.eval(tokens)
    got = np.array(llm.scores[: len(tokens)], dtype=np.float64)
    ref, margin = mixtral_logits(state_dict(ckpt), json.loads((ckpt / "config.json").read_text()), tokens)
    assert margin > 1e-4, "router top-k too close to call: pick another seed"
    per_token = np.abs(got - ref.numpy()).max(axis=1) / float(ref.abs().max())
    if outtype == "f32":
        assert per_token.max() <= 1e-5, per_token.max()
    else:
        bound = LOGIT_BOUNDS[BOUND_KEY.get(outtype, outtype)].max_rel_dlogit
        assert np.median(per_token) <= bound, (outtype, per_token)


@pytest.mark.llamacpp
def test_convert_q4_k_m_equals_llama_quantize(small, tmp_path):
    """The one-pass conversion (experts stacked while streaming) gives the bytes llama.cpp's
    quantizer makes from the f32 conversion: the 8-expert rules included."""
    ckpt, f32 = small[8]
    theirs = llama_quantize(f32, tmp_path / "theirs.gguf", "q4_k_m")
    ours = tmp_path / "ours.gguf"
    llmconv.convert(ckpt, ours, outtype="q4_K_M")
    assert_same_file(theirs, ours)
    types = {n: t for n, (t, _) in read(theirs)[1].items()}
    assert types["blk.0.attn_v.weight"] == types["blk.0.attn_k.weight"] == "Q8_0"  # 8 experts
    assert types["blk.0.attn_output.weight"] == "Q5_K"


# ---- every mix and legacy type against llama-quantize, on small-vocabulary models --------------


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """n_expert -> (checkpoint, its f32 conversion): 8- and 4-expert Mixtrals of width 256
    (every K-quant block fits) with the fixture's 512-token vocabulary."""
    root = tmp_path_factory.mktemp("mixtral-small")
    out = {}
    for n_expert in (8, 4):
        ckpt = write_hf_mixtral(root / f"e{n_expert}", tokenizer=FIXTURE_TOKENIZER, n_expert=n_expert, seed=n_expert)
        out[n_expert] = (ckpt, root / f"e{n_expert}.gguf")
        llmconv.convert(ckpt, out[n_expert][1], outtype="f32")
    return out


@pytest.mark.llamacpp
@pytest.mark.parametrize("qtype", ["q2_k", "q3_k_m", "q4_k_m", "q6_k", "q4_0", "q8_0"])
def test_quantize_matches_llama_quantize_8_experts(small, tmp_path, qtype):
    """Types and bytes of 3-D tensors, row by row as llama.cpp quantizes them. (Every mix's and
    legacy type's choices are swept over more model shapes below, types only.)"""
    theirs = llama_quantize(small[8][1], tmp_path / "theirs.gguf", qtype)
    ours = tmp_path / "ours.gguf"
    llmconv.quantize(small[8][1], ours, outtype=qtype)
    assert_same_file(theirs, ours)


@pytest.mark.llamacpp
@pytest.mark.parametrize("qtype", ["q2_k", "q4_k_m"])
def test_quantize_matches_llama_quantize_4_experts(small, tmp_path, qtype):
    """Without the 8-expert rules: attn_v/attn_k follow the dense rules, attn_output too."""
    theirs = llama_quantize(small[4][1], tmp_path / "theirs.gguf", qtype)
    ours = tmp_path / "ours.gguf"
    llmconv.quantize(small[4][1], ours, outtype=qtype)
    assert_same_file(theirs, ours)


@pytest.mark.llamacpp
@pytest.mark.parametrize("shape", [(32, 8), (56, 8), (12, 4), (9, 16)], ids=lambda s: f"L{s[0]}-x{s[1]}")
def test_moe_rule_table_matches_llama_quantize_types(tmp_path, shape):
    """Mixtral 8x7B's and 8x22B's layer counts, and other expert counts: types only."""
    src_path = write_tensor_only_moe(tmp_path / "m.gguf", *shape)
    src = open_gguf_source(src_path)
    model = gguf_model_shape(src)
    assert model.n_expert == shape[1]
    for qtype in MIXES + ["q4_0", "q5_1", "q8_0"]:  # the legacy types share one rule set
        _, theirs = read(llama_quantize(src_path, tmp_path / f"{qtype}.gguf", qtype))
        plan = make_plan(src.tensors, TypePolicy(qtype, model=model))
        ours = {t.name: t.qtype.ggml_type.name for t in plan.tensors}
        diff = {n: (theirs[n][0], ours[n]) for n in theirs if theirs[n][0] != ours[n]}
        assert not diff, f"{qtype}: (llama.cpp, llmconv) {diff}"


# ---- streaming and errors ---------------------------------------------------------------------


def test_experts_are_converted_one_at_a_time(tmp_path):
    """The writer never asks a stacked tensor for all its experts at once: its whole-tensor
    loader is disabled here, and at most two expert slices are alive (one read ahead)."""
    ckpt = write_hf_mixtral(tmp_path / "ck", tokenizer=FIXTURE_TOKENIZER, n_expert=4, shards=2, dim=64, ffn=64)
    conv = plan_conversion(ckpt, outtype="q8_0", outfile=tmp_path / "a.gguf")
    live: list = []  # weak references to every expert slice handed out
    peak = [0]

    def counted(load):
        def run():
            arr = load()
            live.append(weakref.ref(arr))
            peak[0] = max(peak[0], sum(r() is not None for r in live))
            return arr

        return run

    stacked = [t for t in conv.plan.tensors if t.src.parts is not None]
    assert len(stacked) == 6 and all(len(t.src.files) == 2 for t in stacked)  # each from both shards
    for t in stacked:
        t.src.load = _refuse
        t.src.parts = [counted(p) for p in t.src.parts]
    write_gguf(tmp_path / "a.gguf", conv.kvs, conv.plan, progress=False)
    assert len(live) == 6 * 4 and 1 <= peak[0] <= 2
    # the same bytes as the whole-tensor path (quantize from the f32 file stacks nothing itself)
    conv_f32 = tmp_path / "f32.gguf"
    llmconv.convert(ckpt, conv_f32, outtype="f32")
    llmconv.quantize(conv_f32, tmp_path / "b.gguf", outtype="q8_0")
    assert read(tmp_path / "a.gguf")[1] == read(tmp_path / "b.gguf")[1]


def _refuse():
    raise AssertionError("a stacked tensor was loaded whole")


def test_errors_name_the_file_and_tensor(tmp_path, capsys):
    ck = write_hf_mixtral(tmp_path / "ck", tokenizer=FIXTURE_TOKENIZER, n_expert=4, dim=64, ffn=64, n_heads=4)
    sd = state_dict(ck)
    cases = [
        (
            "missing expert",
            lambda d: d.pop("model.layers.1.block_sparse_moe.experts.3.w2.weight"),
            {},
            "model.layers.1.block_sparse_moe.experts.3.w2.weight",
        ),
        (
            "expert shape",
            lambda d: d.__setitem__(
                "model.layers.0.block_sparse_moe.experts.2.w1.weight", torch.zeros(32, 64, dtype=torch.bfloat16)
            ),
            {},
            "experts.2.w1.weight",
        ),
        (
            "extra expert",
            lambda d: d.__setitem__(
                "model.layers.0.block_sparse_moe.experts.4.w1.weight", torch.zeros(64, 64, dtype=torch.bfloat16)
            ),
            {},
            "says 4 experts",
        ),
        (
            "router",
            lambda d: d.pop("model.layers.0.block_sparse_moe.gate.weight"),
            {},
            "model.layers.0.block_sparse_moe.gate.weight",
        ),
        ("top-k", lambda d: None, {"num_experts_per_tok": 5}, "num_experts_per_tok 5 > num_local_experts 4"),
    ]
    for label, change, cfg, needle in cases:
        d = dict(sd)
        change(d)
        bad = write_hf_mixtral(
            tmp_path / label.replace(" ", "-"),
            tokenizer=FIXTURE_TOKENIZER,
            n_expert=4,
            dim=64,
            ffn=64,
            sd=d,
            config=cfg,
        )
        capsys.readouterr()
        assert main(["convert", str(bad), "--outtype", "f16", "-o", str(tmp_path / "x.gguf"), "-q"]) == 2, label
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err and "Traceback" not in err, (label, err)
        assert not (tmp_path / "x.gguf").exists()
    assert main(["convert", str(ck), "--format", "ggml", "--outtype", "f16", "-o", str(tmp_path / "x.bin"), "-q"]) == 2
    assert "mixture of experts" in capsys.readouterr().err


def test_expert_params_label():
    """llama.cpp's size label counts one expert: 8 experts of 1,000 parameters each over 2
    tensors plus 500 shared -> shared 500, per expert 2,000."""
    from types import SimpleNamespace as NS

    ts = [
        NS(name="blk.0.ffn_up_exps.weight", shape=(8, 10, 100)),
        NS(name="blk.0.ffn_down_exps.weight", shape=(8, 100, 10)),
        NS(name="token_embd.weight", shape=(5, 100)),
    ]
    assert moe.expert_params(ts) == (500, 2000, 8)
    assert moe.expert_params(ts[2:]) is None


def test_mistral_consolidated_mixtral_equals_hf(tmp_path):
    """Mistral's own Mixtral layout (params.json with a `moe` section, consolidated.safetensors,
    Meta names `layers.N.feed_forward.gate` / `feed_forward.experts.E.wK`, Q/K in Meta's row
    order) converts to the same tensors as its Hugging Face twin."""
    hf = write_hf_mixtral(
        tmp_path / "hf", tokenizer=FIXTURE_TOKENIZER, n_expert=4, dim=64, ffn=64, n_heads=4, n_kv_heads=2, seed=5
    )
    mistral = write_mistral_mixtral(hf, tmp_path / "mistral")
    out = {}
    for kind, ckpt in (("hf", hf), ("mistral", mistral)):
        out[kind] = tmp_path / f"{kind}.gguf"
        llmconv.convert(ckpt, out[kind], outtype="f32")
    a, b = read_gguf(out["hf"]), read_gguf(out["mistral"])
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for ta, tb in zip(a.tensors, b.tensors):
        assert ta.shape == tb.shape and np.array_equal(ta.data, tb.data), ta.name
    assert b.kvs["llama.expert_count"] == 4 and b.kvs["llama.expert_used_count"] == 2
