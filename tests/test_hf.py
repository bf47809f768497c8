"""Issue 6 (Hugging Face half): HF checkpoints convert to the same GGUF as their Meta twins,
shards and indexes are checked, tied embeddings, config.json rules, HF SentencePiece tokenizers,
and llama.cpp runs the result like the reference forward pass runs the Meta original."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
from gguf import GGUFReader, Keys

import llmconv
from llmconv.convert.sources import open_source
from llmconv.errors import LlmconvError
from synth import meta_state_dict, write_meta_checkpoint

ROOT = Path(__file__).resolve().parents[1]
META = ROOT / "fixtures" / "tiny-llama"
HF = ROOT / "fixtures" / "hf-tiny-llama"


def _load_generator():
    spec = importlib.util.spec_from_file_location("make_hf_fixtures", ROOT / "fixtures" / "make_hf_fixtures.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["make_hf_fixtures"] = mod
    spec.loader.exec_module(mod)
    return mod


mk = _load_generator()

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "  Two leading spaces, and trailing ones.  ",
    "Numbers: 3.14159, 2024-11-24, and 1,000,000!",
    "Ünïcödé, naïve café, 東京, and an emoji 🙂 fall back to bytes.",
    "def f(x):\n    return x * 2  # code\n\tTabbed line",
]


def convert(src: Path, out: Path, outtype: str = "f32", **kw) -> Path:
    llmconv.convert(src, out, outtype=outtype, **kw)
    return out


def tensors(path: Path) -> list[tuple[str, int, bytes]]:
    """(name, ggml type, data bytes) of every tensor, in file order."""
    return [(t.name, int(t.tensor_type), np.array(t.data).tobytes()) for t in GGUFReader(str(path)).tensors]


def fields(path: Path, skip=(Keys.General.NAME,)) -> dict:
    r = GGUFReader(str(path))
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.") and k not in skip}


def params_for(n_heads, n_kv, vocab=512, **extra):
    return {"n_heads": n_heads, "n_kv_heads": n_kv, "vocab_size": vocab, **extra}


def twins(tmp: Path, *, n_heads=4, n_kv=2, dim=64, ffn=96, vocab=512, seed=0, tied=False, **hf_kw):
    """The same random weights as a Meta checkpoint and as an HF one; returns (meta_dir, hf_dir, sd)."""
    sd = meta_state_dict(dim=dim, n_layers=2, n_heads=n_heads, n_kv_heads=n_kv, ffn=ffn, vocab=vocab, seed=seed)
    if tied:
        del sd["output.weight"]
    meta = write_meta_checkpoint(tmp / "meta", sd, params=params_for(n_heads, n_kv, vocab))
    params = json.loads((meta / "params.json").read_text())
    hf_kw.setdefault("config", {"max_position_embeddings": 4096})  # the Meta twin's LLaMA-2 context
    hf = mk.write_hf_checkpoint(tmp / "hf", sd, params, tied=tied, **hf_kw)
    return meta, hf, sd


# ---- same weights, two layouts ----------------------------------------------------------------


@pytest.mark.parametrize("n_heads,n_kv,dim", [(32, 4, 256), (9, 3, 72)])
def test_hf_twin_converts_to_identical_gguf(tmp_path, n_heads, n_kv, dim):
    meta, hf, sd = twins(tmp_path, n_heads=n_heads, n_kv=n_kv, dim=dim, seed=n_heads)
    from safetensors.torch import load_file

    raw = load_file(hf / "model.safetensors")
    # the HF file really is in the other row order (otherwise this test could not fail)
    assert not torch.equal(raw["model.layers.0.self_attn.q_proj.weight"], sd["layers.0.attention.wq.weight"])
    assert not torch.equal(raw["model.layers.0.self_attn.k_proj.weight"], sd["layers.0.attention.wk.weight"])
    a = convert(meta, tmp_path / "meta.gguf")
    b = convert(hf, tmp_path / "hf.gguf")
    assert tensors(a) == tensors(b)
    assert fields(a) == fields(b)


def test_committed_fixture_is_the_meta_fixture(tmp_path):
    a = convert(META, tmp_path / "meta.gguf", "auto")
    b = convert(HF, tmp_path / "hf.gguf", "auto")
    assert tensors(a) == tensors(b)
    assert fields(a) == fields(b)


def test_biases_are_reordered_like_their_weights(tmp_path):
    """q/k/v/o biases (config attention_bias): Q and K biases go back to Meta's row order with
    n_head and n_head_kv heads, exactly as their weights do; V and O biases are untouched."""
    sd = meta_state_dict(dim=72, n_layers=1, n_heads=9, n_kv_heads=3, ffn=96, seed=5)
    g = torch.Generator().manual_seed(7)
    for w in ("wq", "wk", "wv", "wo"):
        rows = sd[f"layers.0.attention.{w}.weight"].shape[0]
        sd[f"layers.0.attention.{w}.bias"] = torch.randn(rows, generator=g).to(torch.bfloat16)
    params = {"dim": 72, "n_layers": 1, "n_heads": 9, "n_kv_heads": 3, "vocab_size": 512, "norm_eps": 1e-5}
    hf = mk.write_hf_checkpoint(tmp_path / "hf", sd, params, config={"attention_bias": True})
    got = {name: data for name, _, data in tensors(convert(hf, tmp_path / "hf.gguf"))}
    for meta_name, gguf_name in [
        ("attention.wq", "attn_q"),
        ("attention.wk", "attn_k"),
        ("attention.wv", "attn_v"),
        ("attention.wo", "attn_output"),
    ]:
        for suffix in ("weight", "bias"):
            want = sd[f"layers.0.{meta_name}.{suffix}"].to(torch.float32).numpy().tobytes()
            assert got[f"blk.0.{gguf_name}.{suffix}"] == want, (gguf_name, suffix)


def test_hf_llama31_with_tokenizer_json_is_identical_to_meta_llama3(tmp_path):
    """HF LLaMA 3.1 layout (2 safetensors shards + index, rope_scaling llama3, byte-level BPE
    tokenizer.json) vs Meta's original (model-parallel .pth, use_scaled_rope, tiktoken
    tokenizer.model) of the same weights and vocabulary: the same GGUF, rope_freqs included."""
    from llmconv.convert.meta import open_meta_checkpoint

    meta, bpe = ROOT / "fixtures" / "llama3-tiny", ROOT / "fixtures" / "llama3-bpe"
    ck = open_meta_checkpoint(meta)
    sd = {n: ck.load(n).clone() for n in ck.names}
    params = ck.params
    d = tmp_path / "hf"
    d.mkdir()
    mk.write_weights(d, mk.hf_state_dict(sd, params["n_heads"], params["n_kv_heads"]), shards=2)
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    cfg = mk.hf_config(
        params, sd["layers.0.feed_forward.w1.weight"].shape[0], max_positions=131072, rope_scaling=scaling
    )
    (d / "config.json").write_text(json.dumps(cfg))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (d / name).write_bytes((bpe / name).read_bytes())
    a, b = convert(meta, tmp_path / "meta.gguf"), convert(d, tmp_path / "hf.gguf")
    assert tensors(b)[0][0] == "rope_freqs.weight"
    assert tensors(a) == tensors(b)
    fa, fb = fields(a), fields(b)
    assert fb[Keys.Tokenizer.MODEL] == "gpt2" and fb[Keys.Tokenizer.PRE] == "llama-bpe"
    assert fa == fb


# ---- weight files -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("small")
    meta, hf, sd = twins(tmp, seed=3)
    params = json.loads((meta / "params.json").read_text())
    return tmp, meta, hf, sd, params, tensors(convert(hf, tmp / "one.gguf"))


@pytest.mark.parametrize("shards,fmt", [(3, "safetensors"), (1, "bin"), (2, "bin")])
def test_shards_and_bin_give_the_same_tensors(small, tmp_path, shards, fmt):
    _, _, _, sd, params, want = small
    d = mk.write_hf_checkpoint(
        tmp_path / "ck", sd, params, shards=shards, fmt=fmt, config={"max_position_embeddings": 4096}
    )
    if shards > 1:
        index = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
        assert (d / index).is_file() and len(list(d.glob("*-of-*"))) == shards
    src = open_source(d)
    assert src.n_files == shards
    assert tensors(convert(d, tmp_path / "out.gguf")) == want


def _sharded(small, tmp_path, shards=3):
    _, _, _, sd, params, _ = small
    d = mk.write_hf_checkpoint(tmp_path / "ck", sd, params, shards=shards)
    index = d / "model.safetensors.index.json"
    return d, index, json.loads(index.read_text())


def test_index_lists_a_missing_file(small, tmp_path):
    d, _, _ = _sharded(small, tmp_path)
    (d / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(LlmconvError, match="missing") as e:
        open_source(d)
    assert e.value.file.endswith("model-00002-of-00003.safetensors")


def test_index_lists_a_tensor_the_file_lacks(small, tmp_path):
    d, index, doc = _sharded(small, tmp_path)
    doc["weight_map"]["model.layers.0.mlp.extra_proj.weight"] = "model-00001-of-00003.safetensors"
    index.write_text(json.dumps(doc))
    with pytest.raises(LlmconvError, match="not there") as e:
        open_source(d)
    assert e.value.tensor == "model.layers.0.mlp.extra_proj.weight"
    assert e.value.file.endswith("model-00001-of-00003.safetensors")


def test_file_holds_a_tensor_the_index_does_not_list(small, tmp_path):
    d, index, doc = _sharded(small, tmp_path)
    name = next(n for n, f in doc["weight_map"].items() if f == "model-00002-of-00003.safetensors")
    del doc["weight_map"][name]
    index.write_text(json.dumps(doc))
    with pytest.raises(LlmconvError, match="not listed") as e:
        open_source(d)
    assert e.value.tensor == name and e.value.file.endswith("model-00002-of-00003.safetensors")


def test_index_puts_a_tensor_in_the_wrong_file(small, tmp_path):
    d, index, doc = _sharded(small, tmp_path)
    name = next(n for n, f in doc["weight_map"].items() if f == "model-00003-of-00003.safetensors")
    doc["weight_map"][name] = "model-00001-of-00003.safetensors"
    index.write_text(json.dumps(doc))
    with pytest.raises(LlmconvError, match="listed under model-00001") as e:
        open_source(d)
    assert e.value.tensor == name


def test_shard_on_disk_missing_from_the_index(small, tmp_path):
    d, index, doc = _sharded(small, tmp_path)
    doc["weight_map"] = {n: f for n, f in doc["weight_map"].items() if f != "model-00003-of-00003.safetensors"}
    index.write_text(json.dumps(doc))
    with pytest.raises(LlmconvError, match="not listed") as e:
        open_source(d)
    assert e.value.file.endswith("model-00003-of-00003.safetensors")


def test_shards_without_index_must_be_complete(small, tmp_path):
    d, index, _ = _sharded(small, tmp_path)
    index.unlink()
    assert open_source(d).n_files == 3  # complete set: fine without an index
    (d / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(LlmconvError, match="shard 2 of 3 is missing") as e:
        open_source(d)
    assert e.value.file.endswith("model-00002-of-00003.safetensors")


def test_unknown_tensor_is_named_and_inv_freq_is_dropped(small, tmp_path):
    from safetensors.torch import load_file, save_file

    _, _, hf, _, _, want = small
    d = tmp_path / "ck"
    d.mkdir()
    for p in hf.iterdir():
        (d / p.name).write_bytes(p.read_bytes())
    sd = load_file(d / "model.safetensors")
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(sd, str(d / "model.safetensors"))
    assert tensors(convert(d, tmp_path / "a.gguf")) == want
    sd["model.layers.1.self_attn.q_norm.weight"] = torch.ones(16)
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(LlmconvError, match="unknown tensor") as e:
        open_source(d)
    assert e.value.tensor == "model.layers.1.self_attn.q_norm.weight"


# ---- tied embeddings ----------------------------------------------------------------------------


def test_tied_embeddings_have_no_output_tensor(tmp_path):
    meta, hf, sd = twins(tmp_path, tied=True, seed=4)
    a, b = convert(meta, tmp_path / "meta.gguf"), convert(hf, tmp_path / "hf.gguf")
    names = [n for n, _, _ in tensors(b)]
    assert "output.weight" not in names and "token_embd.weight" in names
    assert tensors(a) == tensors(b)
    # tie_word_embeddings with an lm_head stored anyway: the stored copy is ignored
    params = json.loads((meta / "params.json").read_text())
    full = dict(sd, **{"output.weight": torch.zeros_like(sd["tok_embeddings.weight"])})
    c = mk.write_hf_checkpoint(
        tmp_path / "hf2", full, params, config={"max_position_embeddings": 4096, "tie_word_embeddings": True}
    )
    src = open_source(c)
    assert src.hparams.tied_embeddings and any("lm_head.weight ignored" in w for w in src.warnings)
    assert tensors(convert(c, tmp_path / "c.gguf")) == tensors(b)


def test_untied_has_output_tensor(small):
    names = [n for n, _, _ in small[5]]
    assert names[-1] == "output.weight" and names[0] == "token_embd.weight"


# ---- config.json ------------------------------------------------------------------------------


def _edit_config(src: Path, dst: Path, **changes) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).symlink_to(p)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").unlink()
    (dst / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    return dst


def test_other_architectures_are_refused_by_name(small, tmp_path):
    d = _edit_config(small[2], tmp_path / "q", architectures=["Qwen2ForCausalLM"])
    with pytest.raises(LlmconvError, match="Qwen2ForCausalLM") as e:
        open_source(d)
    assert e.value.file.endswith("config.json")


def test_auto_map_is_ignored_with_a_warning(small, tmp_path):
    d = _edit_config(small[2], tmp_path / "a", auto_map={"AutoModelForCausalLM": "modeling_x.XForCausalLM"})
    src = open_source(d)
    assert any("auto_map" in w for w in src.warnings)
    assert tensors(convert(d, tmp_path / "a.gguf")) == small[5]


def test_mistral_sliding_window_is_dropped_with_a_warning_and_ctx(small, tmp_path):
    d = _edit_config(
        small[2],
        tmp_path / "m",
        architectures=["MistralForCausalLM"],
        model_type="mistral",
        sliding_window=4096,
        max_position_embeddings=32768,
        rope_theta=1e6,
    )
    src = open_source(d)
    assert any("sliding_window 4096 dropped" in w for w in src.warnings)
    f = fields(convert(d, tmp_path / "m.gguf"))
    assert not [k for k in f if "sliding" in k or "swa" in k]
    assert f["llama.context_length"] == 32768 and f["llama.rope.freq_base"] == 1e6
    assert fields(convert(d, tmp_path / "m2.gguf", ctx=1234))["llama.context_length"] == 1234


def test_hparams_come_from_config(small, tmp_path):
    d = _edit_config(small[2], tmp_path / "h", rms_norm_eps=1e-6, rope_theta=250000.0, max_position_embeddings=777)
    f = fields(convert(d, tmp_path / "h.gguf"))
    cfg = json.loads((d / "config.json").read_text())
    assert f["llama.embedding_length"] == cfg["hidden_size"]
    assert f["llama.block_count"] == cfg["num_hidden_layers"]
    assert f["llama.attention.head_count"] == cfg["num_attention_heads"]
    assert f["llama.attention.head_count_kv"] == cfg["num_key_value_heads"]
    assert f["llama.feed_forward_length"] == cfg["intermediate_size"]
    assert f["llama.vocab_size"] == cfg["vocab_size"]
    assert f["llama.context_length"] == 777
    assert np.float32(f["llama.attention.layer_norm_rms_epsilon"]) == np.float32(1e-6)
    assert f["llama.rope.freq_base"] == 250000.0


def test_config_disagreeing_with_the_weights_is_an_error(small, tmp_path):
    d = _edit_config(small[2], tmp_path / "x", num_key_value_heads=4)
    with pytest.raises(LlmconvError, match="implies") as e:
        open_source(d)
    assert e.value.tensor == "model.layers.0.self_attn.k_proj.weight"


def test_llama3_rope_scaling_writes_rope_freqs(small, tmp_path):
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    d = _edit_config(small[2], tmp_path / "r", rope_theta=500000.0, rope_scaling=scaling)
    got = {n: np.frombuffer(b, np.float32) for n, _, b in tensors(convert(d, tmp_path / "r.gguf"))}
    # Meta's apply_scaling, in float64: the divisor llama.cpp applies to each frequency
    head_dim = 64 // 4
    want = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * 500000.0 ** (i / head_dim)
        if wavelen < 8192 / 4.0:
            want.append(1.0)
        elif wavelen > 8192 / 1.0:
            want.append(8.0)
        else:
            s = (8192 / wavelen - 1.0) / (4.0 - 1.0)
            want.append(1 / ((1 - s) / 8.0 + s))
    np.testing.assert_allclose(got["rope_freqs.weight"], want, rtol=1e-6)
    assert set(got["rope_freqs.weight"]) != {1.0}  # the tiny head size still scales some


def test_unsupported_rope_scaling_is_named(small, tmp_path):
    d = _edit_config(small[2], tmp_path / "r", rope_scaling={"type": "dynamic", "factor": 2.0})
    with pytest.raises(LlmconvError, match="'dynamic'"):
        open_source(d)
    d = _edit_config(small[2], tmp_path / "l", rope_scaling={"type": "linear", "factor": 4.0})
    f = fields(convert(d, tmp_path / "l.gguf"))
    assert f["llama.rope.scaling.type"] == "linear" and f["llama.rope.scaling.factor"] == 4.0


# ---- tokenizer ---------------------------------------------------------------------------------

TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """SentencePiece vocabulary (512) + two added special tokens, an instruct-style config:
    generation stops on </s> or <|im_end|>, no BOS, EOS appended, a chat template."""
    tmp = tmp_path_factory.mktemp("chat")
    sd = meta_state_dict(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, ffn=96, vocab=514, seed=9)
    params = {"dim": 64, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 514, "norm_eps": 1e-5}
    tc = mk.sp_tokenizer_config(
        {512: ("<|im_start|>", True), 513: ("<|im_end|>", True)},
        add_bos_token=False,
        add_eos_token=True,
        chat_template=TEMPLATE,
    )
    d = mk.write_hf_checkpoint(
        tmp / "chat", sd, params, tokenizer_config=tc, generation_config={"bos_token_id": 1, "eos_token_id": [2, 513]}
    )
    return d, convert(d, tmp / "chat.gguf")


def test_added_tokens_special_ids_and_chat_template(chat_model):
    d, out = chat_model
    f = fields(out)
    T = Keys.Tokenizer
    sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
    assert f[T.LIST][:512] == [sp.id_to_piece(i) for i in range(512)]
    assert f[T.LIST][512:] == ["<|im_start|>", "<|im_end|>"]
    assert f[T.TOKEN_TYPE][512:] == [3, 3]  # control
    assert (f[T.BOS_ID], f[T.EOS_ID], f[T.UNK_ID]) == (sp.bos_id(), sp.eos_id(), sp.unk_id())
    assert f[T.EOT_ID] == 513
    assert (f[T.ADD_BOS], f[T.ADD_EOS]) == (False, True)
    assert f[T.CHAT_TEMPLATE] == TEMPLATE
    assert T.PAD_ID not in f


@pytest.mark.llamacpp
def test_llamacpp_reads_the_added_tokens(chat_model, llama_cpp):
    _, out = chat_model
    llm = llama_cpp.Llama(str(out), vocab_only=True, verbose=False)
    assert llm.tokenize(b"<|im_start|>", add_bos=False, special=True) == [512]
    assert llm.tokenize(b"<|im_end|>", add_bos=False, special=True) == [513]
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    assert llama_cpp.llama_vocab_is_eog(vocab, 513) and llama_cpp.llama_vocab_is_eog(vocab, 2)
    assert llm.metadata["tokenizer.chat_template"] == TEMPLATE


def test_added_token_errors_and_padding(tmp_path):
    sd = meta_state_dict(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, ffn=96, vocab=520, seed=2)
    params = {"dim": 64, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 520, "norm_eps": 1e-5}
    d = mk.write_hf_checkpoint(tmp_path / "pad", sd, params)
    src = open_source(d)
    assert len(src.vocab) == 520 and src.vocab.token_types[512:] == [5] * 8  # unused
    assert src.vocab.tokens[519] == b"[PAD519]" and any("8 unused" in w for w in src.warnings)
    gap = mk.sp_tokenizer_config({513: ("<x>", True)})
    mk.write_hf_checkpoint(tmp_path / "gap", sd, params, tokenizer_config=gap)
    with pytest.raises(LlmconvError, match="gap"):
        open_source(tmp_path / "gap")
    clash = mk.sp_tokenizer_config({5: ("<y>", True)})
    mk.write_hf_checkpoint(tmp_path / "clash", sd, params, tokenizer_config=clash)
    with pytest.raises(LlmconvError, match="added token 5"):
        open_source(tmp_path / "clash")


# ---- llama.cpp is the judge ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_cpp():
    import llama_cpp as lc

    return lc


@pytest.fixture(scope="module")
def hf_f32(tmp_path_factory):
    return convert(HF, tmp_path_factory.mktemp("hf32") / "hf-f32.gguf", "f32")


@pytest.mark.llamacpp
def test_llamacpp_tokenizes_the_hf_fixture_like_sentencepiece(hf_f32, llama_cpp):
    sp = spm.SentencePieceProcessor(model_file=str(HF / "tokenizer.model"))
    llm = llama_cpp.Llama(str(hf_f32), vocab_only=True, verbose=False)
    for s in SENTENCES:
        assert llm.tokenize(s.encode(), add_bos=True) == [sp.bos_id()] + sp.encode(s), s


def _llamacpp_logits(lc, path, tokens):
    llm = lc.Llama(str(path), n_ctx=256, n_batch=256, logits_all=True, type_k=0, type_v=0, n_threads=1, verbose=False)
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


def _tokens(n=100):
    sp = spm.SentencePieceProcessor(model_file=str(HF / "tokenizer.model"))
    return [sp.bos_id()] + sp.encode(" ".join(SENTENCES))[: n - 1]


@pytest.mark.llamacpp
def test_llamacpp_logits_of_hf_fixture_match_the_meta_reference(hf_f32, llama_cpp):
    from llmconv.verify.reference import reference_logits

    tokens = _tokens()
    ref = reference_logits(META, tokens)
    got = _llamacpp_logits(llama_cpp, hf_f32, tokens)
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert err <= 1e-4, err


@pytest.mark.llamacpp
@pytest.mark.parametrize("n_heads,n_kv,dim,tied", [(9, 3, 72, True), (32, 4, 256, False)])
def test_llamacpp_logits_of_synthetic_hf_match_the_meta_twin(tmp_path, llama_cpp, n_heads, n_kv, dim, tied):
    from llmconv.verify.reference import reference_logits

    meta, hf, _ = twins(tmp_path, n_heads=n_heads, n_kv=n_kv, dim=dim, tied=tied, seed=11)
    tokens = _tokens(48)
    ref = reference_logits(meta, tokens)
    got = _llamacpp_logits(llama_cpp, convert(hf, tmp_path / "hf.gguf"), tokens)
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert err <= 1e-4, err
