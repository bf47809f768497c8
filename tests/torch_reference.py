"""An independent float64 forward pass over a Meta-layout state dict, for tests of checkpoint
layouts llmconv's verify may not know yet (head_dim != dim / n_heads). Written from the LLaMA
definition, apart from llmconv.verify and the fixture generator:

    h = embed[tokens]
    per layer:  a = rmsnorm(h) ; q, k, v = a Wq^T, a Wk^T, a Wv^T  (heads of head_dim rows)
                q, k rotated on adjacent pairs (2i, 2i+1) by pos * theta^(-2i/head_dim)
                h += softmax(q k^T / sqrt(head_dim) + causal) v  Wo^T   (kv head j serves
                     query heads j*rep .. j*rep+rep-1)
                h += W2 (silu(W1 rmsnorm(h)) * W3 rmsnorm(h))
    logits = rmsnorm(h) Wout^T     (Wout = embed when the checkpoint ties them)
"""

from __future__ import annotations

import numpy as np
import torch


def _rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def _rotate_adjacent(x: torch.Tensor, theta: float) -> torch.Tensor:
    """x [T, heads, hd]: pair (x[2i], x[2i+1]) rotated by angle pos * theta^(-2i/hd)."""
    T, _, hd = x.shape
    inv = theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None, :]  # [T, hd/2]
    cos, sin = torch.cos(ang)[:, None, :], torch.sin(ang)[:, None, :]
    even, odd = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


def meta_logits(
    sd: dict[str, torch.Tensor],
    tokens: list[int],
    *,
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    norm_eps: float,
    rope_theta: float,
) -> np.ndarray:
    """float64 logits [len(tokens), vocab] of a Meta-named state dict."""
    w = {k: v.to(torch.float64) for k, v in sd.items()}
    n_layers = sum(1 for k in w if k.endswith("attention.wq.weight"))
    T = len(tokens)
    h = w["tok_embeddings.weight"][torch.tensor(tokens)]
    causal = torch.triu(torch.full((T, T), float("-inf"), dtype=torch.float64), diagonal=1)
    rep = n_heads // n_kv_heads
    for i in range(n_layers):
        p = f"layers.{i}."
        a = _rmsnorm(h, w[p + "attention_norm.weight"], norm_eps)
        q = (a @ w[p + "attention.wq.weight"].T).view(T, n_heads, head_dim)
        k = (a @ w[p + "attention.wk.weight"].T).view(T, n_kv_heads, head_dim)
        v = (a @ w[p + "attention.wv.weight"].T).view(T, n_kv_heads, head_dim)
        q, k = _rotate_adjacent(q, rope_theta), _rotate_adjacent(k, rope_theta)
        heads = []
        for j in range(n_heads):
            kv = j // rep
            s = q[:, j, :] @ k[:, kv, :].T / head_dim**0.5 + causal
            heads.append(torch.softmax(s, dim=-1) @ v[:, kv, :])
        h = h + torch.cat(heads, dim=-1) @ w[p + "attention.wo.weight"].T
        f = _rmsnorm(h, w[p + "ffn_norm.weight"], norm_eps)
        g = f @ w[p + "feed_forward.w1.weight"].T
        h = h + (g * torch.sigmoid(g) * (f @ w[p + "feed_forward.w3.weight"].T)) @ w[p + "feed_forward.w2.weight"].T
    out = w.get("output.weight", w["tok_embeddings.weight"])
    return (_rmsnorm(h, w["norm.weight"], norm_eps) @ out.T).numpy()
