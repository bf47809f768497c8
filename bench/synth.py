"""Write synthetic Meta checkpoints in real LLaMA shapes, bf16, deterministic.

    python bench/synth.py --size 7b  --out bench/data/llama-7b     # 13.5 GB, one shard
    python bench/synth.py --size 13b --out bench/data/llama-13b    # 26 GB, two shards

Weights are Gaussian with per-tensor seeds and a real model's scale (std = fan_in^-0.5),
so they are not compressible and every run writes the same bytes. Tensors are generated
into memory-mapped files and saved shard by shard, so memory stays at about one tensor.
The tokenizer is the fixture's (vocab 512) padded to LLaMA's 32000 entries with
added_tokens.json, so the checkpoint converts like a real one; it is for timing, not for running.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

SIZES = {
    #        dim  layers heads  ffn   vocab shards
    "7b": (4096, 32, 32, 11008, 32000, 1),
    "13b": (5120, 40, 40, 13824, 32000, 2),
    "1b": (2048, 16, 16, 5504, 32000, 1),   # a quick stand-in with 7B-like rows
}


def tensor_shapes(dim, layers, heads, ffn, vocab):
    yield "tok_embeddings.weight", (vocab, dim), 1
    for i in range(layers):
        p = f"layers.{i}."
        for w in ("wq", "wk", "wv"):
            yield p + f"attention.{w}.weight", (dim, dim), 0
        yield p + "attention.wo.weight", (dim, dim), 1
        yield p + "feed_forward.w1.weight", (ffn, dim), 0
        yield p + "feed_forward.w2.weight", (dim, ffn), 1
        yield p + "feed_forward.w3.weight", (ffn, dim), 0
        yield p + "attention_norm.weight", (dim,), None
        yield p + "ffn_norm.weight", (dim,), None
    yield "norm.weight", (dim,), None
    yield "output.weight", (vocab, dim), 0


def make(size: str, out: Path) -> None:
    dim, layers, heads, ffn, vocab, n_shards = SIZES[size]
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=out))
    shards: list[dict] = [{} for _ in range(n_shards)]
    for idx, (name, shape, split_axis) in enumerate(tensor_shapes(dim, layers, heads, ffn, vocab)):
        rng = np.random.default_rng(idx)
        n = int(np.prod(shape))
        f = scratch / f"{idx}.bin"
        full = torch.from_file(str(f), shared=True, size=n, dtype=torch.bfloat16).view(shape)
        if len(shape) == 1:
            full.copy_(torch.from_numpy(1 + 0.1 * rng.standard_normal(n, dtype=np.float32)))
        else:
            scale = np.float32(shape[1] ** -0.5)
            rows_per = max(1, (1 << 24) // shape[1])
            for r in range(0, shape[0], rows_per):
                block = rng.standard_normal((min(rows_per, shape[0] - r), shape[1]), dtype=np.float32) * scale
                full[r:r + len(block)] = torch.from_numpy(block).to(torch.bfloat16)
        parts = [full] * n_shards if split_axis is None else list(full.chunk(n_shards, dim=split_axis))
        for s, part in zip(shards, parts):
            s[name] = part.clone() if n_shards > 1 and split_axis is not None else part
    for i, s in enumerate(shards):
        torch.save(s, out / f"consolidated.{i:02d}.pth")
    shutil.rmtree(scratch)
    (out / "params.json").write_text(json.dumps({
        "dim": dim, "n_layers": layers, "n_heads": heads, "vocab_size": vocab,
        "multiple_of": 256, "norm_eps": 1e-5, "rope_theta": 10000.0}))
    make_tokenizer(out, vocab)
    print(f"wrote {out}: {sum(p.stat().st_size for p in out.glob('*.pth')) / 2**30:.1f} GiB")


def make_tokenizer(out: Path, vocab: int) -> None:
    """The fixture's SentencePiece model, padded with user-defined pieces to `vocab` entries
    through added_tokens.json (the mechanism Meta-format converters already honour)."""
    root = Path(__file__).resolve().parents[1]
    shutil.copy(root / "fixtures" / "tokenizer.model", out / "tokenizer.model")
    import sentencepiece as spm
    base = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model")).vocab_size()
    (out / "added_tokens.json").write_text(json.dumps({f"<pad_{i}>": i for i in range(base, vocab)}))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=list(SIZES), default="7b")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    make(a.size, a.out)
