"""Issue 16: Llama 4 (text), Hugging Face Llama4ForConditionalGeneration -> llama.cpp's llama4
architecture. Truth from outside: llama.cpp loads every output type, tokenizes as Meta's own Llama 4
tokenizer does, and its f32 logits equal an independent float64 forward pass written from
transformers' Llama 4 text model (tests/llama4_synth.py); llama.cpp's quantizer gives the types
and bytes of the quantized files; llama.cpp's check-text hash of Llama 4 Scout's tokenizer.json
vouches for the rebuilt tokenizer.json."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch

from llama4_synth import (
    SMALL_VOCAB,
    small_vocab_tokenizer,
    llama4_logits,
    llama4_state_dict,
    llama4_tokenizer_model,
    load_state_dict,
    meta_llama4_tokenizer,
    text_config,
    write_hf_llama4,
)
import llmconv
from llmconv.cli import main
from llmconv.formats.gguf_reader import read_gguf
from realtok import MULTILINGUAL
from mix_util import assert_same_file, llama_quantize

OUTTYPES = ["f32", "f16", "q8_0", "q4_0", "q4_K_M"]
TEXT = "Llama 4 sends each token to one of its experts, and a shared one. Ünïcödé, 東京 and I'm sure: 12345."
BOUND_KEY = {"q4_K_M": "q4_k"}

pytestmark = pytest.mark.skipif(
    llama4_tokenizer_model() is None,
    reason="llama-models is not installed (pip install --no-deps llama-models==0.3.0): "
    "it ships Meta's Llama 4 tokenizer.model",
)


@pytest.fixture(scope="module")
def llama4(tmp_path_factory):
    """A 4-layer Llama 4 (dense layers 0 and 2, MoE layers 1 and 3 with 4 experts, top-1, and a
    shared expert; layer 3 without RoPE), in 2 shards, with Llama 4's 202,048-token vocabulary and
    a vision-tower stub; converted to every type in one pass."""
    root = tmp_path_factory.mktemp("llama4")
    ckpt = write_hf_llama4(root / "Tiny-Llama-4", seed=1)
    out = root / "out"
    out.mkdir()
    llmconv.convert(ckpt, f"{out}/", outtype=",".join(OUTTYPES))
    files = {t: next(out.glob(f"*-{t.upper()}.gguf")) for t in OUTTYPES}
    return ckpt, files


def test_layout_and_metadata(llama4):
    """What llama.cpp's converter (Llama4Model) writes: llama4 keys, the fused experts split and
    transposed per expert, the shared expert, dense layers at intermediate_size_mlp, Q/K as stored
    (no un-permute), the router f32, the vision tower left out."""
    ckpt, files = llama4
    sd = load_state_dict(ckpt)
    f = read_gguf(files["f32"])
    kv = f.kvs
    assert kv["general.architecture"] == "llama4" and kv["tokenizer.ggml.pre"] == "llama4"
    assert kv["llama4.expert_count"] == 4 and kv["llama4.expert_used_count"] == 1
    assert kv["llama4.interleave_moe_layer_step"] == 2 and kv["llama4.expert_feed_forward_length"] == 256
    assert kv["llama4.feed_forward_length"] == 512 and kv["llama4.attention.key_length"] == 16
    assert kv["llama4.rope.dimension_count"] == 16 and kv["llama4.vocab_size"] == 202048
    names = {t.name for t in f.tensors}
    assert not any("vision" in n or "mm" in n for n in names)

    def data(name):
        t = f.tensor(name)
        return t.data.view(np.float32).reshape(t.shape)

    p = "language_model.model.layers."
    np.testing.assert_array_equal(data("blk.1.attn_q.weight"), sd[p + "1.self_attn.q_proj.weight"].float().numpy())
    np.testing.assert_array_equal(data("blk.3.attn_k.weight"), sd[p + "3.self_attn.k_proj.weight"].float().numpy())
    for i in (0, 2):
        assert f.tensor(f"blk.{i}.ffn_gate.weight").shape == (512, 64)
        assert not {f"blk.{i}.ffn_gate_inp.weight", f"blk.{i}.ffn_up_shexp.weight"} & names
    for i in (1, 3):
        assert not {f"blk.{i}.ffn_gate.weight", f"blk.{i}.ffn_down.weight"} & names
        gate_up = sd[f"{p}{i}.feed_forward.experts.gate_up_proj"].float()
        down = sd[f"{p}{i}.feed_forward.experts.down_proj"].float()
        np.testing.assert_array_equal(
            data(f"blk.{i}.ffn_gate_exps.weight"), gate_up[:, :, :256].transpose(1, 2).numpy()
        )
        np.testing.assert_array_equal(data(f"blk.{i}.ffn_up_exps.weight"), gate_up[:, :, 256:].transpose(1, 2).numpy())
        np.testing.assert_array_equal(data(f"blk.{i}.ffn_down_exps.weight"), down.transpose(1, 2).numpy())
        np.testing.assert_array_equal(
            data(f"blk.{i}.ffn_down_shexp.weight"),
            sd[f"{p}{i}.feed_forward.shared_expert.down_proj.weight"].float().numpy(),
        )
        np.testing.assert_array_equal(
            data(f"blk.{i}.ffn_gate_inp.weight"), sd[f"{p}{i}.feed_forward.router.weight"].float().numpy()
        )
    for t in OUTTYPES[1:]:
        assert read_gguf(files[t]).tensor("blk.1.ffn_gate_inp.weight").ggml_type == gguf.GGMLQuantizationType.F32


def test_tokenizer_is_llama4s(llama4):
    """The rebuilt tokenizer.json tokenizes llama.cpp's check text as Llama 4 Scout's official one
    (llama.cpp's `llama4` hash), and llama.cpp tokenizes multilingual text as Meta's tokenizer."""
    import llama_cpp

    from llmconv.convert.pretok import CHECK_HASHES, check_hash

    ckpt, files = llama4
    assert CHECK_HASHES.get(check_hash(ckpt / "tokenizer.json")) == "llama4"
    meta = meta_llama4_tokenizer()
    llm = llama_cpp.Llama(str(files["q8_0"]), vocab_only=True, verbose=False)
    ids = lambda text: llm.tokenize(text.encode(), add_bos=False, special=False)  # noqa: E731
    # llama.cpp's llama4 (GPT-4o) regex leaves combining marks (\p{M}) out of its letter classes,
    # which Llama 4's include: it splits Devanagari vowel signs apart. A llama.cpp limitation, shown
    # here and left out of the comparison.
    hindi = "नमस्ते दुनिया."
    assert ids(hindi) != meta.encode(hindi, bos=False, eos=False)
    text = MULTILINGUAL.replace(hindi, "")
    for line in text.split("\n") + [text]:
        assert ids(line) == meta.encode(line, bos=False, eos=False), line
    kv = read_gguf(files["q8_0"]).kvs
    assert kv["tokenizer.ggml.bos_token_id"] == meta.bos_id and kv["tokenizer.ggml.eot_token_id"] == meta.eot_id
    assert kv["tokenizer.ggml.eom_token_id"] == meta.eom_id and kv["tokenizer.ggml.padding_token_id"] == meta.pad_id


@pytest.fixture(scope="module")
def reference(llama4):
    """(tokens of TEXT by Meta's tokenizer, float64 reference logits, router margin)."""
    ckpt, _ = llama4
    tokens = meta_llama4_tokenizer().encode(TEXT, bos=True, eos=False)
    cfg = json.loads((ckpt / "config.json").read_text())["text_config"]
    ref, margin = llama4_logits(load_state_dict(ckpt), cfg, tokens)
    return tokens, ref.numpy(), margin


@pytest.mark.llamacpp
@pytest.mark.parametrize("outtype", OUTTYPES)
def test_llama_cpp_logits_follow_the_reference(llama4, reference, outtype):
    """f32: within 1e-5 of the float64 reference (relative to the largest logit), with an f32 KV
    cache. Quantized: the median token within verify's bound for the type."""
    import llama_cpp

    from llmconv.verify.run import LOGIT_BOUNDS

    _, files = llama4
    tokens, ref, margin = reference
    llm = llama_cpp.Llama(
        str(files[outtype]), n_ctx=128, logits_all=True, type_k=0, type_v=0, n_threads=1, verbose=False
    )
    assert llm.tokenize(TEXT.encode(), add_bos=True) == tokens
    llm.eval(tokens)
    got = np.array(llm.scores[: len(tokens)], dtype=np.float64)
    assert margin > 1e-3, "router choice too close to call: pick another seed"
    per_token = np.abs(got - ref).max(axis=1) / float(np.abs(ref).max())
    if outtype == "f32":
        assert per_token.max() <= 1e-5, per_token.max()
    else:
        assert np.median(per_token) <= LOGIT_BOUNDS[BOUND_KEY.get(outtype, outtype)].max_rel_dlogit, per_token


@pytest.mark.llamacpp
@pytest.mark.slow
def test_long_context_chunked_attention_and_temperature(llama4):
    """Past position 8191 the RoPE layers attend only within their 8192-token chunk and the
    no-RoPE layer scales its queries (temperature tuning): llama.cpp's logits at positions
    8189..8194 follow the reference, and a reference without either feature does not."""
    import llama_cpp

    ckpt, files = llama4
    T, K = 8195, 6
    g = torch.Generator().manual_seed(5)
    tokens = [200000] + torch.randint(0, 200000, (T - 1,), generator=g).tolist()
    llm = llama_cpp.Llama(str(files["f32"]), n_ctx=8448, n_batch=512, type_k=0, type_v=0, verbose=False)
    llm.eval(tokens[: T - K])
    rows = []
    for tok in tokens[T - K :]:  # one token per batch: llama.cpp keeps that token's logits
        llm.eval([tok])
        rows.append(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy())
    got = np.array(rows, dtype=np.float64)
    cfg = json.loads((ckpt / "config.json").read_text())["text_config"]
    sd = load_state_dict(ckpt)
    ref, _ = llama4_logits(sd, cfg, tokens, last=K, dtype=torch.float32)
    scale = float(ref.abs().max())
    err = np.abs(got - ref.double().numpy()).max(axis=1) / scale
    assert err.max() <= 5e-5, err  # a float32 reference over 8195 positions
    # temperature tuning acts from position 8191 (rows 2..), chunking from 8192 (rows 3..)
    no_temp, _ = llama4_logits(sd, dict(cfg, attn_scale=0.0), tokens, last=K, dtype=torch.float32)
    assert (np.abs(got - no_temp.double().numpy()).max(axis=1)[2:] / scale > 50 * err.max()).all()
    no_chunk, _ = llama4_logits(sd, cfg, tokens, last=K, dtype=torch.float32, chunk=None)
    assert (np.abs(got - no_chunk.double().numpy()).max(axis=1)[3:] / scale > 50 * err.max()).all()


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(checkpoint, directory of its conversions): the same layout with a 260-token byte vocabulary,
    so that llama.cpp's quantizer runs in a moment; converted in one pass to the QTYPES and f32."""
    root = tmp_path_factory.mktemp("llama4-small")
    ck = write_hf_llama4(root / "Small-Llama-4", seed=2, tokenizer=False, vocab_size=SMALL_VOCAB)
    small_vocab_tokenizer(ck)
    out = root / "out"
    out.mkdir()
    llmconv.convert(ck, f"{out}/", outtype=",".join(["f32", *QTYPES]))
    return ck, out


QTYPES = ["q8_0", "q4_0", "q4_K_M", "q2_K", "q6_K"]


@pytest.mark.llamacpp
@pytest.mark.parametrize("qtype", QTYPES)
def test_conversion_equals_llama_quantize(small, tmp_path, qtype):
    """The one-pass conversion's types and bytes equal llama.cpp's quantizer on the f32 file (router
    kept f32, the ffn_down / ffn_down_exps / ffn_down_shexp layer rules with the layer taken from the
    name, as llama-quantize does for a model with experts)."""
    _, out = small
    ours = next(out.glob(f"*-{qtype.upper()}.gguf"))
    f32 = next(out.glob("*-F32.gguf"))
    theirs = llama_quantize(f32, tmp_path / "theirs.gguf", qtype.lower())
    assert_same_file(theirs, ours)
    # and llmconv quantize on the f32 llama4 GGUF
    llmconv.quantize(f32, tmp_path / "requant.gguf", outtype=qtype)
    assert_same_file(theirs, tmp_path / "requant.gguf")


# ---- refusals and errors: one line naming the file and key/tensor, exit 2 -----------------------


@pytest.mark.parametrize(
    "key,value,says",
    [
        ("attention_chunk_size", 4096, "attention_chunk_size is 4096"),
        ("use_qk_norm", False, "use_qk_norm is False"),
        ("no_rope_layers", [1, 0, 1, 0], "no_rope_layers"),
        ("attn_temperature_tuning", False, "attn_temperature_tuning"),
        ("floor_scale", 4096, "floor_scale"),
        ("moe_layers", [0, 1, 2, 3], "moe_layers"),
    ],
)
def test_settings_llama_cpp_fixes_are_refused(tmp_path, capsys, key, value, says):
    ck = tmp_path / "ck"
    ck.mkdir()
    cfg = {"architectures": ["Llama4ForConditionalGeneration"], "text_config": text_config(**{key: value})}
    (ck / "config.json").write_text(json.dumps(cfg))
    assert main(["convert", str(ck), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err and "config.json" in err and "llama4" in err, err


def test_tensor_errors_name_the_tensor(tmp_path, capsys):
    cfg = text_config(vocab_size=SMALL_VOCAB)
    sd = llama4_state_dict(cfg, seed=3)
    p = "language_model.model.layers.3.feed_forward.experts."
    cases = [
        ("missing", lambda d: d.pop(p + "gate_up_proj"), p + "gate_up_proj"),
        (
            "shape",
            lambda d: d.__setitem__(p + "down_proj", torch.zeros(4, 64, 256, dtype=torch.bfloat16)),
            "implies (4, 256, 64)",
        ),
        (
            "unknown",
            lambda d: d.__setitem__(
                "language_model.model.layers.0.feed_forward.router.weight", torch.zeros(4, 64, dtype=torch.bfloat16)
            ),
            "layers.0.feed_forward.router.weight",
        ),
    ]
    for label, edit, says in cases:
        d = dict(sd)
        edit(d)
        ck = write_hf_llama4(tmp_path / label, sd=d, shards=1, tokenizer=False, vocab_size=SMALL_VOCAB)
        assert main(["convert", str(ck), "--dry-run"]) == 2, label
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and says in err, (label, err)


def test_experts_stream_one_slice_at_a_time(tmp_path):
    """Each stacked tensor comes from per-expert slice loaders of the fused HF tensor; its
    whole-tensor loader is never used by the writer, and the f32 bytes equal the stacked slices."""
    from llmconv.convert.execute import write_gguf
    from llmconv.convert.pipeline import plan_conversion

    cfg = text_config(vocab_size=SMALL_VOCAB)
    sd = llama4_state_dict(cfg, seed=4)
    ck = write_hf_llama4(tmp_path / "ck", sd=sd, tokenizer=False, vocab_size=SMALL_VOCAB)
    small_vocab_tokenizer(ck)
    conv = plan_conversion(ck, outtype="f32", outfile=tmp_path / "a.gguf")
    stacked = [t for t in conv.plan.tensors if t.src.parts is not None]
    assert len(stacked) == 6 and all(len(t.src.parts) == 4 for t in stacked)
    for t in stacked:
        t.src.load = _refuse
    write_gguf(tmp_path / "a.gguf", conv.kvs, conv.plan, progress=False)
    f = read_gguf(tmp_path / "a.gguf")
    t = f.tensor("blk.3.ffn_up_exps.weight")
    want = sd["language_model.model.layers.3.feed_forward.experts.gate_up_proj"].float()[:, :, 256:].transpose(1, 2)
    np.testing.assert_array_equal(t.data.view(np.float32).reshape(t.shape), want.numpy())


def _refuse():
    raise AssertionError("a stacked tensor was loaded whole")


def test_text_only_layout_converts_the_same(tmp_path):
    """Llama4ForCausalLM (settings at the top of config.json, `model.` names, no vision tower)
    gives the same tensors and keys as Llama4ForConditionalGeneration."""
    cfg = text_config(vocab_size=SMALL_VOCAB)
    sd = llama4_state_dict(cfg, seed=7)
    multi = write_hf_llama4(tmp_path / "multi", sd=sd, tokenizer=False, vocab_size=SMALL_VOCAB)
    text_sd = {k.removeprefix("language_model."): v for k, v in sd.items() if k.startswith("language_model.")}
    text = write_hf_llama4(tmp_path / "text", sd=text_sd, tokenizer=False, vocab_size=SMALL_VOCAB)
    (text / "config.json").write_text(json.dumps({**cfg, "architectures": ["Llama4ForCausalLM"]}))
    for ck in (multi, text):
        small_vocab_tokenizer(ck)
        llmconv.convert(ck, tmp_path / f"{ck.name}.gguf", outtype="q8_0")
    a, b = read_gguf(tmp_path / "multi.gguf"), read_gguf(tmp_path / "text.gguf")
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    assert all(bytes(a.tensor(t.name).data) == bytes(b.tensor(t.name).data) for t in a.tensors)
    assert {k: v for k, v in a.kvs.items() if not k.startswith("general.")} == {
        k: v for k, v in b.kvs.items() if not k.startswith("general.")
    }


@pytest.mark.llamacpp
def test_without_rope_scaling_and_with_top_2(tmp_path):
    """Maverick has no rope_scaling (no rope_freqs.weight); top-2 routing sums two sigmoid-scaled
    experts. llama.cpp's f32 logits follow the reference here too (byte vocabulary, 40 tokens)."""
    import llama_cpp

    cfg = text_config(vocab_size=SMALL_VOCAB, rope_scaling=None, num_experts_per_tok=2)
    sd = llama4_state_dict(cfg, seed=8)
    ck = write_hf_llama4(
        tmp_path / "ck", sd=sd, tokenizer=False, vocab_size=SMALL_VOCAB, rope_scaling=None, num_experts_per_tok=2
    )
    small_vocab_tokenizer(ck)
    out = tmp_path / "f32.gguf"
    llmconv.convert(ck, out, outtype="f32")
    f = read_gguf(out)
    assert "rope_freqs.weight" not in {t.name for t in f.tensors} and f.kvs["llama4.expert_used_count"] == 2
    tokens = list(range(30, 70))
    llm = llama_cpp.Llama(str(out), n_ctx=64, logits_all=True, type_k=0, type_v=0, n_threads=1, verbose=False)
    llm.eval(tokens)
    got = np.array(llm.scores[: len(tokens)], dtype=np.float64)
    ref, margin = llama4_logits(sd, cfg, tokens)
    assert margin > 1e-3, "router choice too close to call: pick another seed"
    assert (np.abs(got - ref.numpy()).max() / float(ref.abs().max())) <= 1e-5
