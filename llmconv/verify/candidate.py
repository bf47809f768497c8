"""The candidate side of `llmconv verify`: a numpy LLaMA forward pass over a converted file.

Everything comes from the file itself: the hyperparameters from its metadata, the weights
from its tensors, dequantized by their ggml type with llmconv's kernels. Nothing is taken
from the checkpoint or from `reference.py`; the two forward passes share no model code, so a
mistake in one cannot hide the same mistake in the other.

Memory: weights are dequantized one matrix at a time, in row chunks of about 64 MiB of
float32, used, and dropped. Only the activations ([T, dim]) and the logits stay.

The arithmetic follows llama.cpp's "llama" graph (llm_build_llama):

    x = token_embd[tokens]
    per layer:  h = rms_norm(x) * attn_norm
                q, k, v = h Wq^T, h Wk^T, h Wv^T        (k, v: head_count_kv heads, shared by groups)
                q, k = rope(q), rope(k)                 "normal" mode: pairs (x[2i], x[2i+1])
                x += softmax(q k^T / sqrt(head_dim) + causal mask) v Wo^T
                h = rms_norm(x) * ffn_norm
                x += (silu(h Wgate^T) * (h Wup^T)) Wdown^T
    logits = (rms_norm(x) * output_norm) Wout^T        (Wout = token_embd when output.weight is absent)

RoPE rotates the first rope.dimension_count dims of each head, pair i by the angle
pos * freq_scale * freq_base^(-2i/n_rot) / rope_freqs[i] (rope_freqs.weight: LLaMA 3.1's
frequency factors, 1 when absent; freq_scale = 1/rope.scaling.factor for linear scaling).

`activations="ggml"` also rounds each matrix product's input the way llama.cpp's CPU backend
does before its dot products: to the weight type's "vec_dot type" (f16 for f16 weights, bf16
for bf16, q8_0 blocks for q4_0/q5_0/q8_0, q8_1 for q4_1/q5_1, q8_K for the K-quants). That
is what a user running the file in llama.cpp gets; `activations="f32"` evaluates the
weights alone.

The file's tensors and hyperparameters come from model_file.py.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np
from gguf import GGMLQuantizationType as QT

from ..errors import LlmconvError
from . import moe
from .model_file import FileTensor, LlamaConfig, ModelFile, dequantize, open_model_file, read_config

CHUNK_BYTES = 64 << 20  # float32 bytes of dequantized weight per matmul chunk


# ---- activation rounding (llama.cpp CPU "vec_dot type") ------------------------------------


def _round_f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float32)


def _round_bf16(x: np.ndarray) -> np.ndarray:
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    r = (u + (0x7FFF + ((u >> 16) & 1))) & np.uint32(0xFFFF0000)  # nearest even on the top 16 bits
    return r.view(np.float32)


def _round_q8_0(x: np.ndarray) -> np.ndarray:
    """Blocks of 32: d = amax/127 stored as fp16, q = round-half-even(x * 127/amax)."""
    b = x.reshape(-1, 32)
    amax = np.abs(b).max(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    qs = np.rint(b * inv)
    d = (amax / np.float32(127)).astype(np.float16).astype(np.float32)
    return (qs * d).reshape(x.shape).astype(np.float32)


def _round_q8_k(x: np.ndarray) -> np.ndarray:
    """Blocks of 256: the value of largest magnitude maps to -127 (d = -max/127, float32)."""
    b = x.reshape(-1, 256)
    idx = np.abs(b).argmax(axis=1)
    mx = np.take_along_axis(b, idx[:, None], axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.where(mx != 0, np.float32(-127) / mx, np.float32(0)).astype(np.float32)
        d = np.where(iscale != 0, np.float32(1) / iscale, np.float32(0)).astype(np.float32)
    qs = np.minimum(np.rint(b * iscale), 127)
    return (qs * d).reshape(x.shape).astype(np.float32)


_K_TYPES = {QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K}
_Q8_0_TYPES = {QT.Q4_0, QT.Q5_0, QT.Q8_0, QT.Q4_1, QT.Q5_1}  # q8_1 rounds the values as q8_0 does


def activation_rounding(ggml_type: QT, n: int) -> Callable[[np.ndarray], np.ndarray] | None:
    if ggml_type == QT.F16:
        return _round_f16
    if ggml_type == QT.BF16:
        return _round_bf16
    if ggml_type in _Q8_0_TYPES and n % 32 == 0:
        return _round_q8_0
    if ggml_type in _K_TYPES and n % 256 == 0:
        return _round_q8_k
    return None


# ---- the forward pass ----------------------------------------------------------------------


def matmul_t(x: np.ndarray, t: FileTensor, activations: str | tuple[str, ...]) -> np.ndarray:
    """x [T, n] @ W^T for W = t [m, n], dequantizing W in row chunks. With several activation
    modes, x holds one equal-length stream per mode, stacked: each is rounded its own way, and
    every dequantized chunk serves all of them."""
    m, n = t.shape
    modes = (activations,) if isinstance(activations, str) else tuple(activations)
    rnd = activation_rounding(t.ggml_type, n) if "ggml" in modes else None
    if rnd is not None:
        x = x.copy()
        T = x.shape[0] // len(modes)
        for s, mode in enumerate(modes):
            if mode == "ggml":
                x[s * T : (s + 1) * T] = rnd(x[s * T : (s + 1) * T])
    out = np.empty((x.shape[0], m), np.float32)
    step = max(1, CHUNK_BYTES // (4 * n))
    for r0 in range(0, m, step):
        w = t.rows(r0, min(m, r0 + step))
        np.matmul(x, w.T, out=out[:, r0 : r0 + w.shape[0]])
        del w
    return out


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    ms = np.mean(np.square(x, dtype=np.float64), axis=-1, keepdims=True)
    return (x * (1.0 / np.sqrt(ms + eps)).astype(np.float32)) * weight


def rope_tables(cfg: LlamaConfig, n_pos: int, factors: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [n_pos, n_rot/2] for adjacent-pair ("normal") RoPE."""
    i = np.arange(cfg.n_rot // 2, dtype=np.float64)
    inv_freq = cfg.freq_base ** (-2.0 * i / cfg.n_rot)
    if factors is not None:
        inv_freq = inv_freq / factors.astype(np.float64)
    ang = np.arange(n_pos, dtype=np.float64)[:, None] * cfg.freq_scale * inv_freq[None, :]
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, n_rot: int) -> np.ndarray:
    """x [T, heads, head_dim]: rotate pairs (x[2i], x[2i+1]) of the first n_rot dims."""
    out = x.copy()
    even = x[..., 0:n_rot:2]
    odd = x[..., 1:n_rot:2]
    c, s = cos[:, None, :], sin[:, None, :]
    out[..., 0:n_rot:2] = even * c - odd * s
    out[..., 1:n_rot:2] = even * s + odd * c
    return out


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, n_head_kv: int, chunk: int | None = None) -> np.ndarray:
    """q [T, H, d], k/v [T, Hkv, d] -> [T, H*d]; query head h reads kv head h // (H/Hkv).
    `chunk`: attend only within blocks of that many positions (llama4's chunked attention)."""
    T, H, d = q.shape
    g = H // n_head_kv
    qh = q.transpose(1, 0, 2).reshape(n_head_kv, g * T, d)  # [Hkv, g*T, d]
    kh = k.transpose(1, 2, 0)  # [Hkv, d, T]
    scores = np.matmul(qh, kh) * np.float32(1.0 / math.sqrt(d))  # [Hkv, g*T, T]
    scores = scores.reshape(n_head_kv, g, T, T)
    future = np.triu(np.ones((T, T), bool), 1)
    if chunk:
        pos = np.arange(T) // chunk
        future |= pos[None, :] != pos[:, None]
    scores[..., future] = -np.inf
    scores -= scores.max(axis=-1, keepdims=True)
    p = np.exp(scores)
    p /= p.sum(axis=-1, keepdims=True)
    out = np.matmul(p.reshape(n_head_kv, g * T, T), v.transpose(1, 0, 2))  # [Hkv, g*T, d]
    return out.reshape(H, T, d).transpose(1, 0, 2).reshape(T, H * d)


def embed(t: FileTensor, tokens: np.ndarray) -> np.ndarray:
    """Rows of token_embd for `tokens`, dequantized row by row (never the whole table)."""
    uniq, inv = np.unique(tokens, return_inverse=True)
    rows = dequantize(t.raw[uniq], t)
    return rows[inv].astype(np.float32)


def candidate_logits(
    model: str | Path | ModelFile, tokens, activations: str = "ggml", progress: bool = False
) -> np.ndarray:
    """Logits [T, vocab] (float32) of the file's model for `tokens`, all positions; `progress`
    shows the layers with tqdm."""
    return candidate_streams(model, tokens, (activations,), progress)[activations]


def candidate_streams(
    model: str | Path | ModelFile, tokens, modes: tuple[str, ...] = ("f32", "ggml"), progress: bool = False
) -> dict[str, np.ndarray]:
    """candidate_logits for several activation modes in one pass over the weights: {mode: logits}."""
    from .progress import layer_progress

    if not modes or any(m not in ("ggml", "f32") for m in modes):
        raise ValueError(f"activations must be 'ggml' or 'f32', not {modes!r}")
    mf = model if isinstance(model, ModelFile) else open_model_file(model)
    cfg = read_config(mf)
    tokens = np.asarray(tokens, dtype=np.int64)
    if tokens.ndim != 1 or not len(tokens):
        raise LlmconvError("need a non-empty 1-D token sequence")
    if tokens.min() < 0 or tokens.max() >= cfg.n_vocab:
        raise LlmconvError(f"token id out of range for the file's vocabulary of {cfg.n_vocab}", file=mf.path)
    T, S = len(tokens), len(modes)
    W = mf.tensors
    factors = W["rope_freqs.weight"].array() if "rope_freqs.weight" in W else None
    cos, sin = (np.tile(a, (S, 1)) for a in rope_tables(cfg, T, factors))
    hd = cfg.head_dim
    llama4 = cfg.arch == "llama4"
    if llama4:
        from . import llama4 as l4

        positions = np.tile(np.arange(T), S)

    x = np.tile(embed(W["token_embd.weight"], tokens), (S, 1))  # the streams, stacked [S*T, dim]
    for i in layer_progress(cfg.n_layer, "candidate", progress):
        b = f"blk.{i}."
        h = rms_norm(x, W[b + "attn_norm.weight"].array(), cfg.eps)
        qx = matmul_t(h, W[b + "attn_q.weight"], modes).reshape(S * T, cfg.n_head, hd)
        kx = matmul_t(h, W[b + "attn_k.weight"], modes).reshape(S * T, cfg.n_head_kv, hd)
        vx = matmul_t(h, W[b + "attn_v.weight"], modes).reshape(S * T, cfg.n_head_kv, hd)
        if llama4:
            qx, kx = l4.candidate_qk(qx, kx, i, cfg, cos, sin, positions, apply_rope)
        else:
            qx = apply_rope(qx, cos, sin, cfg.n_rot)
            kx = apply_rope(kx, cos, sin, cfg.n_rot)
        chunk = l4.chunk_of(i) if llama4 else None
        att = np.concatenate(
            [
                attention(
                    qx[s * T : (s + 1) * T], kx[s * T : (s + 1) * T], vx[s * T : (s + 1) * T], cfg.n_head_kv, chunk
                )
                for s in range(S)
            ]
        )
        x = x + matmul_t(att, W[b + "attn_output.weight"], modes)
        h = rms_norm(x, W[b + "ffn_norm.weight"].array(), cfg.eps)
        if llama4:
            x = x + l4.candidate_ffn(h, W, i, cfg, modes, matmul_t)
            continue
        if cfg.n_expert:
            x = x + moe.candidate_moe_ffn(h, W, i, cfg.n_expert, cfg.n_expert_used, modes, matmul_t)
            continue
        gate = matmul_t(h, W[b + "ffn_gate.weight"], modes)
        up = matmul_t(h, W[b + "ffn_up.weight"], modes)
        act = gate / (1.0 + np.exp(-gate)) * up  # silu(gate) * up
        x = x + matmul_t(act.astype(np.float32), W[b + "ffn_down.weight"], modes)
    h = rms_norm(x, W["output_norm.weight"].array(), cfg.eps)
    out = W["token_embd.weight"] if cfg.tied_output else W["output.weight"]
    logits = matmul_t(h, out, modes)
    return {mode: logits[s * T : (s + 1) * T] for s, mode in enumerate(modes)}
