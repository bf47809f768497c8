"""Tiny Llama 4 checkpoints in Hugging Face's layout around Llama 4's real tokenizer, and an
independent float64 forward pass written from Hugging Face's Llama 4 text model.

The tokenizer: Meta's own `llama_models/llama4/tokenizer.model` (tiktoken ranks, 200,000
tokens) from the `llama-models` package (Meta's reference code on PyPI, installed with
--no-deps), with the 2,048 special tokens its tokenizer.py appends. Hugging Face ships Llama 4's
vocabulary as a tokenizer.json that transformers' TikTokenConverter made from that file: the
same is rebuilt here (merges from the ranks, Llama 4's split regex before a ByteLevel step, the
special tokens as special added tokens, <|begin_of_text|> in front). The test checks it
against llama.cpp's own fingerprint of the real one (the `llama4` check-text hash) and against
Meta's tiktoken tokenizer.

`write_hf_llama4` writes a Llama4ForConditionalGeneration: config.json with `text_config` (and a
small `vision_config`), safetensors with HF's names: the fused expert tensors
`feed_forward.experts.gate_up_proj` [n_expert, dim, 2*ffn] and `down_proj` [n_expert, ffn, dim]
(used as x @ W), the router, the shared expert, dense layers with intermediate_size_mlp, and a
few vision-tower tensors. Deterministic for a seed.

`llama4_logits` is the reference, from transformers' modeling_llama4 (4.51) and nothing in llmconv:

    per layer i:  rope = (i + 1) % 4 != 0
        a = rmsnorm(h); q, k, v = a Wq^T, a Wk^T, a Wv^T
        rope layer:  q, k rotated on adjacent pairs (x[2j], x[2j+1]) by pos / (theta^(2j/hd) * factor_j)
                     (llama3-scaled frequencies); then q, k = l2norm(q), l2norm(k) (rmsnorm without
                     weight, eps = rms_norm_eps); attention causal within chunks of 8192 positions
        no-rope layer: q *= log(floor((pos + 1) / 8192) + 1) * 0.1 + 1; causal attention over all
        h += softmax(q k^T / sqrt(hd) + mask) v Wo^T
        f = rmsnorm(h)
        dense layer: h += down(silu(gate f) * up f)
        MoE layer:   s = f Wrouter^T; top-k experts by s; each chosen expert e gets the input
                     sigmoid(s_e) * f (the score scales the expert's INPUT); h += shared(f) +
                     sum_e (silu(x Wgu_e[:, :F]) * x Wgu_e[:, F:]) Wd_e
    logits = rmsnorm(h) Wlm^T
"""

from __future__ import annotations

import importlib.util
import json
import math
from functools import lru_cache
from pathlib import Path

import torch

from llmconv.testing.moe_synth import save_safetensors

CHUNK = 8192


def llama4_tokenizer_model() -> Path | None:
    """Meta's Llama 4 tiktoken file from the llama-models package (located, not imported), or None."""
    spec = importlib.util.find_spec("llama_models")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "llama4" / "tokenizer.model"
    return path if path.is_file() else None


def meta_llama4_tokenizer():
    """Meta's own Llama 4 tokenizer class (tiktoken underneath): the tokenization oracle."""
    from llama_models.llama4.tokenizer import Tokenizer

    return Tokenizer(llama4_tokenizer_model())


@lru_cache(maxsize=1)
def llama4_tokenizer_files() -> tuple[str, dict]:
    """(tokenizer.json text, tokenizer_config.json) rebuilt from Meta's file as transformers'
    TikTokenConverter builds Llama 4's tokenizer.json."""
    from llmconv.convert import bpe, tiktoken_bpe
    from llmconv.convert.pretok import LLAMA4_PATTERN
    from realtok import read_tiktoken

    ranks = read_tiktoken(llama4_tokenizer_model())
    specials = sorted(meta_llama4_tokenizer().special_tokens.items(), key=lambda kv: kv[1])
    vocab = {bpe.bytes_to_token(t): r for t, r in ranks.items()}
    bos = "<|begin_of_text|>"
    doc = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": i,
                "content": s,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for s, i in specials
        ],
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": LLAMA4_PATTERN}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        },
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                {"SpecialToken": {"id": bos, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": bos, "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {bos: {"id": bos, "ids": [200000], "tokens": [bos]}},
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": True,
            "vocab": vocab,
            "merges": tiktoken_bpe.merges_from_ranks(ranks),
        },
    }
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": bos,
        "eos_token": "<|eot|>",
        "pad_token": "<|finetune_right_pad|>",
        "model_max_length": 10485760,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": "{{ bos_token }}{% for m in messages %}<|header_start|>{{ m['role'] }}<|header_end|>\n\n"
        "{{ m['content'] }}<|eot|>{% endfor %}",
    }
    return json.dumps(doc, ensure_ascii=False), config


TEXT_CONFIG = dict(
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=256,
    intermediate_size_mlp=512,
    num_local_experts=4,
    num_experts_per_tok=1,
    interleave_moe_layer_step=2,
    vocab_size=202048,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    rope_scaling={
        "factor": 16.0,
        "high_freq_factor": 1.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    max_position_embeddings=10485760,
    use_qk_norm=True,
    attention_chunk_size=8192,
    attn_temperature_tuning=True,
    floor_scale=8192,
    attn_scale=0.1,
    no_rope_layer_interval=4,
    hidden_act="silu",
    attention_bias=False,
    tie_word_embeddings=False,
    model_type="llama4_text",
    bos_token_id=200000,
    eos_token_id=[200001, 200007, 200008],
    pad_token_id=200018,
    router_aux_loss_coef=0.001,
    router_jitter_noise=0.0,
    output_router_logits=False,
)


def text_config(**overrides) -> dict:
    cfg = json.loads(json.dumps(TEXT_CONFIG))
    cfg.update(overrides)
    n, step = cfg["num_hidden_layers"], cfg["interleave_moe_layer_step"]
    cfg.setdefault("moe_layers", list(range(step - 1, n, step)))
    cfg.setdefault("no_rope_layers", [int((i + 1) % 4 != 0) for i in range(n)])
    return cfg


def llama4_state_dict(
    cfg: dict, seed: int = 0, dtype=torch.bfloat16, router_scale: float = 3.0
) -> dict[str, torch.Tensor]:
    """Random weights under Llama4ForConditionalGeneration's names."""
    g = torch.Generator().manual_seed(seed)
    d, hd, nh, nkv = cfg["hidden_size"], cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    E, F, Fd = cfg["num_local_experts"], cfg["intermediate_size"], cfg["intermediate_size_mlp"]

    def w(*shape, fan_in=None, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale * (fan_in or shape[-1]) ** -0.5).to(dtype)

    def norm():
        return (1 + 0.1 * torch.randn(d, generator=g)).to(dtype)

    p = "language_model.model."
    sd = {p + "embed_tokens.weight": w(cfg["vocab_size"], d, scale=d**0.5)}
    for i in range(cfg["num_hidden_layers"]):
        L = f"{p}layers.{i}."
        sd[L + "self_attn.q_proj.weight"] = w(nh * hd, d)
        sd[L + "self_attn.k_proj.weight"] = w(nkv * hd, d)
        sd[L + "self_attn.v_proj.weight"] = w(nkv * hd, d)
        sd[L + "self_attn.o_proj.weight"] = w(d, nh * hd)
        sd[L + "input_layernorm.weight"] = norm()
        sd[L + "post_attention_layernorm.weight"] = norm()
        if i in cfg["moe_layers"]:
            sd[L + "feed_forward.router.weight"] = w(E, d, scale=router_scale)
            sd[L + "feed_forward.experts.gate_up_proj"] = w(E, d, 2 * F, fan_in=d)
            sd[L + "feed_forward.experts.down_proj"] = w(E, F, d, fan_in=F)
            for name, shape in (("gate_proj", (F, d)), ("up_proj", (F, d)), ("down_proj", (d, F))):
                sd[L + f"feed_forward.shared_expert.{name}.weight"] = w(*shape)
        else:
            for name, shape in (("gate_proj", (Fd, d)), ("up_proj", (Fd, d)), ("down_proj", (d, Fd))):
                sd[L + f"feed_forward.{name}.weight"] = w(*shape)
    sd[p + "norm.weight"] = norm()
    sd["language_model.lm_head.weight"] = w(cfg["vocab_size"], d)
    # a stub of the vision tower and projector (names as in the real checkpoint): skipped by the converter
    sd["vision_model.patch_embedding.linear.weight"] = w(32, 48)
    sd["vision_model.model.layers.0.self_attn.q_proj.weight"] = w(32, 32)
    sd["vision_model.model.layers.0.self_attn.q_proj.bias"] = w(32, fan_in=32)
    sd["multi_modal_projector.linear_1.weight"] = w(d, 32)
    return sd


def write_hf_llama4(
    path: Path, *, seed: int = 0, shards: int = 2, sd: dict | None = None, tokenizer: bool = True, **overrides
) -> Path:
    """The checkpoint (one model.safetensors, or weights spread round-robin over `shards` files with an index), Llama 4's
    tokenizer files (unless `tokenizer` is false), generation_config.json."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tcfg = text_config(**overrides)
    sd = sd if sd is not None else llama4_state_dict(tcfg, seed)
    save_safetensors(path, sd, shards)
    cfg = {
        "architectures": ["Llama4ForConditionalGeneration"],
        "model_type": "llama4",
        "boi_token_index": 200080,
        "eoi_token_index": 200081,
        "image_token_index": 200092,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "text_config": tcfg,
        "vision_config": {
            "model_type": "llama4_vision_model",
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "image_size": 336,
            "patch_size": 14,
            "norm_eps": 1e-5,
            "pixel_shuffle_ratio": 0.5,
            "projector_input_dim": 32,
            "projector_output_dim": tcfg["hidden_size"],
            "vision_output_dim": 32,
            "hidden_act": "gelu",
        },
    }
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    if not tokenizer:
        return path
    tok_json, tok_config = llama4_tokenizer_files()
    (path / "tokenizer.json").write_text(tok_json, encoding="utf-8")
    (path / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    (path / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 200000, "eos_token_id": [200001, 200007, 200008], "pad_token_id": 200018})
    )
    return path


def load_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    sd = {}
    for f in sorted(Path(ckpt).glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return sd


# ---- the reference forward pass ---------------------------------------------------------------


def _rms(x, eps, w=None):
    y = x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)
    return y * w if w is not None else y


def _inv_freq(cfg: dict) -> torch.Tensor:
    """transformers' llama3 RoPE frequencies (modeling_rope_utils._compute_llama3_parameters)."""
    hd, theta = cfg["head_dim"], cfg["rope_theta"]
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    rs = cfg.get("rope_scaling")
    if not rs:
        return inv
    factor, lo, hi, old = (
        rs["factor"],
        rs["low_freq_factor"],
        rs["high_freq_factor"],
        rs["original_max_position_embeddings"],
    )
    wavelen = 2 * math.pi / inv
    out = torch.where(wavelen > old / lo, inv / factor, inv)
    if hi != lo:
        smooth = (old / wavelen - lo) / (hi - lo)
        mid = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        out = torch.where(mid, (1 - smooth) * out / factor + smooth * out, out)
    return out


def _rope_adjacent(x, pos, inv):
    """x [T, heads, hd]: pairs (x[2j], x[2j+1]) as complex numbers times e^(i pos inv_j)."""
    ang = pos[:, None].to(torch.float64) * inv[None, :]
    c = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(c * torch.polar(torch.ones_like(ang), ang)[:, None, :]).flatten(-2)


def _attention(q, k, v, qpos, chunk: int | None, block: int = 1024):
    """Causal (within chunks of `chunk` positions unless None) attention of queries q [Q, H, hd]
    at positions `qpos` over keys/values k/v [T, Hkv, hd] at positions 0..T-1; queries in blocks
    so that a long sequence does not need a T x T matrix per head."""
    H, hd = q.shape[1:]
    rep = H // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    out = torch.empty_like(q)
    for a in range(0, q.shape[0], block):
        qp = qpos[a : a + block]
        lo = int(qp.min()) // chunk * chunk if chunk else 0
        keys = slice(lo, int(qp.max()) + 1)
        kp = torch.arange(keys.start, keys.stop)
        mask = kp[None, :] > qp[:, None]
        if chunk:
            mask |= (kp[None, :] // chunk) != (qp[:, None] // chunk)
        s = torch.einsum("thd,khd->htk", q[a : a + block], k[keys]) / math.sqrt(hd)
        s = s.masked_fill(mask[None], float("-inf"))
        out[a : a + block] = torch.einsum("htk,khd->thd", torch.softmax(s, -1), v[keys])
    return out


def llama4_logits(
    sd: dict, cfg: dict, tokens: list[int], last: int | None = None, dtype=torch.float64, chunk: int | None = CHUNK
) -> tuple[torch.Tensor, float]:
    """(logits [T or `last`, vocab], the smallest gap between the k-th and (k+1)-th router score
    over all tokens and MoE layers: how safe the top-k choice is from rounding). `cfg` is the
    text_config; `last` keeps only the last positions' logits (long sequences); `chunk` None
    turns chunked attention off (to show that it matters)."""
    p = "language_model.model."
    w = lambda name: sd[name].to(dtype)  # noqa: E731
    nh, nkv, hd, eps = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"], cfg["rms_norm_eps"]
    F, k_used = cfg["intermediate_size"], cfg["num_experts_per_tok"]
    T = len(tokens)
    pos = torch.arange(T)
    inv = _inv_freq(cfg)
    h = w(p + "embed_tokens.weight")[torch.tensor(tokens)]
    margin = float("inf")
    n_layers = cfg["num_hidden_layers"]
    for i in range(n_layers):
        L = f"{p}layers.{i}."
        rope = (i + 1) % 4 != 0
        a = _rms(h, eps, w(L + "input_layernorm.weight"))
        q = (a @ w(L + "self_attn.q_proj.weight").T).view(T, nh, hd)
        k = (a @ w(L + "self_attn.k_proj.weight").T).view(T, nkv, hd)
        v = (a @ w(L + "self_attn.v_proj.weight").T).view(T, nkv, hd)
        if rope:
            q, k = _rope_adjacent(q, pos, inv).to(dtype), _rope_adjacent(k, pos, inv).to(dtype)
            if cfg["use_qk_norm"]:
                q, k = _rms(q, eps), _rms(k, eps)
        else:
            scale = torch.log(torch.floor((pos.to(torch.float64) + 1) / cfg["floor_scale"]) + 1) * cfg["attn_scale"] + 1
            q = q * scale.to(dtype)[:, None, None]
        qpos = pos
        if last is not None and i == n_layers - 1:  # only the last positions' outputs are needed
            q, qpos, h = q[-last:], pos[-last:], h[-last:]
        att = _attention(q, k, v, qpos, chunk if rope else None)
        h = h + att.reshape(len(qpos), nh * hd) @ w(L + "self_attn.o_proj.weight").T
        f = _rms(h, eps, w(L + "post_attention_layernorm.weight"))
        if i in cfg["moe_layers"]:
            ff = L + "feed_forward."
            out = _swiglu(
                f,
                w(ff + "shared_expert.gate_proj.weight"),
                w(ff + "shared_expert.up_proj.weight"),
                w(ff + "shared_expert.down_proj.weight"),
            )
            scores = f @ w(ff + "router.weight").T
            ranked = torch.sort(scores, -1, descending=True).values
            if k_used < scores.shape[-1]:
                margin = min(margin, float((ranked[:, k_used - 1] - ranked[:, k_used]).min()))
            top_s, top_e = torch.topk(scores, k_used, -1)
            gate_up, down = w(ff + "experts.gate_up_proj"), w(ff + "experts.down_proj")
            for e in range(gate_up.shape[0]):
                rows, slot = (top_e == e).nonzero(as_tuple=True)
                if len(rows):
                    x = f[rows] * torch.sigmoid(top_s[rows, slot])[:, None]  # the score scales the input
                    gu = x @ gate_up[e]
                    out[rows] += (torch.nn.functional.silu(gu[:, :F]) * gu[:, F:]) @ down[e]
            h = h + out
        else:
            ff = L + "feed_forward."
            h = h + _swiglu(f, w(ff + "gate_proj.weight"), w(ff + "up_proj.weight"), w(ff + "down_proj.weight"))
    if last is not None:
        h = h[-last:]
    return _rms(h, eps, w(p + "norm.weight")) @ w("language_model.lm_head.weight").T, margin


def _swiglu(x, gate, up, down):
    return (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T


SMALL_VOCAB = 260  # small_vocab_tokenizer's


def small_vocab_tokenizer(ck: Path) -> None:
    """A SMALL_VOCAB-token byte-level BPE vocabulary (the bytes and four merges) with Llama 4's pre-tokenizer."""
    from llmconv.convert import bpe
    from llmconv.convert.pretok import LLAMA4_PATTERN
    from realtok import _byte_level_bpe

    pre = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA4_PATTERN}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ],
    }
    vocab = {bpe.bytes_to_token(bytes([b])): b for b in range(256)}
    merges = ["Ġ t", "e r", "i n", "Ġ a"]  # llama.cpp needs merges to load a BPE vocabulary
    vocab |= {m.replace(" ", ""): 256 + i for i, m in enumerate(merges)}
    doc = _byte_level_bpe(vocab, merges, [], pre, None)
    (ck / "tokenizer.json").write_text(json.dumps(doc))
    (ck / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
