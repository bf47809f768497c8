"""The float32 reference: a plain PyTorch LLaMA forward pass over the original checkpoint.

reference_logits() dispatches on the directory's format: a Meta checkpoint (params.json) runs
here, in Meta's layout; a Hugging Face one (config.json) runs in reference_hf.py, in HF's
layout (rotate-half RoPE on q_proj/k_proj as stored); Mistral's own layout (params.json +
consolidated*.safetensors, Meta's names and row order) runs this pass too (below).

Converted and quantized files are judged by how far their logits are from these. So this
module reads only the source checkpoint (through llmconv.convert.meta), never a GGUF file, and
shares no model code with the side that runs GGUF files: one bug cannot hide in both.

It streams: one layer's weights are loaded and cast to float32, every position goes through
that layer, and the copies are dropped before the next layer is loaded. Peak memory is about
one layer plus the embedding and output matrices, so a 7B model fits in a few GB.

Meta's conventions, as in their model.py:
  - RMSNorm: x / sqrt(mean(x^2) + norm_eps) * weight
  - rotary embedding on adjacent pairs (x[2i], x[2i+1]), angle = pos * rope_theta^(-2i/head_dim),
    the frequencies rescaled by Meta's apply_scaling when params.json sets use_scaled_rope (3.1+)
  - grouped-query attention: query head h reads key/value head h // (n_heads / n_kv_heads)
  - SwiGLU feed-forward: w2(silu(w1 x) * w3 x)
  - output.weight, or the embedding when a checkpoint ties them
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..convert.hparams import LlamaHParams
from ..convert.meta import MetaCheckpoint, open_meta_checkpoint
from ..errors import LlmconvError
from .hooks import NO_HOOKS, ForwardHooks, LayerWeights
from .progress import layer_progress

LAYER_TENSORS = (
    "attention_norm.weight",
    "attention.wq.weight",
    "attention.wk.weight",
    "attention.wv.weight",
    "attention.wo.weight",
    "ffn_norm.weight",
    "feed_forward.w1.weight",
    "feed_forward.w2.weight",
    "feed_forward.w3.weight",
)


def reference_logits(
    ckpt_dir: str | Path,
    tokens: list[int],
    hooks: ForwardHooks | None = None,
    progress: bool = False,
    desc: str = "reference",
) -> np.ndarray:
    """Logits [len(tokens), vocab] (float32) of the checkpoint in `ckpt_dir` on `tokens`,
    every position attending causally to the ones before it (no cache, one pass). `hooks`
    replace weights or activations (ForwardHooks); `progress` shows the layers with tqdm."""
    from ..convert.sources import detect_format

    if detect_format(Path(ckpt_dir)) == "hf":
        from ..convert.hf_files import read_json
        from ..convert.llama4_config import is_llama4
        from .reference_hf import hf_reference_logits

        if is_llama4(read_json(Path(ckpt_dir) / "config.json")):
            from .llama4 import llama4_reference_logits

            return llama4_reference_logits(ckpt_dir, tokens, hooks=hooks, progress=progress, desc=desc)
        return hf_reference_logits(ckpt_dir, tokens, hooks=hooks, progress=progress, desc=desc)
    if detect_format(Path(ckpt_dir)) == "mistral":
        return mistral_reference_logits(ckpt_dir, tokens, hooks=hooks, progress=progress, desc=desc)
    return meta_reference_logits(ckpt_dir, tokens, hooks=hooks, progress=progress, desc=desc)


def meta_head_dim(ckpt: MetaCheckpoint) -> int:
    """params.json `head_dim` (Mistral's format, e.g. Nemo: 128 with dim 5120 and 32 heads), else dim / n_heads."""
    return int(ckpt.hparams.head_dim)


def meta_reference_logits(
    ckpt_dir: str | Path,
    tokens: list[int],
    hooks: ForwardHooks | None = None,
    progress: bool = False,
    desc: str = "reference",
) -> np.ndarray:
    """reference_logits for a Meta checkpoint (params.json + consolidated.NN.pth)."""
    hooks = hooks or NO_HOOKS
    ckpt = open_meta_checkpoint(ckpt_dir)
    h = ckpt.hparams
    hd = meta_head_dim(ckpt)
    ids = _token_tensor(tokens, h.vocab_size, ckpt.path)
    with torch.inference_mode():
        # index the (bf16, mmapped) embedding first: only len(tokens) rows become float32
        x = hooks.w("tok_embeddings.weight", ckpt.load("tok_embeddings.weight")[ids].to(torch.float32), ids)
        cos, sin = rope_tables(hd, len(ids), h.rope_theta, llama3_scaling(ckpt.params))
        for i in layer_progress(h.n_layers, desc, progress):
            w = layer_weights(ckpt, i, hooks)
            x = transformer_block(x, w, h, cos, sin)
            del w  # free this layer's float32 copies before loading the next
        x = rms_norm(x, hooks.w("norm.weight", load_f32(ckpt, "norm.weight")), h.norm_eps)
        out_name = "output.weight" if "output.weight" in ckpt.names else "tok_embeddings.weight"
        logits = hooks.x(out_name, x) @ hooks.w(out_name, load_f32(ckpt, out_name)).T
    return logits.numpy()


def load_f32(ckpt, name: str) -> torch.Tensor:
    return ckpt.load(name).to(torch.float32)


def layer_weights(ckpt, i: int, hooks: ForwardHooks = NO_HOOKS, dense: bool = True) -> LayerWeights:
    """Layer i by short name; `ckpt`: a MetaCheckpoint or SafetensorsWeights.
    `dense=False`: no w1/w2/w3 (a Mixtral layer's experts are read by moe.py, one at a time)."""
    prefix = f"layers.{i}."
    shorts = LAYER_TENSORS if dense else tuple(n for n in LAYER_TENSORS if not n.startswith("feed_forward."))
    return LayerWeights(
        {short: hooks.w(prefix + short, load_f32(ckpt, prefix + short)) for short in shorts}, prefix, hooks
    )


def llama3_scaling(params: dict) -> dict | None:
    """LLaMA 3.1+ (params.json `use_scaled_rope`): the constants of Meta's apply_scaling.
    The scale factor is `rope_scaling_factor` when given (LLaMA 3.2 small models), else 8."""
    if not params.get("use_scaled_rope"):
        return None
    return {
        "scale": float(params.get("rope_scaling_factor") or 8.0),
        "low": 1.0,
        "high": float(params.get("high_freq_factor") or 4.0),
        "old_context": 8192.0,
    }


def scale_frequencies(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    """Meta's apply_scaling (llama-models, model.py): keep short wavelengths, divide long ones
    by the scale, and blend linearly in 1/wavelength between the two bands."""
    wavelen = 2 * torch.pi / inv_freq
    smooth = (s["old_context"] / wavelen - s["low"]) / (s["high"] - s["low"])
    blended = (1 - smooth) * inv_freq / s["scale"] + smooth * inv_freq
    out = torch.where(wavelen > s["old_context"] / s["low"], inv_freq / s["scale"], blended)
    return torch.where(wavelen < s["old_context"] / s["high"], inv_freq, out)


def rope_tables(
    head_dim: int, n_pos: int, theta: float, scaling: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of pos * theta^(-2i/head_dim), [n_pos, 1, head_dim/2]. Angles are computed
    in float64 so the reference carries no error of its own at long positions."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if scaling is not None:
        inv_freq = scale_frequencies(inv_freq, scaling)
    angle = torch.arange(n_pos, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return angle.cos().to(torch.float32)[:, None, :], angle.sin().to(torch.float32)[:, None, :]


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim]: rotate each adjacent pair (x[2i], x[2i+1]) by its angle."""
    even, odd = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps) * weight


def attention(x: torch.Tensor, w: LayerWeights, h: LlamaHParams, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    T, hd = x.shape[0], cos.shape[-1] * 2  # head size from the RoPE tables (may differ from dim/heads)
    group = h.n_heads // h.n_kv_heads  # query heads sharing one key/value head
    q = rotate_pairs(w.mm(x, "attention.wq.weight").view(T, h.n_heads, hd), cos, sin)
    k = rotate_pairs(w.mm(x, "attention.wk.weight").view(T, h.n_kv_heads, hd), cos, sin)
    v = w.mm(x, "attention.wv.weight").view(T, h.n_kv_heads, hd)
    # query heads grouped as [kv_head, member]: head h = kv_head * group + member
    q = q.view(T, h.n_kv_heads, group, hd).permute(1, 2, 0, 3)  # [kv, group, T, hd]
    k = k.permute(1, 0, 2)[:, None]  # [kv, 1, T, hd]
    v = v.permute(1, 0, 2)[:, None]
    scores = q @ k.transpose(-1, -2) / hd**0.5  # [kv, group, T, T]
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    scores = scores.masked_fill(future, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = (probs @ v).permute(2, 0, 1, 3).reshape(T, h.n_heads * hd)  # back to [T, head * hd]
    return w.mm(out, "attention.wo.weight")


def feed_forward(x: torch.Tensor, w: LayerWeights) -> torch.Tensor:
    gate = w.mm(x, "feed_forward.w1.weight")
    up = w.mm(x, "feed_forward.w3.weight")
    return w.mm(gate * torch.sigmoid(gate) * up, "feed_forward.w2.weight")


def transformer_block(x, w, h, cos, sin):
    x = x + attention(rms_norm(x, w["attention_norm.weight"], h.norm_eps), w, h, cos, sin)
    return x + feed_forward(rms_norm(x, w["ffn_norm.weight"], h.norm_eps), w)


def _token_tensor(tokens, vocab_size: int, path: Path) -> torch.Tensor:
    ids = list(tokens)
    if not ids:
        raise LlmconvError("no tokens to run", file=path)
    bad = [t for t in ids if not isinstance(t, (int, np.integer)) or not 0 <= t < vocab_size]
    if bad:
        raise LlmconvError(f"token {bad[0]!r} is outside the vocabulary (0..{vocab_size - 1})", file=path)
    return torch.tensor([int(t) for t in ids], dtype=torch.long)


# ---- Mistral's own layout: params.json + consolidated*.safetensors ----------------------------
#
# Mistral 7B, Nemo and Mixtral as Mistral publishes them beside the Hugging Face layout. Names and
# Q/K row order are Meta's, so the pass above runs on weights read from safetensors; a Mixtral's
# feed-forward (params.json `moe`) is moe.py's sparse block under `layers.N.feed_forward.`.
# params.json is read here on its own terms (the converter's checks run in open_source, which
# verify and imatrix call first).


class SafetensorsWeights:
    """Checkpoint tensors by name from convert.hf_files.open_weights entries, with the
    MetaCheckpoint `load` that reference.py's layer_weights reads through."""

    def __init__(self, entries: dict):
        self.entries = entries

    def load(self, name: str) -> torch.Tensor:
        if name not in self.entries:
            raise LlmconvError("tensor missing from the checkpoint", tensor=name)
        return self.entries[name].get()

    def load_f32(self, name: str) -> torch.Tensor:
        return self.load(name).to(torch.float32)


@dataclass
class MistralParams:
    """What the pass reads from params.json (the converter's defaults where it says nothing)."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    norm_eps: float
    rope_theta: float
    vocab_size: int
    n_expert: int = 0  # params.json `moe`: experts per layer (0: dense)
    n_expert_used: int = 0


def mistral_params(ckpt_dir: Path, weights: SafetensorsWeights) -> MistralParams:
    from ..convert.meta_params import read_params, stated_head_dim
    from ..convert.moe import mistral_moe_config

    params = read_params(ckpt_dir)
    pfile = ckpt_dir / "params.json"
    moe = mistral_moe_config(params, pfile)
    n_heads = params["n_heads"]
    return MistralParams(
        dim=params["dim"],
        n_layers=params["n_layers"],
        n_heads=n_heads,
        n_kv_heads=params.get("n_kv_heads") or n_heads,
        head_dim=stated_head_dim(params, pfile) or params["dim"] // n_heads,
        norm_eps=float(params.get("norm_eps", 1e-5)),
        rope_theta=float(params.get("rope_theta", 10000.0)),
        vocab_size=weights.entries["tok_embeddings.weight"].shape[0]
        if "tok_embeddings.weight" in weights.entries
        else 0,
        n_expert=moe.n_expert if moe else 0,
        n_expert_used=moe.n_expert_used if moe else 0,
    )


def open_mistral(ckpt_dir: str | Path) -> tuple[SafetensorsWeights, MistralParams]:
    from ..convert.hf_files import open_weights

    entries, _ = open_weights(Path(ckpt_dir), kinds=("consolidated",))
    weights = SafetensorsWeights(entries)
    return weights, mistral_params(Path(ckpt_dir), weights)


def mistral_layer(x: torch.Tensor, w, h: MistralParams, i: int, cos, sin, ckpt, hooks) -> torch.Tensor:
    """Layer i on x [T, dim]; `w` from reference.layer_weights(ckpt, i, hooks, dense=not h.n_expert)."""
    if not h.n_expert:
        return transformer_block(x, w, h, cos, sin)
    x = x + mistral_attention(x, w, h, cos, sin)
    return x + mistral_moe(rms_norm(x, w["ffn_norm.weight"], h.norm_eps), h, i, ckpt, hooks)


def mistral_attention(x, w, h: MistralParams, cos, sin) -> torch.Tensor:
    return attention(rms_norm(x, w["attention_norm.weight"], h.norm_eps), w, h, cos, sin)


def mistral_moe(f, h: MistralParams, i: int, ckpt, hooks) -> torch.Tensor:
    from .moe import MISTRAL_MOE_PREFIX, sparse_moe

    return sparse_moe(f, MISTRAL_MOE_PREFIX.format(i=i), h.n_expert, h.n_expert_used, ckpt.load_f32, hooks)


def mistral_reference_logits(
    ckpt_dir: str | Path,
    tokens: list[int],
    hooks: ForwardHooks | None = None,
    progress: bool = False,
    desc: str = "reference",
) -> np.ndarray:
    """reference_logits (reference.py) for Mistral's own layout."""
    hooks = hooks or NO_HOOKS
    ckpt, h = open_mistral(ckpt_dir)
    ids = _token_tensor(tokens, h.vocab_size, Path(ckpt_dir))
    with torch.inference_mode():
        x = hooks.w("tok_embeddings.weight", ckpt.load("tok_embeddings.weight")[ids].to(torch.float32), ids)
        cos, sin = rope_tables(h.head_dim, len(ids), h.rope_theta)
        for i in layer_progress(h.n_layers, desc, progress):
            w = layer_weights(ckpt, i, hooks, dense=not h.n_expert)
            x = mistral_layer(x, w, h, i, cos, sin, ckpt, hooks)
            del w
        x = rms_norm(x, hooks.w("norm.weight", ckpt.load_f32("norm.weight")), h.norm_eps)
        out_name = "output.weight" if "output.weight" in ckpt.entries else "tok_embeddings.weight"
        logits = hooks.x(out_name, x) @ hooks.w(out_name, ckpt.load_f32(out_name)).T
    return logits.numpy()
