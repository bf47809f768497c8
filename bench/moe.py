"""Mixtral at scale: a synthetic checkpoint with Mixtral 8x7B's real widths, fewer layers.

    python bench/moe.py --layers 2                  # writes bench/data/mixtral-8x7b-L2 first if missing
    python bench/moe.py --layers 2 --dense 1b       # also the dense bench/synth.py checkpoint, same type

The checkpoint is Hugging Face MixtralForCausalLM layout in bf16: dim 4096, 32 heads / 8 KV
heads, 8 experts of ffn 14336, top-2, vocab 32000 (Mistral's tokenizer.model.v1 from
mistral-common, else the fixture tokenizer padded as bench/synth.py does), but only --layers
of Mixtral's 32 layers, so it fits on this disk. It is
written by a streaming generator: the safetensors header (every offset) first, then each
tensor in row blocks of 16 M values, Gaussian with per-tensor seeds (incompressible, the
same bytes every run), so memory stays at one block; each layer's experts go to a different
shard than its attention, as in the real checkpoint's 19 files.

Measured: wall time, peak RssAnon (llmconv/testing/procstat.py, polled), checkpoint bytes read per
second of `llmconv convert --outtype T`; with --dense, the same on the dense checkpoint, to
compare throughput per byte.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from e2e import gib, llmconv  # noqa: E402


DIM, HEADS, KV_HEADS, FFN, EXPERTS, USED, VOCAB = 4096, 32, 8, 14336, 8, 2, 32000
BLOCK = 1 << 24


def tensor_plan(layers: int) -> list[tuple[str, tuple[int, ...], int]]:
    """(HF name, shape, shard) of every tensor; shard 0 holds embeddings and attention, shard
    1 + i layer i's router and experts."""
    hd = DIM // HEADS
    plan = [("model.embed_tokens.weight", (VOCAB, DIM), 0)]
    for i in range(layers):
        p = f"model.layers.{i}."
        plan += [
            (p + "self_attn.q_proj.weight", (HEADS * hd, DIM), 0),
            (p + "self_attn.k_proj.weight", (KV_HEADS * hd, DIM), 0),
            (p + "self_attn.v_proj.weight", (KV_HEADS * hd, DIM), 0),
            (p + "self_attn.o_proj.weight", (DIM, HEADS * hd), 0),
            (p + "input_layernorm.weight", (DIM,), 0),
            (p + "post_attention_layernorm.weight", (DIM,), 0),
            (p + "block_sparse_moe.gate.weight", (EXPERTS, DIM), 1 + i),
        ]
        for e in range(EXPERTS):
            q = p + f"block_sparse_moe.experts.{e}."
            plan += [
                (q + "w1.weight", (FFN, DIM), 1 + i),
                (q + "w2.weight", (DIM, FFN), 1 + i),
                (q + "w3.weight", (FFN, DIM), 1 + i),
            ]
    plan += [("model.norm.weight", (DIM,), 0), ("lm_head.weight", (VOCAB, DIM), 0)]
    return plan


def write_shard(path: Path, tensors: list[tuple[str, tuple[int, ...], int]]) -> None:
    """A safetensors file written front to back: header, then each tensor block by block."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, _ in tensors:
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for name, shape, _ in tensors:
            rng = np.random.default_rng(zlib.crc32(name.encode()))  # per-tensor seed
            n = int(np.prod(shape))
            if len(shape) == 1:
                block = 1 + 0.1 * rng.standard_normal(n, dtype=np.float32)
                f.write(torch.from_numpy(block).to(torch.bfloat16).view(torch.int16).numpy().tobytes())
                continue
            scale = np.float32(shape[1] ** -0.5)
            for start in range(0, n, BLOCK):
                block = rng.standard_normal(min(BLOCK, n - start), dtype=np.float32) * scale
                f.write(torch.from_numpy(block).to(torch.bfloat16).view(torch.int16).numpy().tobytes())


def make_mixtral(out: Path, layers: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    plan = tensor_plan(layers)
    n_shards = 1 + layers
    weight_map = {}
    for s in range(n_shards):
        fname = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        part = [t for t in plan if t[2] == s]
        write_shard(out / fname, part)
        weight_map.update({name: fname for name, _, _ in part})
        print(f"  {fname}: {(out / fname).stat().st_size / 2**30:.2f} GiB", flush=True)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["MixtralForCausalLM"],
                "model_type": "mixtral",
                "hidden_size": DIM,
                "intermediate_size": FFN,
                "num_hidden_layers": layers,
                "num_attention_heads": HEADS,
                "num_key_value_heads": KV_HEADS,
                "num_local_experts": EXPERTS,
                "num_experts_per_tok": USED,
                "rms_norm_eps": 1e-5,
                "rope_theta": 1e6,
                "vocab_size": VOCAB,
                "max_position_embeddings": 32768,
                "hidden_act": "silu",
                "tie_word_embeddings": False,
                "sliding_window": None,
                "torch_dtype": "bfloat16",
            }
        )
    )
    from llmconv.testing.moe_synth import mistral_tokenizer

    tok = mistral_tokenizer()  # Mixtral's own 32000-token SentencePiece model, when installed
    if tok is not None:
        (out / "tokenizer.model").write_bytes(tok.read_bytes())
    else:
        from synth import make_tokenizer  # bench/synth.py

        make_tokenizer(out, VOCAB)
    return out


def checkpoint_bytes(ckpt: Path) -> int:
    return sum(p.stat().st_size for p in ckpt.iterdir() if p.suffix in (".safetensors", ".pth"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2, help="layers of Mixtral 8x7B's 32 to generate")
    ap.add_argument("--data", type=Path, default=ROOT / "bench" / "data")
    ap.add_argument("--type", default="q4_K_M")
    ap.add_argument("--dense", help="also convert this bench/synth.py size (e.g. 1b, 7b) for comparison")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = ap.parse_args(argv)

    ckpt = args.data / f"mixtral-8x7b-L{args.layers}"
    if not (ckpt / "config.json").exists():
        print(f"writing synthetic checkpoint {ckpt} ...", flush=True)
        make_mixtral(ckpt, args.layers)
    runs = [("mixtral 8x7B widths, %d of 32 layers" % args.layers, ckpt)]
    if args.dense:
        dense = args.data / f"llama-{args.dense}"
        if not (dense / "params.json").exists():
            print(f"writing synthetic checkpoint {dense} ...", flush=True)
            from synth import make  # bench/synth.py

            make(args.dense, dense)
        runs.append((f"dense bench/synth.py --size {args.dense}", dense))
    print(f"{'checkpoint':42s} {'read':>10s} {'wall s':>8s} {'MiB/s read':>10s} {'peak RssAnon':>13s} {'written':>10s}")
    for label, path in runs:
        out = args.data / f"{path.name}-{args.type}.gguf"
        step = llmconv(path, args.type, out, args.threads)
        size = checkpoint_bytes(path)
        print(
            f"{label:42s} {gib(size):>10s} {step.seconds:8.1f} {size / 2**20 / step.seconds:10.1f} "
            f"{gib(step.peak_rss_anon):>13s} {gib(step.bytes_written):>10s}",
            flush=True,
        )
        out.unlink()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
