"""Write synthetic Meta checkpoints in real LLaMA shapes, bf16, deterministic, streaming.

    python bench/synth.py --size 1.1b --out bench/data/llama-1.1b   # 2.2 GB, TinyLlama shapes (GQA 32/4)
    python bench/synth.py --size 7b   --out bench/data/llama-7b     # 13.5 GB, one shard
    python bench/synth.py --size 13b  --out bench/data/llama-13b    # 26 GB, two shards

Weights are Gaussian with per-tensor seeds and a real model's scale (std = fan_in^-0.5),
so they are not compressible and every run writes the same bytes.

Streaming: each tensor is generated, written into every shard's zip as its own record and
dropped, so memory stays at about one tensor (the 13B embedding, 0.33 GB) for any model size
and no scratch copy goes to disk. The shard files are torch.save's format written by torch's
own zip writer (`torch._C.PyTorchFileWriter`, 64-byte aligned records); only the pickle that
names the tensors is written here, with the same opcodes torch.save emits for a dict of
tensors, so `torch.load(weights_only=True, mmap=True)` reads it like any Meta checkpoint.
The tokenizer is the fixture's (vocab 512) padded to LLaMA's 32000 entries with
added_tokens.json, so the checkpoint converts like a real one; it is for timing, not for running.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import pickle
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

SIZES = {
    #          dim  layers heads kv  ffn   vocab shards
    "0.2b": (1024, 12, 16, 16, 2816, 32000, 1),  # 0.2B: quick thread-scaling runs
    "1.1b": (2048, 22, 32, 4, 5632, 32000, 1),  # TinyLlama-1.1B
    "1b": (2048, 16, 16, 16, 5504, 32000, 1),  # a quick stand-in with 7B-like rows
    "7b": (4096, 32, 32, 32, 11008, 32000, 1),
    "13b": (5120, 40, 40, 40, 13824, 32000, 2),
}
ROWS_PER_TASK = 1 << 22  # weights per generator task (threads share the work)


def tensor_shapes(dim, layers, heads, kv, ffn, vocab):
    """(Meta name, shape, axis Meta's model parallelism splits it along or None)."""
    kv_rows = dim // heads * kv
    yield "tok_embeddings.weight", (vocab, dim), 1
    for i in range(layers):
        p = f"layers.{i}."
        yield p + "attention.wq.weight", (dim, dim), 0
        yield p + "attention.wk.weight", (kv_rows, dim), 0
        yield p + "attention.wv.weight", (kv_rows, dim), 0
        yield p + "attention.wo.weight", (dim, dim), 1
        yield p + "feed_forward.w1.weight", (ffn, dim), 0
        yield p + "feed_forward.w2.weight", (dim, ffn), 1
        yield p + "feed_forward.w3.weight", (ffn, dim), 0
        yield p + "attention_norm.weight", (dim,), None
        yield p + "ffn_norm.weight", (dim,), None
    yield "norm.weight", (dim,), None
    yield "output.weight", (vocab, dim), 0


def generate(idx: int, shape: tuple[int, ...], pool: ThreadPoolExecutor) -> np.ndarray:
    """bf16 bits (uint16) of tensor `idx`, deterministic; generated in row blocks on `pool`."""
    out = np.empty(shape, np.uint16)
    if len(shape) == 1:
        x = 1 + 0.1 * np.random.default_rng(idx).standard_normal(shape[0], dtype=np.float32)
        out[:] = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        return out
    rows, cols = shape
    step = max(1, ROWS_PER_TASK // cols)
    scale = np.float32(cols**-0.5)

    def block(r: int) -> None:
        g = np.random.default_rng([idx, r])
        x = g.standard_normal((min(step, rows - r), cols), dtype=np.float32)
        x *= scale
        out[r : r + len(x)] = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)

    list(pool.map(block, range(0, rows, step)))
    return out


class _Storage:
    def __init__(self, key: str, numel: int):
        self.key, self.numel = key, numel


class _Tensor:
    """Pickles as torch.save pickles a contiguous tensor: _rebuild_tensor_v2 over a storage."""

    def __init__(self, storage: _Storage, shape: tuple[int, ...]):
        self.storage, self.shape = storage, shape

    def __reduce__(self):
        stride = tuple(int(np.prod(self.shape[i + 1 :])) for i in range(len(self.shape)))
        return torch._utils._rebuild_tensor_v2, (self.storage, 0, self.shape, stride, False, collections.OrderedDict())


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", torch.BFloat16Storage, obj.key, "cpu", obj.numel)
        return None


def _index(state: dict) -> bytes:
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(state)
    return buf.getvalue()


def write_shards(paths: list[Path], tensors) -> None:
    """Stream (name, bf16 bits, split axis) into len(paths) torch.save files, Meta-split."""
    writers = [torch._C.PyTorchFileWriter(str(p)) for p in paths]
    states: list[dict] = [{} for _ in paths]
    for key, (name, bits, axis) in enumerate(tensors):
        n = len(paths)
        parts = [bits] * n if axis is None else np.array_split(bits, n, axis=axis)
        for w, state, part in zip(writers, states, parts):
            part = np.ascontiguousarray(part)
            w.write_record(f"data/{key}", torch.from_numpy(part.view(np.int16)).untyped_storage(), part.nbytes)
            state[name] = _Tensor(_Storage(str(key), part.size), part.shape)
    for w, state in zip(writers, states):
        index = _index(state)
        w.write_record("data.pkl", index, len(index))
        w.write_record("byteorder", sys.byteorder, len(sys.byteorder))
        w.write_end_of_file()


def make(size: str, out: Path, threads: int = 2) -> None:
    dim, layers, heads, kv, ffn, vocab, n_shards = SIZES[size]
    out.mkdir(parents=True, exist_ok=True)
    shapes = list(tensor_shapes(dim, layers, heads, kv, ffn, vocab))
    with ThreadPoolExecutor(threads) as pool:
        tensors = ((name, generate(idx, shape, pool), axis) for idx, (name, shape, axis) in enumerate(shapes))
        write_shards([out / f"consolidated.{i:02d}.pth" for i in range(n_shards)], tensors)
    params = {
        "dim": dim,
        "n_layers": layers,
        "n_heads": heads,
        "vocab_size": vocab,
        "multiple_of": 256,
        "norm_eps": 1e-5,
        "rope_theta": 10000.0,
    }
    if kv != heads:
        params["n_kv_heads"] = kv
    (out / "params.json").write_text(json.dumps(params))
    make_tokenizer(out, vocab)
    print(f"wrote {out}: {sum(p.stat().st_size for p in out.glob('*.pth')) / 2**30:.2f} GiB")


_HF_NAMES = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def hf_name(meta: str) -> str:
    top = {
        "tok_embeddings.weight": "model.embed_tokens.weight",
        "norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }
    if meta in top:
        return top[meta]
    _, layer, rest = meta.split(".", 2)
    return f"model.layers.{layer}.{_HF_NAMES[rest.removesuffix('.weight')]}.weight"


def make_hf(meta_dir: Path, out: Path) -> None:
    """A Hugging Face twin of a one-shard synthetic Meta checkpoint (for timing the safetensors
    reader): model.safetensors streamed tensor by tensor from the .pth (header first), config.json,
    the same tokenizer. Q/K rows are not permuted: the weights are random, only the layout matters."""
    sd = torch.load(meta_dir / "consolidated.00.pth", mmap=True, weights_only=True)
    params = json.loads((meta_dir / "params.json").read_text())
    header, pos = {}, 0
    for name, t in sd.items():
        header[hf_name(name)] = {"dtype": "BF16", "shape": list(t.shape), "data_offsets": [pos, pos + t.nbytes]}
        pos += t.nbytes
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "model.safetensors", "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for t in sd.values():
            f.write(t.contiguous().view(torch.int16).numpy())
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": params["dim"],
        "num_hidden_layers": params["n_layers"],
        "num_attention_heads": params["n_heads"],
        "num_key_value_heads": params.get("n_kv_heads", params["n_heads"]),
        "intermediate_size": sd["layers.0.feed_forward.w1.weight"].shape[0],
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "vocab_size": params["vocab_size"],
        "max_position_embeddings": 4096,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    (out / "config.json").write_text(json.dumps(config))
    for f in ("tokenizer.model", "added_tokens.json"):
        shutil.copy(meta_dir / f, out / f)


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
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    make(a.size, a.out, a.threads)
