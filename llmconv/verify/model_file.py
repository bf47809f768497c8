"""What a converted file says, for `llmconv verify`: its tensors (memory-mapped, dequantized on
demand with llmconv's kernels) and its hyperparameters, checked against every tensor's shape.

Files: GGUF (llmconv.formats.gguf_reader; a split model from its first part) and legacy
ggml/ggmf/ggjt files (llmconv.formats.ggml_reader), both under GGUF names and keys.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as QT

from .. import quantize as q
from ..convert.hparams import ARCH
from ..convert.plan import meta_to_gguf_name
from ..formats.ggml_reader import legacy_magic
from ..errors import LlmconvError
from . import moe


class FileInconsistent(LlmconvError):
    """The file cannot describe a LLaMA model: its metadata and tensors disagree (a wrong
    head_count_kv, a tensor of the wrong shape, a missing tensor). `llmconv verify` reports
    this as a failed verification, not as unreadable input."""


# ---- the file ------------------------------------------------------------------------------


@dataclass
class FileTensor:
    name: str
    ggml_type: QT
    shape: tuple[int, ...]  # numpy order: shape[-1] is the row length
    raw: np.ndarray  # uint8 [rows, row_nbytes] ([row_nbytes] for 1-D), usually a memmap

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
    kind: str  # "gguf", or the legacy magic: "ggml", "ggmf", "ggjt"
    kvs: dict[str, Any]  # GGUF-named metadata (legacy readers map their hparams)
    tensors: dict[str, FileTensor]  # GGUF-named tensors
    tokens: list[bytes] | None = None  # the vocabulary the file carries, id by id
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
    if legacy_magic(magic):
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
        raise LlmconvError(
            f"part {int(kvs.get('split.no', 0)) + 1} of a {count}-part split model: "
            "give the first part (-00001-of-...)",
            file=path,
        )
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


def legacy_gguf_name(name: str) -> str:
    """Legacy ggml files carry Meta's tensor names (convert/plan.py's table)."""
    return meta_to_gguf_name(name) or name


def _open_legacy(path: Path) -> ModelFile:
    """A legacy ggml/ggmf/ggjt file (llmconv.formats.ggml_reader parses it) under GGUF names
    and keys. The format has no eps, rope base or head_count_kv: the reader supplies what
    llama.cpp's own ggml->GGUF converter assumes."""
    from ..formats.ggml_reader import read_ggml

    g = read_ggml(path)
    h = g.hparams
    n_embd, n_head = int(h.n_embd), int(h.n_head)
    kvs: dict[str, Any] = {
        "general.architecture": ARCH,
        "general.file_type": int(h.ftype),  # llama_ftype, numbered as GGUF's general.file_type
        f"{ARCH}.embedding_length": n_embd,
        f"{ARCH}.block_count": int(h.n_layer),
        f"{ARCH}.attention.head_count": n_head,
        f"{ARCH}.attention.head_count_kv": int(h.n_head_kv),
        f"{ARCH}.rope.dimension_count": int(h.n_rot),
        f"{ARCH}.attention.layer_norm_rms_epsilon": float(h.norm_eps),
        f"{ARCH}.rope.freq_base": float(h.rope_theta),
    }
    tensors = {}
    for t in g.tensors:
        name = legacy_gguf_name(t.name)
        if not t.gguf_layout:  # pre-v3 q4/q8 blocks: f32 scales, other nibble order
            raise LlmconvError(
                f"{t.type_name} tensors of {g.magic} v{g.version} files are not evaluated "
                "(quantized tensors only from ggjt v3 files)",
                file=path,
                tensor=t.name,
            )
        shape = tuple(int(d) for d in t.shape)
        raw = np.asarray(t.data).view(np.uint8)
        raw = raw.reshape(*shape[:-1], -1) if len(shape) > 1 else raw.reshape(-1)
        tensors[name] = FileTensor(name, QT(int(t.ggml_type)), shape, raw)
    if "token_embd.weight" in tensors:
        kvs[f"{ARCH}.feed_forward_length"] = (
            tensors["blk.0.ffn_gate.weight"].shape[0] if "blk.0.ffn_gate.weight" in tensors else 0
        )
    tokens = [bytes(tok) if not isinstance(tok, str) else tok.encode("utf-8") for tok in g.vocab.tokens]
    return ModelFile(path, g.magic, kvs, tensors, tokens, [g])


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
    head_dim: int = 0  # attention.key_length, else n_embd / n_head (set by read_config)
    n_expert: int = 0  # expert_count, expert_used_count: a Mixtral (verify/moe.py); 0 dense
    n_expert_used: int = 0
    arch: str = ARCH  # "llama", or "llama4" (verify/llama4.py)
    moe_step: int = 0  # llama4: interleave_moe_layer_step, expert_feed_forward_length
    n_ff_exp: int = 0


def read_config(mf: ModelFile) -> LlamaConfig:
    """Hyperparameters from the metadata, checked against every tensor's shape."""
    arch = mf.get("general.architecture", ARCH)
    if arch not in (ARCH, "llama4"):
        raise LlmconvError(
            f"general.architecture is {arch!r}; verify evaluates 'llama' and 'llama4' models", file=mf.path
        )

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
        raise FileInconsistent(
            f"embedding_length {n_embd}, head_count {n_head}, head_count_kv {n_head_kv} do not divide", file=mf.path
        )
    # Mistral Nemo style: heads of 128 with embedding 5120 and 32 heads (key_length != n_embd / n_head)
    head_dim = int(key_length) if key_length is not None else n_embd // n_head
    if value_length is not None and int(value_length) != head_dim:
        raise FileInconsistent(
            f"attention.value_length {value_length} differs from key_length {head_dim} "
            "(a LLaMA model has one head size)",
            file=mf.path,
        )
    n_rot, freq_scale = _rope(mf, head_dim)
    n_vocab = _vocab_size(mf)
    gate = mf.tensors.get("blk.0.ffn_gate.weight")
    n_ff = int(mf.get(mf.arch_key("feed_forward_length"), gate.shape[0] if gate is not None else 0))
    cfg = LlamaConfig(
        n_embd,
        n_layer,
        n_head,
        n_head_kv,
        n_ff,
        n_rot,
        n_vocab,
        eps,
        freq_base,
        freq_scale,
        tied_output="output.weight" not in mf.tensors,
        head_dim=head_dim,
    )
    cfg.n_expert, cfg.n_expert_used = moe.expert_count(mf)
    cfg.arch = arch
    if arch == "llama4":
        from .llama4 import file_settings

        file_settings(mf, cfg)
    check_shapes(mf, cfg)
    return cfg


def _rope(mf: ModelFile, head_dim: int) -> tuple[int, float]:
    """rope.dimension_count (even, at most the head size) and the frequency scale (linear scaling only)."""
    n_rot = int(mf.get(mf.arch_key("rope.dimension_count"), head_dim))
    if n_rot > head_dim or n_rot % 2:
        raise FileInconsistent(f"rope.dimension_count {n_rot} does not fit head size {head_dim}", file=mf.path)
    freq_scale = 1.0
    scaling = mf.get(mf.arch_key("rope.scaling.type"))
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise LlmconvError(f"rope scaling {scaling!r} is not evaluated by verify (only linear)", file=mf.path)
        freq_scale = 1.0 / float(mf.get(mf.arch_key("rope.scaling.factor"), 1.0))
    return n_rot, freq_scale


def _vocab_size(mf: ModelFile) -> int:
    """token_embd.weight's rows, which a declared vocab_size must equal."""
    if "token_embd.weight" not in mf.tensors:
        raise FileInconsistent("tensor token_embd.weight is missing", file=mf.path)
    n_vocab = mf.tensors["token_embd.weight"].shape[0]
    declared = mf.get(mf.arch_key("vocab_size"))
    if declared is not None and int(declared) != n_vocab:
        raise FileInconsistent(
            f"{mf.arch_key('vocab_size')} = {declared} but token_embd.weight has {n_vocab} rows", file=mf.path
        )
    return n_vocab


def expected_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    d, hd, ff = cfg.n_embd, cfg.head_dim, cfg.n_ff
    want = {"token_embd.weight": (cfg.n_vocab, d), "output_norm.weight": (d,)}
    if not cfg.tied_output:
        want["output.weight"] = (cfg.n_vocab, d)
    for i in range(cfg.n_layer):
        b = f"blk.{i}."
        want |= {
            b + "attn_norm.weight": (d,),
            b + "ffn_norm.weight": (d,),
            b + "attn_q.weight": (cfg.n_head * hd, d),
            b + "attn_k.weight": (cfg.n_head_kv * hd, d),
            b + "attn_v.weight": (cfg.n_head_kv * hd, d),
            b + "attn_output.weight": (d, cfg.n_head * hd),
        }
        if cfg.arch == "llama4":
            from .llama4 import expected_shapes as llama4_ffn_shapes

            want |= llama4_ffn_shapes(cfg, i)
            continue
        want |= (
            moe.expected_moe_shapes(i, d, ff, cfg.n_expert)
            if cfg.n_expert
            else {b + "ffn_gate.weight": (ff, d), b + "ffn_up.weight": (ff, d), b + "ffn_down.weight": (d, ff)}
        )
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
            raise FileInconsistent(
                f"shape {tuple(t.shape)}, but {because} (head size {cfg.head_dim}) implies {shape}",
                file=mf.path,
                tensor=name,
            )
    if cfg.n_layer and f"blk.{cfg.n_layer}.attn_q.weight" in mf.tensors:
        raise FileInconsistent(
            f"{k('block_count')} = {cfg.n_layer} but the file has more layers",
            file=mf.path,
            tensor=f"blk.{cfg.n_layer}.attn_q.weight",
        )
    rf = mf.tensors.get("rope_freqs.weight")
    if rf is not None and tuple(rf.shape) != (cfg.n_rot // 2,):
        raise FileInconsistent(
            f"shape {tuple(rf.shape)}, but rope.dimension_count {cfg.n_rot} implies ({cfg.n_rot // 2},)",
            file=mf.path,
            tensor="rope_freqs.weight",
        )
