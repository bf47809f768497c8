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

Files: GGUF (llmconv.formats.gguf_reader; a split model from its first part) and legacy
ggml/ggmf/ggjt files through llmconv.formats.ggml_reader (see `open_model_file`).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from gguf import GGMLQuantizationType as QT

from .. import quantize as q
from ..errors import LlmconvError
from . import moe

ARCH = "llama"
CHUNK_BYTES = 64 << 20          # float32 bytes of dequantized weight per matmul chunk


class FileInconsistent(LlmconvError):
    """The file cannot describe a LLaMA model: its metadata and tensors disagree (a wrong
    head_count_kv, a tensor of the wrong shape, a missing tensor). `llmconv verify` reports
    this as a failed verification, not as unreadable input."""


# ---- the file ------------------------------------------------------------------------------

@dataclass
class FileTensor:
    name: str
    ggml_type: QT
    shape: tuple[int, ...]           # numpy order: shape[-1] is the row length
    raw: np.ndarray                  # uint8 [rows, row_nbytes] ([row_nbytes] for 1-D), usually a memmap

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Dequantized float32 rows [start, stop)."""
        return dequantize(self.raw[start:stop], self)

    def array(self) -> np.ndarray:
        """The whole tensor as float32 (only for tensors known to be small, or one at a time)."""
        return dequantize(self.raw, self).reshape(self.shape)


def dequantize(raw: np.ndarray, t: FileTensor) -> np.ndarray:
    try:
        return q.dequantize_tensor(raw, t.ggml_type)
    except KeyError as e:
        raise LlmconvError(f"cannot evaluate: {e.args[0]}", tensor=t.name) from None


@dataclass
class ModelFile:
    path: Path
    kind: str                                  # "gguf", or the legacy magic: "ggml", "ggmf", "ggjt"
    kvs: dict[str, Any]                        # GGUF-named metadata (legacy readers map their hparams)
    tensors: dict[str, FileTensor]             # GGUF-named tensors
    tokens: list[bytes] | None = None          # the vocabulary the file carries, id by id
    _keep: list = field(default_factory=list)  # reader objects whose memmaps the tensors view

    def get(self, key: str, default: Any = None) -> Any:
        return self.kvs.get(key, default)

    def arch_key(self, suffix: str) -> str:
        return f"{self.kvs.get('general.architecture', ARCH)}.{suffix}"


def open_model_file(path: str | Path) -> ModelFile:
    """Open a GGUF or legacy ggml file as a ModelFile (tensors memory-mapped, nothing dequantized).
    The first part of a split GGUF (X-00001-of-0000N.gguf) opens all its parts as one model."""
    path = Path(path)
    if not path.is_file():
        raise LlmconvError("no such file", file=path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return _open_gguf(path)
    if magic[::-1] in (b"ggml", b"ggmf", b"ggjt") or magic in (b"ggml", b"ggmf", b"ggjt"):
        return _open_legacy(path)
    raise LlmconvError(f"not a GGUF or ggml file (magic {magic!r})", file=path)


SPLIT_NAME = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")


def split_parts(path: Path, kvs: dict) -> list[Path]:
    """The files of a split model, from its first part (llama.cpp's -0000k-of-0000N naming and
    split.count key); [path] for a file that is not split."""
    count = int(kvs.get("split.count", 1) or 1)
    if count <= 1:
        return [path]
    m = SPLIT_NAME.match(path.name)
    if int(kvs.get("split.no", 0)) != 0 or not m:
        raise LlmconvError(f"part {int(kvs.get('split.no', 0)) + 1} of a {count}-part split model: "
                           "give the first part (-00001-of-...)", file=path)
    return [path.with_name(f"{m['stem']}-{i + 1:05d}-of-{count:05d}.gguf") for i in range(count)]


def _open_gguf(path: Path) -> ModelFile:
    from ..formats.gguf_reader import read_gguf

    first = read_gguf(path)
    kvs = {k: v for k, v in first.kvs.items() if k not in SPLIT_KEYS}
    tokens = kvs.pop("tokenizer.ggml.tokens", None)
    if tokens is not None:
        tokens = [t.encode("utf-8") if isinstance(t, str) else bytes(t) for t in tokens]
    tensors: dict[str, FileTensor] = {}
    keep = []
    for part in split_parts(path, first.kvs):
        g = first if part == path else read_gguf(part) if part.is_file() else None
        if g is None:
            raise LlmconvError("part of the split model is missing", file=part)
        keep.append(g)
        for t in g.tensors:
            shape = tuple(int(d) for d in t.shape)
            raw = np.asarray(t.data).view(np.uint8)
            raw = raw.reshape(*shape[:-1], -1) if len(shape) > 1 else raw.reshape(-1)
            tensors[t.name] = FileTensor(t.name, QT(int(t.ggml_type)), shape, raw)
    want = first.kvs.get("split.tensors.count")
    if want is not None and int(want) != len(tensors):
        raise LlmconvError(f"split.tensors.count is {want} but the parts hold {len(tensors)} tensors", file=path)
    return ModelFile(path, "gguf", kvs, tensors, tokens, keep)


def _reader_tensors(g):
    return g.tensors.values() if isinstance(g.tensors, dict) else g.tensors


# Legacy ggml files carry LLaMA-1 era hyperparameters and Meta's tensor names.
LEGACY_NAMES = {
    "tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
    "output.weight": "output.weight",
    "attention.wq.weight": "attn_q.weight", "attention.wk.weight": "attn_k.weight",
    "attention.wv.weight": "attn_v.weight", "attention.wo.weight": "attn_output.weight",
    "attention_norm.weight": "attn_norm.weight", "ffn_norm.weight": "ffn_norm.weight",
    "feed_forward.w1.weight": "ffn_gate.weight", "feed_forward.w2.weight": "ffn_down.weight",
    "feed_forward.w3.weight": "ffn_up.weight",
}


def legacy_gguf_name(name: str) -> str:
    if name in LEGACY_NAMES:
        return LEGACY_NAMES[name]
    if name.startswith("layers."):
        _, i, rest = name.split(".", 2)
        if rest in LEGACY_NAMES:
            return f"blk.{i}.{LEGACY_NAMES[rest]}"
    return name


def _open_legacy(path: Path) -> ModelFile:
    """Hook for legacy ggml/ggmf/ggjt files. llmconv.formats.ggml_reader supplies the parsing;
    this maps its result to GGUF names and keys. The format has no eps, rope base or
    head_count_kv: llama.cpp's own ggml->GGUF converter assumes eps 1e-6 for LLaMA 1 (5e-6
    in some files), base 10000 and no GQA; the reader decides and we take what it says."""
    try:
        from ..formats import ggml_reader
    except ImportError:
        raise LlmconvError("legacy ggml files are not supported by this build (no ggml reader)", file=path) from None
    return ggml_reader.as_model_file(path) if hasattr(ggml_reader, "as_model_file") else _legacy_adapter(path, ggml_reader)


def _legacy_adapter(path: Path, ggml_reader) -> ModelFile:
    g = ggml_reader.read_ggml(path)
    h = g.hparams
    n_embd, n_head = int(h.n_embd), int(h.n_head)
    kvs: dict[str, Any] = {
        "general.architecture": ARCH,
        "general.file_type": int(h.ftype),     # llama_ftype, numbered as GGUF's general.file_type
        f"{ARCH}.embedding_length": n_embd,
        f"{ARCH}.block_count": int(h.n_layer),
        f"{ARCH}.attention.head_count": n_head,
        f"{ARCH}.attention.head_count_kv": int(getattr(h, "n_head_kv", n_head) or n_head),
        f"{ARCH}.rope.dimension_count": int(getattr(h, "n_rot", n_embd // n_head)),
        f"{ARCH}.attention.layer_norm_rms_epsilon": float(getattr(h, "norm_eps", getattr(h, "eps", 1e-6))),
        f"{ARCH}.rope.freq_base": float(getattr(h, "rope_theta", getattr(h, "freq_base", 10000.0))),
    }
    tensors = {}
    for t in _reader_tensors(g):
        name = legacy_gguf_name(t.name)
        if not getattr(t, "gguf_layout", True):   # pre-v3 q4/q8 blocks: f32 scales, other nibble order
            raise LlmconvError(f"{t.type_name} tensors of {g.magic} v{g.version} files are not evaluated "
                               "(quantized tensors only from ggjt v3 files)", file=path, tensor=t.name)
        shape = tuple(int(d) for d in t.shape)
        raw = np.asarray(t.data).view(np.uint8)
        raw = raw.reshape(*shape[:-1], -1) if len(shape) > 1 else raw.reshape(-1)
        tensors[name] = FileTensor(name, QT(int(t.ggml_type)), shape, raw)
    if "token_embd.weight" in tensors:
        kvs[f"{ARCH}.feed_forward_length"] = tensors["blk.0.ffn_gate.weight"].shape[0] if "blk.0.ffn_gate.weight" in tensors else 0
    tokens = [bytes(tok) if not isinstance(tok, str) else tok.encode("utf-8") for tok in g.vocab.tokens] \
        if getattr(g, "vocab", None) is not None else None
    return ModelFile(path, getattr(g, "magic", "ggjt"), kvs, tensors, tokens, [g])


# ---- hyperparameters -----------------------------------------------------------------------

@dataclass
class LlamaConfig:
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_rot: int
    n_vocab: int
    eps: float
    freq_base: float
    freq_scale: float
    tied_output: bool
    head_dim: int = 0                # attention.key_length, else n_embd / n_head (set by read_config)
    n_expert: int = 0                # expert_count, expert_used_count: a Mixtral (verify/moe.py); 0 dense
    n_expert_used: int = 0


def read_config(mf: ModelFile) -> LlamaConfig:
    """Hyperparameters from the metadata, checked against every tensor's shape."""
    arch = mf.get("general.architecture", ARCH)
    if arch != ARCH:
        raise LlmconvError(f"general.architecture is {arch!r}; verify evaluates 'llama' models", file=mf.path)

    def need(suffix: str):
        key = mf.arch_key(suffix)
        if key not in mf.kvs:
            raise FileInconsistent(f"metadata key {key} is missing", file=mf.path)
        return mf.kvs[key]

    n_embd = int(need("embedding_length"))
    n_layer = int(need("block_count"))
    n_head = int(need("attention.head_count"))
    n_head_kv = int(mf.get(mf.arch_key("attention.head_count_kv"), n_head))
    eps = float(need("attention.layer_norm_rms_epsilon"))
    freq_base = float(mf.get(mf.arch_key("rope.freq_base"), 10000.0))
    key_length = mf.get(mf.arch_key("attention.key_length"))
    value_length = mf.get(mf.arch_key("attention.value_length"), key_length)
    if n_head <= 0 or n_head_kv <= 0 or n_head % n_head_kv or (key_length is None and n_embd % n_head):
        raise FileInconsistent(f"embedding_length {n_embd}, head_count {n_head}, head_count_kv {n_head_kv} "
                               "do not divide", file=mf.path)
    # Mistral Nemo style: heads of 128 with embedding 5120 and 32 heads (key_length != n_embd / n_head)
    head_dim = int(key_length) if key_length is not None else n_embd // n_head
    if value_length is not None and int(value_length) != head_dim:
        raise FileInconsistent(f"attention.value_length {value_length} differs from key_length {head_dim} "
                               "(a LLaMA model has one head size)", file=mf.path)
    n_rot = int(mf.get(mf.arch_key("rope.dimension_count"), head_dim))
    if n_rot > head_dim or n_rot % 2:
        raise FileInconsistent(f"rope.dimension_count {n_rot} does not fit head size {head_dim}", file=mf.path)
    freq_scale = 1.0
    scaling = mf.get(mf.arch_key("rope.scaling.type"))
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise LlmconvError(f"rope scaling {scaling!r} is not evaluated by verify (only linear)", file=mf.path)
        freq_scale = 1.0 / float(mf.get(mf.arch_key("rope.scaling.factor"), 1.0))

    if "token_embd.weight" not in mf.tensors:
        raise FileInconsistent("tensor token_embd.weight is missing", file=mf.path)
    n_vocab = mf.tensors["token_embd.weight"].shape[0]
    declared = mf.get(mf.arch_key("vocab_size"))
    if declared is not None and int(declared) != n_vocab:
        raise FileInconsistent(f"{mf.arch_key('vocab_size')} = {declared} but token_embd.weight has {n_vocab} rows",
                               file=mf.path)
    gate = mf.tensors.get("blk.0.ffn_gate.weight")
    n_ff = int(mf.get(mf.arch_key("feed_forward_length"), gate.shape[0] if gate is not None else 0))
    cfg = LlamaConfig(n_embd, n_layer, n_head, n_head_kv, n_ff, n_rot, n_vocab, eps, freq_base, freq_scale,
                      tied_output="output.weight" not in mf.tensors, head_dim=head_dim)
    cfg.n_expert, cfg.n_expert_used = moe.expert_count(mf)
    check_shapes(mf, cfg)
    return cfg


def expected_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    d, hd, ff = cfg.n_embd, cfg.head_dim, cfg.n_ff
    want = {"token_embd.weight": (cfg.n_vocab, d), "output_norm.weight": (d,)}
    if not cfg.tied_output:
        want["output.weight"] = (cfg.n_vocab, d)
    for i in range(cfg.n_layer):
        b = f"blk.{i}."
        want |= {
            b + "attn_norm.weight": (d,), b + "ffn_norm.weight": (d,),
            b + "attn_q.weight": (cfg.n_head * hd, d), b + "attn_k.weight": (cfg.n_head_kv * hd, d),
            b + "attn_v.weight": (cfg.n_head_kv * hd, d), b + "attn_output.weight": (d, cfg.n_head * hd),
        }
        want |= moe.expected_moe_shapes(i, d, ff, cfg.n_expert) if cfg.n_expert else {
            b + "ffn_gate.weight": (ff, d), b + "ffn_up.weight": (ff, d), b + "ffn_down.weight": (d, ff)}
    return want


def check_shapes(mf: ModelFile, cfg: LlamaConfig) -> None:
    k = mf.arch_key
    why = {  # which metadata a tensor's shape follows, for the message
        "attn_q": f"{k('attention.head_count')} = {cfg.n_head}",
        "attn_k": f"{k('attention.head_count_kv')} = {cfg.n_head_kv}",
        "attn_v": f"{k('attention.head_count_kv')} = {cfg.n_head_kv}",
        "attn_output": f"{k('attention.head_count')} = {cfg.n_head}",
        "ffn_gate": f"{k('feed_forward_length')} = {cfg.n_ff}",
        "ffn_up": f"{k('feed_forward_length')} = {cfg.n_ff}",
        "ffn_down": f"{k('feed_forward_length')} = {cfg.n_ff}",
    }
    for name, shape in expected_shapes(cfg).items():
        t = mf.tensors.get(name)
        if t is None:
            raise FileInconsistent("tensor is missing", file=mf.path, tensor=name)
        if tuple(t.shape) != shape:
            kind = name.split(".")[-2]
            because = why.get(kind, f"{k('embedding_length')} = {cfg.n_embd}")
            raise FileInconsistent(f"shape {tuple(t.shape)}, but {because} (head size {cfg.head_dim}) implies {shape}",
                                   file=mf.path, tensor=name)
    if cfg.n_layer and f"blk.{cfg.n_layer}.attn_q.weight" in mf.tensors:
        raise FileInconsistent(f"{k('block_count')} = {cfg.n_layer} but the file has more layers",
                               file=mf.path, tensor=f"blk.{cfg.n_layer}.attn_q.weight")
    rf = mf.tensors.get("rope_freqs.weight")
    if rf is not None and tuple(rf.shape) != (cfg.n_rot // 2,):
        raise FileInconsistent(f"shape {tuple(rf.shape)}, but rope.dimension_count {cfg.n_rot} implies ({cfg.n_rot // 2},)",
                               file=mf.path, tensor="rope_freqs.weight")


# ---- activation rounding (llama.cpp CPU "vec_dot type") ------------------------------------

def _round_f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float32)


def _round_bf16(x: np.ndarray) -> np.ndarray:
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    r = (u + (0x7FFF + ((u >> 16) & 1))) & np.uint32(0xFFFF0000)   # nearest even on the top 16 bits
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
_Q8_0_TYPES = {QT.Q4_0, QT.Q5_0, QT.Q8_0, QT.Q4_1, QT.Q5_1}   # q8_1 rounds the values as q8_0 does


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
                x[s * T:(s + 1) * T] = rnd(x[s * T:(s + 1) * T])
    out = np.empty((x.shape[0], m), np.float32)
    step = max(1, CHUNK_BYTES // (4 * n))
    for r0 in range(0, m, step):
        w = t.rows(r0, min(m, r0 + step))
        np.matmul(x, w.T, out=out[:, r0:r0 + w.shape[0]])
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


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, n_head_kv: int) -> np.ndarray:
    """q [T, H, d], k/v [T, Hkv, d] -> [T, H*d]; query head h reads kv head h // (H/Hkv)."""
    T, H, d = q.shape
    g = H // n_head_kv
    qh = q.transpose(1, 0, 2).reshape(n_head_kv, g * T, d)          # [Hkv, g*T, d]
    kh = k.transpose(1, 2, 0)                                        # [Hkv, d, T]
    scores = np.matmul(qh, kh) * np.float32(1.0 / math.sqrt(d))      # [Hkv, g*T, T]
    scores = scores.reshape(n_head_kv, g, T, T)
    future = np.triu(np.ones((T, T), bool), 1)
    scores[..., future] = -np.inf
    scores -= scores.max(axis=-1, keepdims=True)
    p = np.exp(scores)
    p /= p.sum(axis=-1, keepdims=True)
    out = np.matmul(p.reshape(n_head_kv, g * T, T), v.transpose(1, 0, 2))   # [Hkv, g*T, d]
    return out.reshape(H, T, d).transpose(1, 0, 2).reshape(T, H * d)


def embed(t: FileTensor, tokens: np.ndarray) -> np.ndarray:
    """Rows of token_embd for `tokens`, dequantized row by row (never the whole table)."""
    uniq, inv = np.unique(tokens, return_inverse=True)
    rows = dequantize(t.raw[uniq], t)
    return rows[inv].astype(np.float32)


def candidate_logits(model: str | Path | ModelFile, tokens, activations: str = "ggml",
                     progress: bool = False) -> np.ndarray:
    """Logits [T, vocab] (float32) of the file's model for `tokens`, all positions; `progress`
    shows the layers with tqdm."""
    return candidate_streams(model, tokens, (activations,), progress)[activations]


def candidate_streams(model: str | Path | ModelFile, tokens, modes: tuple[str, ...] = ("f32", "ggml"),
                      progress: bool = False) -> dict[str, np.ndarray]:
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

    x = np.tile(embed(W["token_embd.weight"], tokens), (S, 1))         # the streams, stacked [S*T, dim]
    for i in layer_progress(cfg.n_layer, "candidate", progress):
        b = f"blk.{i}."
        h = rms_norm(x, W[b + "attn_norm.weight"].array(), cfg.eps)
        qx = matmul_t(h, W[b + "attn_q.weight"], modes).reshape(S * T, cfg.n_head, hd)
        kx = matmul_t(h, W[b + "attn_k.weight"], modes).reshape(S * T, cfg.n_head_kv, hd)
        vx = matmul_t(h, W[b + "attn_v.weight"], modes).reshape(S * T, cfg.n_head_kv, hd)
        qx = apply_rope(qx, cos, sin, cfg.n_rot)
        kx = apply_rope(kx, cos, sin, cfg.n_rot)
        att = np.concatenate([attention(qx[s * T:(s + 1) * T], kx[s * T:(s + 1) * T], vx[s * T:(s + 1) * T],
                                        cfg.n_head_kv) for s in range(S)])
        x = x + matmul_t(att, W[b + "attn_output.weight"], modes)
        h = rms_norm(x, W[b + "ffn_norm.weight"].array(), cfg.eps)
        if cfg.n_expert:
            x = x + moe.candidate_moe_ffn(h, W, i, cfg.n_expert, cfg.n_expert_used, modes, matmul_t)
            continue
        gate = matmul_t(h, W[b + "ffn_gate.weight"], modes)
        up = matmul_t(h, W[b + "ffn_up.weight"], modes)
        act = gate / (1.0 + np.exp(-gate)) * up                          # silu(gate) * up
        x = x + matmul_t(act.astype(np.float32), W[b + "ffn_down.weight"], modes)
    h = rms_norm(x, W["output_norm.weight"].array(), cfg.eps)
    out = W["token_embd.weight"] if cfg.tied_output else W["output.weight"]
    logits = matmul_t(h, out, modes)
    return {mode: logits[s * T:(s + 1) * T] for s, mode in enumerate(modes)}
