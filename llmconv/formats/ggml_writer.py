"""Streaming writer for legacy ggml LLaMA files: ggjt v3, the last format before GGUF.

Layout (all little-endian):

    u32 magic 'ggjt' (0x67676a74), u32 version 3
    u32 n_vocab, n_embd, n_mult, n_head, n_layer, n_rot, ftype
    n_vocab x (u32 length, token bytes, f32 score)
    per tensor: i32 n_dims, i32 name length, i32 ggml type, i32 dims (innermost first),
                name bytes, zero padding to a 32-byte file offset, tensor data

There is no tensor count: a loader reads tensor records until the end of the file, so
nothing may follow the last tensor's data. Block layouts are GGUF's (ggjt v3 moved
q4_0/q4_1/q8_0 to fp16 scales, the layouts GGUF kept).

As with the GGUF writer, the whole layout is fixed before any data is written, and each
tensor (its record and its data) is written with pwrite at its known offset.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Sequence

from gguf import GGMLQuantizationType

from ..convert.hparams import meta_ffn_dim
from .ggml_reader import GGJT_ALIGNMENT, GGJT_MAGIC
from .positional import PositionalWriter, pwrite_all

GGJT_VERSION = 3

# What a ggjt v3 file may hold here. (ggjt v3 loaders also know q5_0/q5_1 and the
# K-quants; they are left out until something tests them against such a loader.)
GGJT_TYPES = frozenset(
    {
        GGMLQuantizationType.F32,
        GGMLQuantizationType.F16,
        GGMLQuantizationType.Q4_0,
        GGMLQuantizationType.Q4_1,
        GGMLQuantizationType.Q8_0,
    }
)


@dataclass(frozen=True)
class GGJTHParams:
    n_vocab: int
    n_embd: int
    n_mult: int  # the loader derives the feed-forward size from this (see ffn_size_from_n_mult)
    n_head: int
    n_layer: int
    n_rot: int  # RoPE dimensions per head
    ftype: int  # llama_ftype: 0 all f32, 1 mostly f16, 2 q4_0, 3 q4_1, 7 q8_0

    def pack(self) -> bytes:
        return struct.pack(
            "<9I",
            GGJT_MAGIC,
            GGJT_VERSION,
            self.n_vocab,
            self.n_embd,
            self.n_mult,
            self.n_head,
            self.n_layer,
            self.n_rot,
            self.ftype,
        )


def ffn_size_from_n_mult(n_embd: int, n_mult: int) -> int:
    """The feed-forward size a ggjt loader computes: Meta's 2/3 * 4 * dim, rounded up to n_mult
    (unsigned integer arithmetic, as in the C loader)."""
    return meta_ffn_dim(n_embd, n_mult)


def find_n_mult(n_embd: int, ffn_dim: int, preferred: int | None = None) -> int | None:
    """An n_mult that makes the loader's formula give back `ffn_dim`, or None if none can.

    Meta's multiple_of is used when it works (what the old converters wrote); otherwise the
    smallest divisor of ffn_dim that does. Rounding up to a multiple of n_mult gives ffn_dim
    exactly when n_mult divides it and the unrounded size lies in (ffn_dim - n_mult, ffn_dim],
    so n_mult = ffn_dim always works unless ffn_dim is below the unrounded size: only a
    feed-forward layer narrower than 8/3 * dim cannot be written."""
    if preferred and preferred > 0 and ffn_size_from_n_mult(n_embd, preferred) == ffn_dim:
        return preferred
    raw = 2 * (4 * n_embd) // 3
    if ffn_dim < raw or ffn_dim <= 0:
        return None
    for m in range(ffn_dim - raw + 1, ffn_dim + 1):
        if ffn_dim % m == 0:
            return m
    return None


def vocab_record(text: bytes, score: float) -> bytes:
    return struct.pack("<I", len(text)) + text + struct.pack("<f", score)


@dataclass
class GGJTTensor:
    name: str  # old ggml name, e.g. "layers.0.attention.wq.weight"
    shape: tuple[int, ...]  # numpy order: shape[-1] is the row length (ggml's ne[0])
    ggml_type: GGMLQuantizationType
    nbytes: int
    record_offset: int = 0  # file offset of the tensor record
    data_offset: int = 0  # file offset of the data (a multiple of 32)

    def record(self) -> bytes:
        """Record + zero padding: the bytes from record_offset up to data_offset."""
        name = self.name.encode("utf-8")
        dims = self.shape[::-1]
        head = struct.pack(f"<3i{len(dims)}i", len(dims), len(name), int(self.ggml_type), *dims) + name
        return head + b"\0" * (self.data_offset - self.record_offset - len(head))


@dataclass
class GGJTLayout:
    header: bytes  # magic, hparams and vocabulary
    tensors: list[GGJTTensor]
    index: dict[str, int] = field(default_factory=dict)

    @property
    def total_size(self) -> int:
        if not self.tensors:
            return len(self.header)
        last = self.tensors[-1]
        return last.data_offset + last.nbytes


def _record_size(name: str, n_dims: int) -> int:
    return 12 + 4 * n_dims + len(name.encode("utf-8"))


def plan_layout(
    hparams: GGJTHParams, vocab: Sequence[tuple[bytes, float]], tensors: Sequence[GGJTTensor]
) -> GGJTLayout:
    if len(vocab) != hparams.n_vocab:
        raise ValueError(f"{len(vocab)} vocabulary entries but n_vocab is {hparams.n_vocab}")
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise ValueError("duplicate tensor name")
    header = hparams.pack() + b"".join(vocab_record(text, score) for text, score in vocab)
    pos = len(header)
    out = []
    for t in tensors:
        if GGMLQuantizationType(t.ggml_type) not in GGJT_TYPES:
            raise ValueError(f"{t.name}: type {GGMLQuantizationType(t.ggml_type).name} is not written to ggjt files")
        if not 1 <= len(t.shape) <= 2:
            raise ValueError(f"{t.name}: ggjt loaders take 1-D and 2-D tensors only, not {len(t.shape)}-D")
        data = pos + _record_size(t.name, len(t.shape))
        data += -data % GGJT_ALIGNMENT
        out.append(
            GGJTTensor(
                t.name, tuple(int(d) for d in t.shape), GGMLQuantizationType(t.ggml_type), int(t.nbytes), pos, data
            )
        )
        pos = data + int(t.nbytes)
    return GGJTLayout(header, out, {t.name: i for i, t in enumerate(out)})


class GGJTFileWriter(PositionalWriter):
    """Write one ggjt file whose layout is known: header and vocabulary first, then each
    tensor's record and data at its offset."""

    def place(self, name: str) -> int:
        t = self.layout.tensors[self.layout.index[name]]
        pwrite_all(self.fd, t.record(), t.record_offset)
        return t.data_offset
