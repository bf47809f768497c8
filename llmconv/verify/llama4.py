"""Llama 4 (text) in verify: the layer pattern and the MoE block, once per side.

  reference (PyTorch, transformers' modeling_llama4 on the checkpoint as stored, HF names):
      rope layers ((i + 1) % 4 != 0): adjacent-pair RoPE (Llama 4's complex rotation, llama3-scaled
      frequencies), then the L2 QK-norm (rms without weight, eps = rms_norm_eps) when use_qk_norm;
      causal attention within chunks of attention_chunk_size positions.
      no-rope layers: q *= log(floor((pos + 1) / floor_scale) + 1) * attn_scale + 1; causal attention.
      MoE layers (every interleave_moe_layer_step-th): s = f Wrouter^T; top-k by s; the chosen
      expert e sees sigmoid(s_e) * f (the score scales the expert's input); out = shared(f) +
      sum_e (silu(x Wgu_e[:, :F]) * x Wgu_e[:, F:]) Wd_e; the fused tensors are read one expert at
      a time. Dense layers: down(silu(gate f) * up f).
  candidate (numpy, llama.cpp's llama4 graph on the file): the same from the llama4 keys and
      tensors (ffn_gate_inp, slices of ffn_*_exps, ffn_*_shexp), with llama.cpp's fixed settings
      (no RoPE every 4th layer, chunk 8192, temperature floor 8192 and scale 0.1, QK-norm unless
      128 experts).

The expected pass names each expert weight `...experts.gate[e]`, `...experts.up[e]`,
`...experts.down[e]`: the slice in llama.cpp's [rows, cols] orientation (the fused tensor's
columns transposed), so that the hooks round it as the file's stacked tensor slice e.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..convert import llama4_config as L4

EXPERT_KINDS = {"gate": "ffn_gate_exps", "up": "ffn_up_exps", "down": "ffn_down_exps"}


# ---- file side -----------------------------------------------------------------------------


def file_settings(mf, cfg) -> None:
    """The llama4 keys the graph reads, onto the candidate's config."""
    cfg.moe_step = int(mf.get(mf.arch_key("interleave_moe_layer_step"), 0) or 0)
    cfg.n_ff_exp = int(mf.get(mf.arch_key("expert_feed_forward_length"), 0) or 0)


def expected_shapes(cfg, i: int) -> dict[str, tuple[int, ...]]:
    """Layer i's feed-forward tensors in a llama4 file."""
    b, d, E = f"blk.{i}.", cfg.n_embd, cfg.n_expert
    if L4.is_moe_layer(i, cfg.moe_step):
        f = cfg.n_ff_exp
        return {
            b + "ffn_gate_inp.weight": (E, d),
            b + "ffn_gate_exps.weight": (E, f, d),
            b + "ffn_up_exps.weight": (E, f, d),
            b + "ffn_down_exps.weight": (E, d, f),
            b + "ffn_gate_shexp.weight": (f, d),
            b + "ffn_up_shexp.weight": (f, d),
            b + "ffn_down_shexp.weight": (d, f),
        }
    ff = cfg.n_ff
    return {b + "ffn_gate.weight": (ff, d), b + "ffn_up.weight": (ff, d), b + "ffn_down.weight": (d, ff)}


def candidate_qk(q: np.ndarray, k: np.ndarray, layer: int, cfg, cos, sin, positions: np.ndarray, apply_rope):
    """q, k [S*T, heads, hd] after llama.cpp's llama4 attention input steps."""
    if L4.uses_rope(layer):
        q, k = apply_rope(q, cos, sin, cfg.n_rot), apply_rope(k, cos, sin, cfg.n_rot)
        if cfg.n_expert != L4.NO_QK_NORM_EXPERTS:
            q, k = _l2(q, cfg.eps), _l2(k, cfg.eps)
        return q, k
    return q * temperature(positions)[:, None, None], k


def _l2(x: np.ndarray, eps: float) -> np.ndarray:
    ms = np.mean(np.square(x, dtype=np.float64), axis=-1, keepdims=True)
    return (x * (1.0 / np.sqrt(ms + eps)).astype(np.float32)).astype(np.float32)


def temperature(positions: np.ndarray) -> np.ndarray:
    """llama.cpp's attention temperature of the no-RoPE layers (1 below position 8191)."""
    pos = positions.astype(np.float64)
    return (np.log(np.floor((pos + 1.0) / L4.TEMP_FLOOR_SCALE) + 1.0) * L4.TEMP_SCALE + 1.0).astype(np.float32)


def chunk_of(layer: int) -> int | None:
    return L4.CHUNK_SIZE if L4.uses_rope(layer) else None


def candidate_ffn(h: np.ndarray, W: dict, layer: int, cfg, modes, matmul_t) -> np.ndarray:
    """A llama4 layer's feed-forward on h [S*T, dim]: dense, or routed experts + shared expert."""
    from .moe import expert_slice

    b = f"blk.{layer}."

    def swiglu(x, gate, up, down):
        g, u = matmul_t(x, gate, modes), matmul_t(x, up, modes)
        return matmul_t((g / (1.0 + np.exp(-g)) * u).astype(np.float32), down, modes)

    if not L4.is_moe_layer(layer, cfg.moe_step):
        return swiglu(h, W[b + "ffn_gate.weight"], W[b + "ffn_up.weight"], W[b + "ffn_down.weight"])
    out = swiglu(h, W[b + "ffn_gate_shexp.weight"], W[b + "ffn_up_shexp.weight"], W[b + "ffn_down_shexp.weight"])
    logits = matmul_t(h, W[b + "ffn_gate_inp.weight"], modes)
    top_e = np.argsort(-logits, axis=-1, kind="stable")[:, : cfg.n_expert_used]
    weight = 1.0 / (1.0 + np.exp(-np.take_along_axis(logits, top_e, axis=-1).astype(np.float64)))
    for e in range(cfg.n_expert):
        rows, slot = np.nonzero(top_e == e)
        if not len(rows):
            continue
        # every row runs (activation rounding works on whole streams), the chosen rows are kept
        x = np.zeros_like(h)
        x[rows] = h[rows] * weight[rows, slot, None].astype(np.float32)
        y = swiglu(x, *(expert_slice(W[b + f"ffn_{k}_exps.weight"], e) for k in ("gate", "up", "down")))
        out[rows] += y[rows]
    return out


# ---- reference side (checkpoint) -----------------------------------------------------------------


def expert_names(source) -> dict[str, tuple[str, int]]:
    """The expected pass's expert weight names -> (stacked GGUF tensor, expert index)."""
    h = source.hparams
    if getattr(h, "arch", "llama") != L4.ARCH:
        return {}
    out = {}
    for t in source.tensors:
        if t.parts is not None and t.name.startswith("blk."):
            layer, kind = int(t.name.split(".")[1]), t.name.split(".")[2]
            short = next(k for k, v in EXPERT_KINDS.items() if v == kind)
            prefix = t.source_name.split("feed_forward.")[0]
            out |= {f"{prefix}feed_forward.experts.{short}[{e}]": (t.name, e) for e in range(len(t.parts))}
            del layer
    return out


def reference_moe(f: torch.Tensor, cfg, prefix: str, weights, hooks) -> torch.Tensor:
    """transformers' Llama4TextMoe on f [T, dim] (float32); `prefix` ends in "feed_forward.";
    `weights` maps checkpoint names to WeightEntry."""
    ff = prefix
    F = cfg.ffn_moe

    def w(name):
        return hooks.w(name, weights[name].get().to(torch.float32))

    def mm(x, name, wt):
        return hooks.x(name, x) @ wt.T

    shared = {k: w(f"{ff}shared_expert.{k}_proj.weight") for k in ("gate", "up", "down")}
    out = _swiglu_named(f, ff + "shared_expert.", shared, mm)
    scores = mm(f, ff + "router.weight", w(ff + "router.weight"))
    top_s, top_e = torch.topk(scores, cfg.n_expert_used, dim=-1)
    gate_up, down = weights[ff + "experts.gate_up_proj"], weights[ff + "experts.down_proj"]
    for e in range(cfg.n_expert):
        gu = (gate_up.get_expert(e) if gate_up.get_expert else gate_up.get()[e]).to(torch.float32)
        dn = (down.get_expert(e) if down.get_expert else down.get()[e]).to(torch.float32)
        # llama.cpp's orientation [rows, cols]: x @ W^T == x @ fused slice
        ws = {"gate": gu[:, :F].T.contiguous(), "up": gu[:, F:].T.contiguous(), "down": dn.T.contiguous()}
        ws = {k: hooks.w(f"{ff}experts.{k}[{e}]", v) for k, v in ws.items()}
        rows, slot = torch.where(top_e == e)
        if not len(rows):
            continue
        x = f[rows] * torch.sigmoid(top_s[rows, slot])[:, None]
        g = mm(x, f"{ff}experts.gate[{e}]", ws["gate"])
        u = mm(x, f"{ff}experts.up[{e}]", ws["up"])
        out.index_add_(0, rows, mm(torch.nn.functional.silu(g) * u, f"{ff}experts.down[{e}]", ws["down"]))
    return out


def _swiglu_named(x, prefix, ws, mm):
    g = mm(x, prefix + "gate_proj.weight", ws["gate"])
    u = mm(x, prefix + "up_proj.weight", ws["up"])
    return mm(torch.nn.functional.silu(g) * u, prefix + "down_proj.weight", ws["down"])


def reference_attention(x, w, cfg, layer: int, cos, sin, mm) -> torch.Tensor:
    """transformers' Llama4TextAttention (eager) on x [T, dim]: `w` holds the layer's projections,
    `mm(x, short)` is x @ W[short]^T with the hooks; cos/sin [T, hd/2] of the llama3 frequencies."""
    T = x.shape[0]
    q = mm(x, "self_attn.q_proj").view(T, cfg.n_heads, cfg.head_dim)
    k = mm(x, "self_attn.k_proj").view(T, cfg.n_kv_heads, cfg.head_dim)
    v = mm(x, "self_attn.v_proj").view(T, cfg.n_kv_heads, cfg.head_dim)
    rope = bool(cfg.no_rope_layers[layer])
    if rope:
        q, k = _complex_rope(q, cos, sin), _complex_rope(k, cos, sin)
        if cfg.use_qk_norm:
            q, k = _l2_torch(q, cfg.eps), _l2_torch(k, cfg.eps)
    elif cfg.temperature_tuning:
        pos = torch.arange(T, dtype=torch.float32)
        q = q * (torch.log(torch.floor((pos + 1.0) / cfg.floor_scale) + 1.0) * cfg.attn_scale + 1.0)[:, None, None]
    rep = cfg.n_heads // cfg.n_kv_heads
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = torch.einsum("thd,khd->htk", q, k) / math.sqrt(cfg.head_dim)
    pos = torch.arange(T)
    masked = pos[None, :] > pos[:, None]
    if rope and cfg.chunk:
        masked |= (pos[None, :] // cfg.chunk) != (pos[:, None] // cfg.chunk)
    probs = torch.softmax(scores.masked_fill(masked[None], float("-inf")), dim=-1)
    return mm(torch.einsum("htk,khd->thd", probs, v).reshape(T, -1), "self_attn.o_proj")


def _complex_rope(x, cos, sin):
    """Llama 4's apply_rotary_emb: (x[2j], x[2j+1]) as a complex number times e^(i pos f_j)."""
    a, b = x[..., 0::2], x[..., 1::2]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2)


def _l2_torch(x, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class RefConfig:
    """The text model's settings as transformers reads them from config.json (its defaults)."""

    def __init__(self, config: dict, file):
        from ..errors import LlmconvError

        t = config.get("text_config", config)
        self.prefix = "language_model.model." if "text_config" in config else "model."
        self.lm_head = ("language_model." if "text_config" in config else "") + "lm_head.weight"
        try:
            self.n_layers, self.n_heads = int(t["num_hidden_layers"]), int(t["num_attention_heads"])
            self.ffn_moe, self.n_expert = int(t["intermediate_size"]), int(t["num_local_experts"])
        except (KeyError, TypeError, ValueError) as e:
            raise LlmconvError(f"config.json text_config lacks a usable {e}", file=file) from None
        self.n_kv_heads = int(t.get("num_key_value_heads") or self.n_heads)
        self.head_dim = int(t.get("head_dim") or 128)
        self.eps = float(t.get("rms_norm_eps", 1e-5))
        self.theta = float(t.get("rope_theta", 500000.0))
        self.scaling = t.get("rope_scaling") or None
        self.n_expert_used = int(t.get("num_experts_per_tok", 1))
        step = int(t.get("interleave_moe_layer_step", 1))
        self.moe_layers = set(t.get("moe_layers") or range(step - 1, self.n_layers, step))
        interval = int(t.get("no_rope_layer_interval", 4))
        self.no_rope_layers = list(
            t.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(self.n_layers)]
        )
        self.use_qk_norm = bool(t.get("use_qk_norm", True))
        self.temperature_tuning = bool(t.get("attn_temperature_tuning", 4))
        self.floor_scale, self.attn_scale = float(t.get("floor_scale", 8192)), float(t.get("attn_scale", 0.1))
        self.chunk = t.get("attention_chunk_size", 8192)
        self.tie = bool(t.get("tie_word_embeddings", config.get("tie_word_embeddings", False)))


def llama4_reference_logits(
    ckpt_dir, tokens: list[int], hooks=None, progress: bool = False, desc: str = "reference"
) -> np.ndarray:
    """Logits [T, vocab] (float32) of a Llama 4 checkpoint, one layer's weights at a time (experts
    one at a time)."""
    from pathlib import Path

    from ..convert.hf_files import open_weights, read_json
    from ..errors import LlmconvError
    from .hooks import NO_HOOKS
    from .progress import layer_progress

    hooks = hooks or NO_HOOKS
    ckpt_dir = Path(ckpt_dir)
    cfg = RefConfig(read_json(ckpt_dir / "config.json"), ckpt_dir / "config.json")
    weights, _ = open_weights(ckpt_dir)
    embd = cfg.prefix + "embed_tokens.weight"
    if embd not in weights:
        raise LlmconvError("checkpoint has no text embedding", file=ckpt_dir, tensor=embd)
    ids = [int(t) for t in tokens]
    if not ids or not all(0 <= t < weights[embd].shape[0] for t in ids):
        raise LlmconvError(f"tokens must be non-empty ids in 0..{weights[embd].shape[0] - 1}", file=ckpt_dir)

    def f32(name):
        if name not in weights:
            raise LlmconvError("tensor missing from the checkpoint", file=ckpt_dir, tensor=name)
        return hooks.w(name, weights[name].get().to(torch.float32))

    with torch.inference_mode():
        rows = torch.tensor(ids)
        x = hooks.w(embd, weights[embd].get()[rows].to(torch.float32), rows)
        cos, sin = rope_cos_sin(cfg, len(ids))
        for i in layer_progress(cfg.n_layers, desc, progress):
            lw = layer_weights(cfg, i, f32)
            x = x + layer_attention(x, lw, cfg, i, cos, sin, hooks)
            x = x + layer_ffn(rms(x, lw["post_attention_layernorm"], cfg.eps), cfg, i, weights, hooks, f32)
            del lw
        x = rms(x, f32(cfg.prefix + "norm.weight"), cfg.eps)
        head = cfg.lm_head if cfg.lm_head in weights and not cfg.tie else embd
        return (hooks.x(head, x) @ f32(head).T).numpy()


LAYER_WEIGHTS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "input_layernorm",
    "post_attention_layernorm",
)


def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def layer_weights(cfg: RefConfig, i: int, f32) -> dict:
    """Layer i's attention weights and norms by short name (`f32(name)`: a checkpoint tensor as
    float32, through the hooks); its feed-forward is read by layer_ffn."""
    p = f"{cfg.prefix}layers.{i}."
    return {n: f32(p + n + ".weight") for n in LAYER_WEIGHTS}


def layer_attention(x, lw: dict, cfg: RefConfig, i: int, cos, sin, hooks) -> torch.Tensor:
    """Layer i's attention output on x [T, dim] (one sequence from position 0), before the residual."""
    p = f"{cfg.prefix}layers.{i}."
    mm = lambda v, short: hooks.x(p + short + ".weight", v) @ lw[short].T  # noqa: E731
    return reference_attention(rms(x, lw["input_layernorm"], cfg.eps), lw, cfg, i, cos, sin, mm)


def layer_ffn(f, cfg: RefConfig, i: int, weights, hooks, f32) -> torch.Tensor:
    """Layer i's feed-forward on the normed f [T, dim] (rows independent): MoE or dense."""
    p = f"{cfg.prefix}layers.{i}."
    if i in cfg.moe_layers:
        return reference_moe(f, cfg, p + "feed_forward.", weights, hooks)
    ws = {k: f32(f"{p}feed_forward.{k}_proj.weight") for k in ("gate", "up", "down")}
    return _swiglu_named(f, p + "feed_forward.", ws, lambda v, name, wt: hooks.x(name, v) @ wt.T)


def rope_cos_sin(cfg: RefConfig, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE's cos and sin for positions 0..n-1 (with llama3 scaling when the config asks for it)."""
    from .reference_hf import llama3_inv_freq

    inv = 1.0 / cfg.theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim)
    if cfg.scaling and cfg.scaling.get("rope_type", cfg.scaling.get("type")) not in (None, "default"):
        inv = llama3_inv_freq(inv, cfg.scaling)
    ang = torch.arange(n, dtype=torch.float64)[:, None] * inv[None, :]
    return ang.cos().to(torch.float32), ang.sin().to(torch.float32)
