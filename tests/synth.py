"""Synthetic Meta-format checkpoints for tests: random weights scaled like a real model's,
with the fixture's SentencePiece tokenizer (vocab 512). Deterministic for a given seed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "fixtures" / "tokenizer.model"

# Text that exercises the fixture tokenizer: spaces, digits, non-ASCII (byte fallback), code.
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "  Two leading spaces, and trailing ones.  ",
    "Numbers: 3.14159, 2024-11-24, and 1,000,000!",
    "Ünïcödé, naïve café, 東京, and an emoji 🙂 fall back to bytes.",
    "def f(x):\n    return x * 2  # code\n\tTabbed line",
]
VOCAB = 512


def meta_state_dict(
    dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn=192, vocab=VOCAB, seed=0, dtype=torch.bfloat16, head_dim=None
) -> dict[str, torch.Tensor]:
    """`head_dim` other than dim / n_heads gives Mistral Nemo's kind of attention shapes."""
    g = torch.Generator().manual_seed(seed)
    hd = head_dim or dim // n_heads

    def w(rows, cols):
        return (torch.randn(rows, cols, generator=g) * cols**-0.5).to(dtype)

    sd = {"tok_embeddings.weight": w(vocab, dim)}
    for i in range(n_layers):
        p = f"layers.{i}."
        sd[p + "attention.wq.weight"] = w(n_heads * hd, dim)
        sd[p + "attention.wk.weight"] = w(n_kv_heads * hd, dim)
        sd[p + "attention.wv.weight"] = w(n_kv_heads * hd, dim)
        sd[p + "attention.wo.weight"] = w(dim, n_heads * hd)
        sd[p + "feed_forward.w1.weight"] = w(ffn, dim)
        sd[p + "feed_forward.w2.weight"] = w(dim, ffn)
        sd[p + "feed_forward.w3.weight"] = w(ffn, dim)
        sd[p + "attention_norm.weight"] = (1 + 0.1 * torch.randn(dim, generator=g)).to(dtype)
        sd[p + "ffn_norm.weight"] = (1 + 0.1 * torch.randn(dim, generator=g)).to(dtype)
    sd["norm.weight"] = (1 + 0.1 * torch.randn(dim, generator=g)).to(dtype)
    sd["output.weight"] = w(vocab, dim)
    return sd


def write_meta_checkpoint(path: Path, sd: dict | None = None, params: dict | None = None, **kw) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if sd is None:
        sd = meta_state_dict(**kw)
    dim = sd["tok_embeddings.weight"].shape[1]
    n_layers = sum(1 for k in sd if k.endswith("attention.wq.weight"))
    hd_rows = sd["layers.0.attention.wq.weight"].shape[0]
    kv_rows = sd["layers.0.attention.wk.weight"].shape[0]
    n_heads = kw.get("n_heads", 4)
    base = {
        "dim": dim,
        "n_layers": n_layers,
        "n_heads": n_heads,
        "n_kv_heads": n_heads * kv_rows // hd_rows,
        "vocab_size": sd["tok_embeddings.weight"].shape[0],
        "multiple_of": 32,
        "norm_eps": 1e-5,
        "rope_theta": 10000.0,
    }
    base.update(params or {})
    (path / "params.json").write_text(json.dumps(base))
    torch.save(sd, path / "consolidated.00.pth")
    shutil.copy(TOKENIZER, path / "tokenizer.model")
    return path


def split_state_dict(sd: dict, n: int) -> list[dict]:
    """Split as Meta's model-parallel shards: dim 1 for embeddings, wo, w2; dim 0 for the rest; norms replicated."""
    shards = [{} for _ in range(n)]
    for k, t in sd.items():
        if t.dim() == 1:
            parts = [t.clone() for _ in range(n)]
        elif k.startswith("tok_embeddings") or k.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
            parts = [c.clone() for c in t.chunk(n, dim=1)]
        else:
            parts = [c.clone() for c in t.chunk(n, dim=0)]
        for s, p in zip(shards, parts):
            s[k] = p
    return shards
