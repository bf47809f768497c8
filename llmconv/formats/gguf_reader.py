"""A GGUF (v2, v3) reader for files from strangers.

`read_gguf(path)` parses the header, metadata and tensor table and checks every number
before it is used to size, allocate or seek anything:

- magic and version; the tensor and KV counts against the bytes the file has;
- every string and array length against the bytes left in the file, and against a cap;
- value types, bools only 0 or 1, no arrays of arrays;
- keys and tensor names non-empty, UTF-8 and unique (tensor names < 64 bytes, as in ggml);
- 1-4 dims per tensor, each >= 1, with an element count that fits in int64;
- known tensor types, with the row length (ne[0]) a multiple of the type's block size;
- general.alignment a u32 power of two;
- tensor offsets aligned, inside the file, and not overlapping.

This is the list of things whose absence led to the 2024-2026 GGUF parser CVEs (ggml's
gguf.cpp, Ollama's Go reader): lengths trusted for allocation, counts multiplied without
overflow checks, offsets never compared with the file size.

Any violation raises GGUFFormatError (an LlmconvError) saying what was wrong and at which
byte offset. Nothing is allocated in proportion to a number read from the file, only in
proportion to bytes that are present (a 100-byte file cannot make us build a list of a
billion items). Only the header pages are read: the file is memory-mapped, tensor data is
never touched unless a caller reads `tensor.data`.
"""

from __future__ import annotations

import mmap
import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGMLQuantizationType, GGUFValueType, Keys

from ..errors import LlmconvError
from .gguf_values import Cursor, read_name, read_value, read_value_type

# the reader's public names, which callers import from here
from .gguf_values import MAX_ARRAY_ITEMS, MAX_STRING_BYTES, GGUFFormatError, check_write_caps  # noqa: F401

SUPPORTED_VERSIONS = (2, 3)  # v1 used 32-bit counts and lengths and has not been written since 2023
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_TENSOR_NAME_BYTES = 63  # GGML_MAX_NAME is 64 including the terminating NUL
MAX_KVS = 1 << 16  # real files have < 100 keys; each costs ~300 bytes of Python objects
MAX_TENSORS = 1 << 16  # the largest models have a few thousand tensors
INT64_MAX = (1 << 63) - 1

# Smallest possible encodings, for checking counts against the file size before reading.
_HEADER_BYTES = 4 + 4 + 8 + 8  # magic, version, n_tensors, n_kv
_MIN_KV_BYTES = 8 + 1 + 4 + 1  # key length, 1-byte key, type, u8 value
_MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8  # name length, 1-byte name, n_dims, one dim, type, offset

_TENSOR_TYPES = {int(t): t for t in GGMLQuantizationType if t in GGML_QUANT_SIZES}


class KVType(NamedTuple):
    type: GGUFValueType
    element: GGUFValueType | None = None  # the element type of an ARRAY


@dataclass
class GGUFTensor:
    name: str
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order, outermost first: shape[-1] is GGUF's ne[0], the row length
    offset: int  # absolute byte offset of the data in the file
    nbytes: int
    n_elements: int
    info_offset: int  # where this tensor's entry in the tensor table starts
    _file: "GGUFFile" = field(repr=False, compare=False, default=None)

    @property
    def data(self) -> np.memmap:
        """The tensor's bytes as a read-only uint8 memmap (mapped on first use)."""
        return self._file.memmap[self.offset : self.offset + self.nbytes]


@dataclass
class GGUFFile:
    path: Path
    version: int
    alignment: int
    data_offset: int  # where the data section starts (tensor offsets in the file are relative to it)
    file_size: int
    kvs: dict[str, Any]  # strings as str (bytes if not UTF-8), arrays as lists
    kv_types: dict[str, KVType]
    kv_offsets: dict[str, int]  # where each KV's key starts
    tensors: list[GGUFTensor]  # in file order
    _memmap: np.memmap | None = field(default=None, repr=False)

    @property
    def memmap(self) -> np.memmap:
        if self._memmap is None:
            self._memmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._memmap

    def tensor(self, name: str) -> GGUFTensor:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)


def _read_tensor_info(cur: Cursor, alignment: int) -> GGUFTensor:
    info_offset = at = cur.pos
    raw = cur.raw_string("a tensor name", cap=MAX_TENSOR_NAME_BYTES)
    name = read_name(cur, raw, "tensor name", at)
    at = cur.pos
    n_dims = cur.u32("the dimension count", name)
    if not 1 <= n_dims <= MAX_DIMS:
        cur.fail(f"{n_dims} dimensions (must be 1 to {MAX_DIMS})", at, name)
    dims_at = cur.pos
    ne = [cur.u64("a dimension", name) for _ in range(n_dims)]  # innermost (row length) first
    n_elements = 1
    for i, d in enumerate(ne):
        if d < 1:
            cur.fail(f"dimension {i} is {d} (must be >= 1)", dims_at + 8 * i, name)
        n_elements *= d
        if n_elements > INT64_MAX:
            cur.fail(f"dimensions {ne} hold more than 2^63 elements", dims_at, name)
    at = cur.pos
    raw_type = cur.u32("the tensor type", name)
    ggml_type = _TENSOR_TYPES.get(raw_type)
    if ggml_type is None:
        cur.fail(f"unknown tensor type {raw_type}", at, name)
    block, type_size = GGML_QUANT_SIZES[ggml_type]
    if ne[0] % block:
        cur.fail(f"row length {ne[0]} is not a multiple of {ggml_type.name}'s block size {block}", dims_at, name)
    at = cur.pos
    offset = cur.u64("the data offset", name)
    if offset % alignment:
        cur.fail(f"data offset {offset} is not a multiple of the alignment {alignment}", at, name)
    nbytes = n_elements // block * type_size
    return GGUFTensor(name, ggml_type, tuple(reversed(ne)), offset, nbytes, n_elements, info_offset)


def read_gguf(path: str | Path, check_types: bool = True) -> GGUFFile:
    """Parse and validate a GGUF file's header and tensor table (never its data).
    `check_types`: also require the known keys' types and ranges (gguf_metadata.py);
    inspect turns it off to show whatever a file holds."""
    path = Path(path)
    try:
        # O_NONBLOCK: a FIFO or device given as the path must not block the open.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise LlmconvError("no such file", file=path) from None
    except OSError as e:
        raise LlmconvError(f"cannot open: {e.strerror}", file=path) from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise LlmconvError("is a directory, expected a GGUF file (a checkpoint folder: llmconv convert)", file=path)
        if not stat.S_ISREG(st.st_mode):
            raise LlmconvError("not a regular file", file=path)
        size = st.st_size
        if size < _HEADER_BYTES:
            # mmap cannot map an empty file; a header this short is not GGUF anyway.
            head = os.pread(fd, _HEADER_BYTES, 0)
            return _parse(head, len(head), path, check_types)
        with mmap.mmap(fd, size, access=mmap.ACCESS_READ) as buf:
            return _parse(buf, size, path, check_types)
    except OSError as e:
        raise LlmconvError(f"cannot read: {e.strerror or e}", file=path) from None
    finally:
        os.close(fd)


def _parse(buf, size: int, path: Path, check_types: bool = True) -> GGUFFile:
    cur = Cursor(buf, size, path)
    version, n_tensors, n_kv = _read_header(cur)
    kvs, kv_types, kv_offsets = _read_kvs(cur, n_kv)
    alignment = int(kvs.get(Keys.General.ALIGNMENT, GGUF_DEFAULT_ALIGNMENT))
    tensors: list[GGUFTensor] = []
    names: dict[str, int] = {}
    for _ in range(n_tensors):
        at = cur.pos
        t = _read_tensor_info(cur, alignment)
        if t.name in names:
            cur.fail(f"duplicate tensor name (first at byte {names[t.name]})", at, t.name)
        names[t.name] = at
        tensors.append(t)
    data_offset = -(-cur.pos // alignment) * alignment
    g = GGUFFile(path, version, alignment, data_offset, size, kvs, kv_types, kv_offsets, tensors)
    _place_tensors(cur, g)
    if check_types:
        from .gguf_metadata import check_metadata

        check_metadata(g, lambda message, offset: cur.fail(message, offset))
    return g


def _read_header(cur: Cursor) -> tuple[int, int, int]:
    """(version, tensor count, metadata count), the counts checked against the file's size."""
    buf, size = cur.buf, cur.size
    cur.need(4, "the magic")
    if buf[0:4] != struct.pack("<I", GGUF_MAGIC):
        cur.fail(f"not a GGUF file (magic {bytes(buf[0:4])!r}, expected b'GGUF')")
    cur.pos = 4
    version = cur.u32("the version")
    if version not in SUPPORTED_VERSIONS:
        if version & 0xFFFF == 0 and (version >> 24) in SUPPORTED_VERSIONS:
            cur.fail(f"big-endian GGUF v{version >> 24} is not supported", 4)
        cur.fail(f"GGUF version {version} is not supported (only {' and '.join(map(str, SUPPORTED_VERSIONS))})", 4)
    n_tensors = cur.u64("the tensor count")
    n_kv = cur.u64("the metadata count")
    room = size - _HEADER_BYTES
    if n_kv > room // _MIN_KV_BYTES:
        cur.fail(f"metadata count {n_kv} cannot fit in a {size}-byte file", 16)
    if n_tensors > room // _MIN_TENSOR_INFO_BYTES or n_tensors * _MIN_TENSOR_INFO_BYTES + n_kv * _MIN_KV_BYTES > room:
        cur.fail(f"tensor count {n_tensors} (with {n_kv} metadata entries) cannot fit in a {size}-byte file", 8)
    if n_kv > MAX_KVS:
        cur.fail(f"metadata count {n_kv}; the limit is {MAX_KVS}", 16)
    if n_tensors > MAX_TENSORS:
        cur.fail(f"tensor count {n_tensors}; the limit is {MAX_TENSORS}", 8)
    return version, n_tensors, n_kv


def _read_kvs(cur: Cursor, n_kv: int) -> tuple[dict[str, Any], dict[str, KVType], dict[str, int]]:
    """The metadata: values, their types, where each key starts; general.alignment checked."""
    kvs: dict[str, Any] = {}
    kv_types: dict[str, KVType] = {}
    kv_offsets: dict[str, int] = {}
    for _ in range(n_kv):
        at = cur.pos
        key = read_name(cur, cur.raw_string("a metadata key"), "metadata key", at)
        if key in kvs:
            cur.fail(f"duplicate metadata key {key!r} (first at byte {kv_offsets[key]})", at)
        vtype = read_value_type(cur, key, "value type")
        value_at = cur.pos
        value, element = read_value(cur, key, vtype)
        kvs[key], kv_types[key], kv_offsets[key] = value, KVType(vtype, element), at
        if key == Keys.General.ALIGNMENT:
            if vtype != GGUFValueType.UINT32:
                cur.fail(f"{key} must be a UINT32, not {vtype.name}", value_at - 4)
            if value == 0 or value & (value - 1):
                cur.fail(f"{key} = {value} is not a power of two", value_at)
    return kvs, kv_types, kv_offsets


def _place_tensors(cur: Cursor, g: GGUFFile) -> None:
    """Tensor offsets made absolute, each inside the file and none overlapping another."""
    for t in g.tensors:
        t.offset += g.data_offset  # was relative to the data section
        t._file = g
        if t.nbytes > g.file_size - t.offset:  # also catches data_offset itself past the end
            cur.fail(
                f"data [{t.offset}, {t.offset + t.nbytes}) runs past the end of the file ({g.file_size} bytes)",
                t.info_offset,
                t.name,
            )
    by_start = sorted(g.tensors, key=lambda t: t.offset)
    for a, b in zip(by_start, by_start[1:]):
        if a.offset + a.nbytes > b.offset:
            cur.fail(
                f"data [{b.offset}, {b.offset + b.nbytes}) overlaps tensor {a.name} "
                f"[{a.offset}, {a.offset + a.nbytes})",
                b.info_offset,
                b.name,
            )
