"""The float32 reference for Hugging Face checkpoints: a plain PyTorch LLaMA forward pass in
HF's own layout and names, as transformers' modeling_llama.py computes it.

The converter un-permutes q_proj/k_proj from HF's rotate-half row order back to Meta's
adjacent pairs. This pass does no such thing: it uses q_proj/k_proj exactly as stored and
rotates them the way transformers does (rotate_half: pairs (x[i], x[i + head_dim/2])). So a
wrong un-permutation in the converter shows up as a logit difference here, where a reference
built on the converter's own tensors could not see it. Nothing is shared with reference.py
(Meta layout) or candidate.py (the file side) except the safe weight loaders and the
hook plumbing (ForwardHooks, LayerWeights).

It streams like the Meta reference: one layer's weights at a time, cast to float32.

HF's conventions (transformers LlamaModel / LlamaForCausalLM):
  - LlamaRMSNorm: weight * x / sqrt(mean(x^2) + rms_norm_eps)
  - RoPE: inv_freq = rope_theta^(-2i/head_dim); emb = cat(freqs, freqs);
    q' = q * cos + rotate_half(q) * sin, rotate_half(x) = cat(-x2, x1)
  - rope_scaling "llama3": transformers' _compute_llama3_parameters; "linear": positions / factor
  - repeat_kv: query head h reads key/value head h // (num_attention_heads / num_key_value_heads)
  - optional q/k/v/o biases (attention_bias) and gate/up/down biases (mlp_bias), when stored
  - LlamaMLP: down_proj(silu(gate_proj x) * up_proj x)
  - lm_head, or embed_tokens when there is no lm_head (tied embeddings)
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ..convert.hf_files import WeightEntry, open_weights, read_json
from ..errors import LlmconvError
from .progress import layer_progress
from .hooks import NO_HOOKS, ForwardHooks, LayerWeights
from .moe import hf_moe_settings, hf_sparse_moe

PROJECTIONS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
NORMS = ("input_layernorm", "post_attention_layernorm")


class HFConfig:
    """The config.json fields the forward pass reads (with transformers' defaults)."""

    def __init__(self, cfg: dict, file: Path):
        try:
            self.hidden = int(cfg["hidden_size"])
            self.n_layers = int(cfg["num_hidden_layers"])
            self.n_heads = int(cfg["num_attention_heads"])
        except (KeyError, TypeError, ValueError) as e:
            raise LlmconvError(f"config.json lacks a usable {e}", file=file) from None
        self.n_kv = int(cfg.get("num_key_value_heads") or self.n_heads)
        self.head_dim = int(cfg.get("head_dim") or self.hidden // self.n_heads)
        self.eps = float(cfg.get("rms_norm_eps", 1e-6))
        params = cfg.get("rope_parameters") if isinstance(cfg.get("rope_parameters"), dict) else {}
        self.theta = float(cfg.get("rope_theta", params.get("rope_theta", 10000.0)))
        scaling = cfg.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
        self.scaling = scaling if scaling and scaling.get("rope_type", scaling.get("type")) != "default" else None
        self.tie = bool(cfg.get("tie_word_embeddings", False))
        self.moe = hf_moe_settings(cfg)  # (experts, experts per token) of a Mixtral; None when dense
        if cfg.get("hidden_act", "silu") != "silu":
            raise LlmconvError(f"hidden_act {cfg.get('hidden_act')!r}: the reference computes silu", file=file)


def hf_reference_logits(
    ckpt_dir: str | Path,
    tokens: list[int],
    hooks: ForwardHooks | None = None,
    progress: bool = False,
    desc: str = "reference",
) -> np.ndarray:
    """Logits [len(tokens), vocab] (float32) of the HF checkpoint in `ckpt_dir`, causal, one pass
    (hooks and progress: see reference.reference_logits)."""
    hooks = hooks or NO_HOOKS
    ckpt_dir = Path(ckpt_dir)
    cfg_file = ckpt_dir / "config.json"
    c = HFConfig(read_json(cfg_file), cfg_file)
    weights, _ = open_weights(ckpt_dir)
    if "model.embed_tokens.weight" not in weights:
        raise LlmconvError("checkpoint has no model.embed_tokens.weight", file=ckpt_dir)
    vocab = weights["model.embed_tokens.weight"].shape[0]
    ids = [int(t) for t in tokens]
    if not ids or not all(0 <= t < vocab for t in ids):
        raise LlmconvError(f"tokens must be non-empty ids in 0..{vocab - 1}", file=ckpt_dir)

    with torch.inference_mode():
        rows = torch.tensor(ids)
        hidden = hooks.w(
            "model.embed_tokens.weight", weights["model.embed_tokens.weight"].get()[rows].to(torch.float32), rows
        )
        cos, sin = rotary_cos_sin(c, len(ids))
        for i in layer_progress(c.n_layers, desc, progress):
            layer = decoder_layer_weights(weights, i, hooks, dense=c.moe is None)
            moe = (
                None
                if c.moe is None
                else (lambda h, i=i: hf_sparse_moe(h, i, *c.moe, lambda n: f32(weights, n), hooks))
            )
            hidden = decoder_layer(hidden, layer, c, cos, sin, moe)
            del layer
        hidden = llama_rms_norm(hidden, hooks.w("model.norm.weight", f32(weights, "model.norm.weight")), c.eps)
        # tie_word_embeddings: transformers points lm_head at the embedding (a stored lm_head is then unused)
        head = "lm_head.weight" if "lm_head.weight" in weights and not c.tie else "model.embed_tokens.weight"
        logits = hooks.x(head, hidden) @ hooks.w(head, f32(weights, head)).T
    return logits.numpy()


def f32(weights: dict[str, WeightEntry], name: str) -> torch.Tensor:
    if name not in weights:
        raise LlmconvError("tensor missing from the checkpoint", tensor=name)
    return weights[name].get().to(torch.float32)


def decoder_layer_weights(
    weights: dict[str, WeightEntry], i: int, hooks: ForwardHooks = NO_HOOKS, dense: bool = True
) -> LayerWeights:
    """Layer i by short name ("self_attn.q_proj"); hooks see the full names (".weight", ".bias").
    `dense=False`: no mlp (a Mixtral layer's experts are read by verify/moe.py, one at a time)."""
    p = f"model.layers.{i}."
    projections = PROJECTIONS if dense else tuple(n for n in PROJECTIONS if not n.startswith("mlp."))
    out: dict[str, torch.Tensor | None] = {
        n: hooks.w(p + n + ".weight", f32(weights, p + n + ".weight")) for n in projections + NORMS
    }
    for n in projections:
        name = p + n + ".bias"
        out[n + ".bias"] = hooks.w(name, f32(weights, name)) if name in weights else None
    return LayerWeights(out, p, hooks)


def linear(x: torch.Tensor, w: dict, name: str) -> torch.Tensor:
    if isinstance(w, LayerWeights):
        x = w.hooks.x(w.prefix + name + ".weight", x)
    y = x @ w[name].T
    return y if w[name + ".bias"] is None else y + w[name + ".bias"]


def llama3_inv_freq(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    """transformers' _compute_llama3_parameters: long wavelengths divided by `factor`, short ones
    kept, the band between interpolated smoothly."""
    factor = float(s.get("factor", 8.0))
    low = float(s.get("low_freq_factor", 1.0))
    high = float(s.get("high_freq_factor", 4.0))
    old_ctx = float(s.get("original_max_position_embeddings", 8192))
    low_freq_wavelen, high_freq_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


def rotary_cos_sin(c: HFConfig, n_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LlamaRotaryEmbedding: cos/sin [n_pos, head_dim] of cat(freqs, freqs), angles in float64."""
    inv_freq = 1.0 / (c.theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float64) / c.head_dim))
    positions = torch.arange(n_pos, dtype=torch.float64)
    kind = c.scaling.get("rope_type", c.scaling.get("type")) if c.scaling else None
    if kind == "llama3":
        inv_freq = llama3_inv_freq(inv_freq, c.scaling)
    elif kind == "linear":
        positions = positions / float(c.scaling["factor"])
    elif kind is not None:
        raise LlmconvError(f"rope_scaling type {kind!r} is not evaluated by the reference (llama3, linear)")
    freqs = positions[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(torch.float32), emb.sin().to(torch.float32)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def llama_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    variance = x.pow(2).mean(-1, keepdim=True)
    return weight * (x * torch.rsqrt(variance + eps))


def self_attention(x: torch.Tensor, w: dict, c: HFConfig, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    T = x.shape[0]
    # [heads, T, head_dim], as transformers lays them out after .transpose(1, 2)
    q = linear(x, w, "self_attn.q_proj").view(T, c.n_heads, c.head_dim).transpose(0, 1)
    k = linear(x, w, "self_attn.k_proj").view(T, c.n_kv, c.head_dim).transpose(0, 1)
    v = linear(x, w, "self_attn.v_proj").view(T, c.n_kv, c.head_dim).transpose(0, 1)
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    n_rep = c.n_heads // c.n_kv
    k = k.repeat_interleave(n_rep, dim=0)  # repeat_kv: head h reads kv head h // n_rep
    v = v.repeat_interleave(n_rep, dim=0)
    scores = (q @ k.transpose(1, 2)) * c.head_dim**-0.5
    causal = torch.full((T, T), float("-inf")).triu(1)
    probs = torch.softmax(scores + causal, dim=-1)
    out = (probs @ v).transpose(0, 1).reshape(T, c.n_heads * c.head_dim)
    return linear(out, w, "self_attn.o_proj")


def mlp(x: torch.Tensor, w: dict) -> torch.Tensor:
    return linear(
        torch.nn.functional.silu(linear(x, w, "mlp.gate_proj")) * linear(x, w, "mlp.up_proj"), w, "mlp.down_proj"
    )


def decoder_layer(x, w, c, cos, sin, moe=None):
    """`moe(h)`: the layer's sparse MoE block in place of the dense mlp."""
    x = x + self_attention(llama_rms_norm(x, w["input_layernorm"], c.eps), w, c, cos, sin)
    h = llama_rms_norm(x, w["post_attention_layernorm"], c.eps)
    return x + (mlp(h, w) if moe is None else moe(h))
