"""Streaming GGUF v3 writer.

The whole layout (header, metadata, tensor infos, every tensor's offset) is fixed
before any tensor data is written. Tensors are then written with pwrite at known
offsets, in any order and from any thread, and the file's bytes do not depend on
that order. Format constants come from the `gguf` package.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from .positional import PositionalWriter
from gguf import GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGUF_VERSION, GGMLQuantizationType, GGUFValueType

_SCALAR = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
    GGUFValueType.BOOL: "<?",
}
_NUMPY = {
    GGUFValueType.UINT8: "<u1",
    GGUFValueType.INT8: "<i1",
    GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2",
    GGUFValueType.UINT32: "<u4",
    GGUFValueType.INT32: "<i4",
    GGUFValueType.FLOAT32: "<f4",
    GGUFValueType.UINT64: "<u8",
    GGUFValueType.INT64: "<i8",
    GGUFValueType.FLOAT64: "<f8",
    GGUFValueType.BOOL: "<u1",
}


@dataclass(frozen=True)
class KV:
    key: str
    value: Any
    type: GGUFValueType
    sub_type: GGUFValueType | None = None  # element type of an ARRAY


@dataclass
class TensorEntry:
    name: str
    shape: tuple[int, ...]  # numpy order: shape[-1] is the row length (GGUF's ne[0])
    ggml_type: GGMLQuantizationType
    nbytes: int
    offset: int = 0  # from the start of the data section


@dataclass
class GGUFLayout:
    header: bytes  # magic .. tensor infos, padded to the alignment
    tensors: list[TensorEntry]
    alignment: int = GGUF_DEFAULT_ALIGNMENT
    index: dict[str, int] = field(default_factory=dict)
    infos_start: int = 0  # where the tensor-info table begins in `header`

    @property
    def data_start(self) -> int:
        return len(self.header)

    @property
    def total_size(self) -> int:
        if not self.tensors:
            return len(self.header)
        last = self.tensors[-1]
        return self.data_start + last.offset + last.nbytes


def _pad(n: int, align: int) -> int:
    return (n + align - 1) // align * align


def _string(s: str | bytes) -> bytes:
    b = s.encode("utf-8") if isinstance(s, str) else bytes(s)
    return struct.pack("<Q", len(b)) + b


def encode_value(value: Any, vtype: GGUFValueType, sub_type: GGUFValueType | None = None) -> bytes:
    if vtype == GGUFValueType.STRING:
        return _string(value)
    if vtype == GGUFValueType.ARRAY:
        if sub_type is None:
            raise ValueError("array needs sub_type")
        head = struct.pack("<IQ", int(sub_type), len(value))
        if sub_type == GGUFValueType.STRING:
            return head + b"".join(_string(v) for v in value)
        if sub_type == GGUFValueType.ARRAY:
            raise ValueError("nested arrays are not written")
        return head + np.asarray(value).astype(_NUMPY[sub_type], copy=False).tobytes()
    return struct.pack(_SCALAR[vtype], value)


def encode_kv(kv: KV) -> bytes:
    return _string(kv.key) + struct.pack("<I", int(kv.type)) + encode_value(kv.value, kv.type, kv.sub_type)


def plan_layout(
    kvs: Sequence[KV], tensors: Sequence[TensorEntry], alignment: int = GGUF_DEFAULT_ALIGNMENT
) -> GGUFLayout:
    keys = [kv.key for kv in kvs]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate metadata key")
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise ValueError("duplicate tensor name")
    parts = [struct.pack("<IIQQ", GGUF_MAGIC, GGUF_VERSION, len(tensors), len(kvs))]
    parts += [encode_kv(kv) for kv in kvs]
    infos_start = sum(len(p) for p in parts)
    offset = 0
    out = []
    for t in tensors:
        t = TensorEntry(
            t.name, tuple(int(d) for d in t.shape), GGMLQuantizationType(t.ggml_type), int(t.nbytes), offset
        )
        out.append(t)
        dims = t.shape[::-1]  # GGUF lists ne[0] (the row length) first
        parts.append(
            _string(t.name)
            + struct.pack("<I", len(dims))
            + struct.pack(f"<{len(dims)}Q", *dims)
            + struct.pack("<IQ", int(t.ggml_type), t.offset)
        )
        offset = _pad(offset + t.nbytes, alignment)
    header = b"".join(parts)
    header += b"\0" * (_pad(len(header), alignment) - len(header))
    return GGUFLayout(header, out, alignment, {t.name: i for i, t in enumerate(out)}, infos_start)


class GGUFFileWriter(PositionalWriter):
    """Write one GGUF file whose layout is known: header first, tensors at offsets."""

    def place(self, name: str) -> int:
        return self.layout.data_start + self.layout.tensors[self.layout.index[name]].offset
