"""Issue 6: Meta's original LLaMA 3.x checkpoints (tiktoken tokenizer.model, scaled RoPE,
vocabulary-split embedding) -> GGUF that llama.cpp tokenizes and runs like the source."""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path

import numpy as np
import pytest
import tiktoken
import torch
from gguf import GGUFReader
from tokenizers import Tokenizer

from llmconv.convert.rope import llama3_rope_factors

ROOT = Path(__file__).resolve().parents[1]
META_DIR = ROOT / "fixtures" / "llama3-tiny"
HF_DIR = ROOT / "fixtures" / "llama3-bpe"
N_BPE = 1000

TEXT = (
    "Hello, world! 3.14159 and 1234567 — naïve café, Ünïcödé; 東京タワー, Привет мир, مرحبا, नमस्ते "
    "🙂👍🏽 Ελληνικά\n\ndef f(x):\n    return x ** 2  # it's code\n\t\tdon't  stop   'LL 'Re I'M\r\n"
    '   trailing spaces   \n\n\n$100,000.00 (approx.) <tag attr="v"/> a_b-c.d'
)
# LLaMA 3's split regex as Meta's tokenizer.py gives it to tiktoken
META_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def llamacpp_loop_factors(head_dim, base, factor, low, high, old_ctx):
    """rope_freqs as llama.cpp's convert_hf_to_gguf.py computes it: a Python loop over the
    float32 frequency tensor, one 0-d tensor at a time."""
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    low_wl, high_wl = old_ctx / low, old_ctx / high
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wl:
            out.append(1)
        elif wavelen > low_wl:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32).numpy()


def meta_apply_scaling_divisors(head_dim, base, factor, low, high, old_ctx):
    """Meta's apply_scaling (llama-models) in float64, expressed as the divisor llama.cpp
    applies to each base frequency."""
    out = []
    for i in range(0, head_dim, 2):
        freq = base ** (-i / head_dim)
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            new = freq
        elif wavelen > old_ctx / low:
            new = freq / factor
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            new = (1 - smooth) * freq / factor + smooth * freq
        out.append(freq / new)
    return np.array(out)


@pytest.mark.parametrize(
    "head_dim,base,factor,high",
    [(64, 500000.0, 8.0, 4.0), (128, 500000.0, 8.0, 4.0), (64, 500000.0, 32.0, 4.0), (128, 10000.0, 8.0, 2.0)],
)
def test_rope_factors_match_llamacpp_and_meta(head_dim, base, factor, high):
    got = llama3_rope_factors(
        head_dim, base, factor=factor, low_freq_factor=1.0, high_freq_factor=high, original_context=8192
    )
    assert got.dtype == np.float32 and got.shape == (head_dim // 2,)
    want = llamacpp_loop_factors(head_dim, base, factor, 1.0, high, 8192)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    np.testing.assert_allclose(got, meta_apply_scaling_divisors(head_dim, base, factor, 1.0, high, 8192), rtol=1e-6)
    if base == 500000.0 and head_dim == 128:
        # all three bands occur for LLaMA 3.1 8B's head size
        assert (got == 1).any() and (got == np.float32(factor)).any() and ((got > 1) & (got < factor)).any()


# ---- the converted file (the shared `converted` fixture, tests/conftest.py) --------------------


def kv(reader: GGUFReader, key: str):
    f = reader.get_field(key)
    return None if f is None else f.contents()


def tensors(reader: GGUFReader) -> dict[str, np.ndarray]:
    return {t.name: np.array(t.data) for t in reader.tensors}


def test_metadata_and_rope_freqs(converted):
    r = GGUFReader(converted(META_DIR, "f32"))
    assert kv(r, "tokenizer.ggml.model") == "gpt2"
    assert kv(r, "tokenizer.ggml.pre") == "llama-bpe"
    assert kv(r, "llama.context_length") == 131072  # LLaMA 3.1/3.2
    assert kv(r, "llama.rope.freq_base") == 500000.0
    toks = kv(r, "tokenizer.ggml.tokens")
    assert len(toks) == N_BPE + 256 and toks[N_BPE + 4] == "<|finetune_right_pad_id|>"
    assert (
        kv(r, "tokenizer.ggml.bos_token_id"),
        kv(r, "tokenizer.ggml.eos_token_id"),
        kv(r, "tokenizer.ggml.eot_token_id"),
    ) == (N_BPE, N_BPE + 1, N_BPE + 9)
    assert r.get_field("tokenizer.ggml.scores") is None
    t = tensors(r)
    params = json.loads((META_DIR / "params.json").read_text())
    head_dim = params["dim"] // params["n_heads"]
    want = llamacpp_loop_factors(head_dim, params["rope_theta"], 8.0, 1.0, 4.0, 8192)
    assert np.array_equal(t["rope_freqs.weight"], want)
    assert (want != 1).any()  # the fixture's RoPE is actually scaled


def test_embedding_split_by_vocabulary_is_joined(converted):
    shards = [torch.load(META_DIR / f"consolidated.0{k}.pth", weights_only=True) for k in range(2)]
    assert all(s["tok_embeddings.weight"].shape[0] == (N_BPE + 256) // 2 for s in shards)
    t = tensors(GGUFReader(converted(META_DIR, "f32")))
    for meta, gguf_name in (("tok_embeddings.weight", "token_embd.weight"), ("output.weight", "output.weight")):
        joined = torch.cat([s[meta] for s in shards], dim=0).to(torch.float32).numpy()
        assert np.array_equal(t[gguf_name], joined), gguf_name


def test_llama3_without_scaled_rope(converted, tmp_path):
    """LLaMA 3.0: no use_scaled_rope -> 8192 context, no rope_freqs, 3.0 special-token names."""
    d = tmp_path / "llama3.0"
    d.mkdir()
    params = json.loads((META_DIR / "params.json").read_text())
    del params["use_scaled_rope"]
    (d / "params.json").write_text(json.dumps(params))
    for f in ("consolidated.00.pth", "consolidated.01.pth", "tokenizer.model"):
        (d / f).symlink_to(META_DIR / f)
    r = GGUFReader(converted(d, "f32"))
    assert kv(r, "llama.context_length") == 8192
    assert "rope_freqs.weight" not in tensors(r)
    assert kv(r, "tokenizer.ggml.tokens")[N_BPE + 4] == "<|reserved_special_token_2|>"
    assert kv(r, "tokenizer.ggml.eot_token_id") == N_BPE + 9
    r = GGUFReader(converted(d, "f32", ctx=2048))
    assert kv(r, "llama.context_length") == 2048


# ---- llama.cpp is the judge ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_cpp():
    import llama_cpp as lc

    return lc


def meta_tiktoken() -> tiktoken.Encoding:
    ranks = {}
    for line in (META_DIR / "tokenizer.model").read_bytes().splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return tiktoken.Encoding(
        name="llama3-tiny",
        pat_str=META_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={"<|begin_of_text|>": N_BPE, "<|eot_id|>": N_BPE + 9},
    )


@pytest.mark.llamacpp
def test_llamacpp_tokenizes_like_tokenizers_and_tiktoken(converted, llama_cpp):
    llm = llama_cpp.Llama(str(converted(META_DIR, "f32")), vocab_only=True, verbose=False)
    hf = Tokenizer.from_file(str(HF_DIR / "tokenizer.json"))
    enc = meta_tiktoken()
    for text in [TEXT] + TEXT.split("\n"):
        got = llm.tokenize(text.encode(), add_bos=False, special=False)
        assert got == hf.encode(text, add_special_tokens=False).ids == enc.encode(text), text
    # with the beginning-of-text token and special-token parsing
    chat = "<|begin_of_text|>hi<|eot_id|>"
    assert llm.tokenize(TEXT.encode(), add_bos=True) == hf.encode(TEXT).ids
    assert (
        llm.tokenize(chat.encode(), add_bos=False, special=True)
        == enc.encode(chat, allowed_special="all")
        == [N_BPE] + enc.encode("hi") + [N_BPE + 9]
    )


@pytest.mark.llamacpp
def test_llamacpp_logits_match_reference(converted, llama_cpp, monkeypatch):
    import llmconv.verify.reference as reference

    tokens = [N_BPE] + meta_tiktoken().encode(TEXT)
    ref = reference.reference_logits(META_DIR, tokens)
    llm = llama_cpp.Llama(
        str(converted(META_DIR, "f32")),
        n_ctx=256,
        n_batch=256,
        logits_all=True,
        type_k=0,
        type_v=0,
        n_threads=1,
        verbose=False,
    )
    llm.eval(tokens)
    got = np.array(llm.scores[: len(tokens)], dtype=np.float32)
    scale = np.abs(ref).max()
    err = np.abs(got - ref).max() / scale
    assert err <= 1e-4, err
    # the scaled RoPE matters at these positions: the reference without it is far off
    monkeypatch.setattr(reference, "llama3_scaling", lambda params: None)
    unscaled = reference.reference_logits(META_DIR, tokens)
    assert np.abs(got - unscaled).max() / scale > 10 * err + 1e-3
