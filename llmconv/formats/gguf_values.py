"""Bounds-checked reads of GGUF's metadata values from a mapped file, for gguf_reader.py.

Every length is checked against a cap and against the bytes left before anything is sliced
or allocated; long arrays are kept compact (gguf_arrays.py). `check_write_caps` holds what
llmconv writes to the same caps.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFValueType

from ..errors import LlmconvError
from .gguf_arrays import LIST_MAX_ITEMS, NumberArray, StringArray

MAX_STRING_BYTES = 64 << 20  # one metadata string (an embedded tokenizer.json is a few MB)
MAX_ARRAY_ITEMS = 1 << 26  # vocabularies and merge lists are < 1M items

# Fixed-size value types: struct format and numpy dtype (little-endian).
_FIXED = {
    GGUFValueType.UINT8: ("<B", "<u1"),
    GGUFValueType.INT8: ("<b", "<i1"),
    GGUFValueType.UINT16: ("<H", "<u2"),
    GGUFValueType.INT16: ("<h", "<i2"),
    GGUFValueType.UINT32: ("<I", "<u4"),
    GGUFValueType.INT32: ("<i", "<i4"),
    GGUFValueType.FLOAT32: ("<f", "<f4"),
    GGUFValueType.BOOL: ("<B", "<u1"),
    GGUFValueType.UINT64: ("<Q", "<u8"),
    GGUFValueType.INT64: ("<q", "<i8"),
    GGUFValueType.FLOAT64: ("<d", "<f8"),
}
_VALUE_TYPES = {int(t): t for t in GGUFValueType}


class GGUFFormatError(LlmconvError):
    """The file is not a well-formed GGUF file; `offset` is the byte where the problem is."""

    def __init__(self, message: str, offset: int, *, file=None, tensor=None):
        self.offset = offset
        super().__init__(f"at byte {offset}: {message}", file=file, tensor=tensor)


class Cursor:
    """Bounds-checked little-endian reads from a mapped file; every read names what it reads."""

    def __init__(self, buf, size: int, path: Path):
        self.buf, self.size, self.path, self.pos = buf, size, path, 0

    def fail(self, message: str, offset: int | None = None, tensor: str | None = None):
        raise GGUFFormatError(message, self.pos if offset is None else offset, file=self.path, tensor=tensor)

    def need(self, n: int, what: str, tensor: str | None = None) -> None:
        if n > self.size - self.pos:
            self.fail(
                f"file ends inside {what}: needs {n} bytes, {self.size - self.pos} left (file is {self.size} bytes)",
                tensor=tensor,
            )

    def unpack(self, fmt: str, nbytes: int, what: str, tensor: str | None = None):
        self.need(nbytes, what, tensor)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += nbytes
        return v

    def u32(self, what: str, tensor: str | None = None) -> int:
        return self.unpack("<I", 4, what, tensor)

    def u64(self, what: str, tensor: str | None = None) -> int:
        return self.unpack("<Q", 8, what, tensor)

    def raw_string(self, what: str, cap: int = MAX_STRING_BYTES, tensor: str | None = None) -> bytes:
        at = self.pos
        n = self.u64(f"the length of {what}", tensor)
        if n > cap:
            self.fail(f"{what} is {n} bytes long; the limit is {cap}", at, tensor)
        self.need(n, f"{what} ({n} bytes)", tensor)
        b = self.buf[self.pos : self.pos + n]
        self.pos += n
        return b


def decode_string(b: bytes) -> str | bytes:
    """Metadata strings are UTF-8 by the spec; a value that is not stays bytes rather than
    being altered or rejected (a tokenizer may hold odd tokens; the caller decides)."""
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return b


def read_name(cur: Cursor, b: bytes, what: str, at: int) -> str:
    if not b:
        cur.fail(f"{what} is empty", at)
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        cur.fail(f"{what} {b[:40]!r} is not UTF-8", at)


def read_value_type(cur: Cursor, key: str, what: str) -> GGUFValueType:
    at = cur.pos
    raw = cur.u32(f"the {what} of {key}")
    if raw not in _VALUE_TYPES:
        cur.fail(f"{key}: unknown {what} {raw}", at)
    return _VALUE_TYPES[raw]


def read_value(cur: Cursor, key: str, vtype: GGUFValueType) -> tuple[Any, GGUFValueType | None]:
    if vtype == GGUFValueType.STRING:
        return decode_string(cur.raw_string(f"the value of {key}")), None
    if vtype == GGUFValueType.ARRAY:
        return _read_array(cur, key)
    fmt, dtype = _FIXED[vtype]
    at = cur.pos
    v = cur.unpack(fmt, np.dtype(dtype).itemsize, f"the value of {key}")
    if vtype == GGUFValueType.BOOL:
        if v > 1:
            cur.fail(f"{key}: bool value {v} (must be 0 or 1)", at)
        v = bool(v)
    return v, None


def _read_array(cur: Cursor, key: str) -> tuple[list, GGUFValueType]:
    etype = read_value_type(cur, key, "array element type")
    if etype == GGUFValueType.ARRAY:
        cur.fail(f"{key}: arrays of arrays are not supported", cur.pos - 4)
    at = cur.pos
    n = cur.u64(f"the item count of {key}")
    if n > MAX_ARRAY_ITEMS:
        cur.fail(f"{key}: array of {n} items; the limit is {MAX_ARRAY_ITEMS}", at)
    min_item = 8 if etype == GGUFValueType.STRING else np.dtype(_FIXED[etype][1]).itemsize
    left = cur.size - cur.pos
    if n * min_item > left:
        cur.fail(
            f"{key}: array of {n} {etype.name} items needs at least {n * min_item} bytes, the file has {left} left", at
        )
    if etype == GGUFValueType.STRING:
        return _read_strings(cur, key, n), etype
    dtype = np.dtype(_FIXED[etype][1])
    start = cur.pos
    # straight from the map (slicing it would copy), then one copy that outlives the map
    values = np.frombuffer(cur.buf, dtype=dtype, count=n, offset=start).copy()
    cur.pos += n * dtype.itemsize
    is_bool = etype == GGUFValueType.BOOL
    if is_bool:
        bad = np.flatnonzero(values > 1)
        if bad.size:
            i = int(bad[0])
            cur.fail(f"{key}[{i}]: bool value {int(values[i])} (must be 0 or 1)", start + i)
    if n > LIST_MAX_ITEMS:
        return NumberArray(values, is_bool), etype  # about the bytes it had in the file
    return ((values != 0).tolist() if is_bool else values.tolist()), etype


_U64 = struct.Struct("<Q").unpack_from


def _read_strings(cur: Cursor, key: str, n: int) -> list[str | bytes] | StringArray:
    """n length-prefixed strings: the same checks as Cursor.raw_string, inlined because a
    vocabulary has 10^5 of them and this loop is most of the time spent on a header.
    More than LIST_MAX_ITEMS strings are kept as one blob + offsets (a StringArray)."""
    if n > LIST_MAX_ITEMS:
        return _read_string_array(cur, key, n)
    buf, size, pos = cur.buf, cur.size, cur.pos
    out = []
    for i in range(n):
        if size - pos < 8:
            cur.pos = pos
            cur.need(8, f"the length of {key}[{i}]")
        (length,) = _U64(buf, pos)
        if length > MAX_STRING_BYTES:
            cur.fail(f"{key}[{i}] is {length} bytes long; the limit is {MAX_STRING_BYTES}", pos)
        pos += 8
        if length > size - pos:
            cur.pos = pos
            cur.need(length, f"{key}[{i}] ({length} bytes)")
        b = buf[pos : pos + length]
        pos += length
        try:
            out.append(b.decode("utf-8"))
        except UnicodeDecodeError:
            out.append(b)
    cur.pos = pos
    return out


def _read_string_array(cur: Cursor, key: str, n: int) -> StringArray:
    buf, size, pos = cur.buf, cur.size, cur.pos
    blob = bytearray()
    starts = np.empty(n + 1, dtype=np.int64)
    for i in range(n):
        if size - pos < 8:
            cur.pos = pos
            cur.need(8, f"the length of {key}[{i}]")
        (length,) = _U64(buf, pos)
        if length > MAX_STRING_BYTES:
            cur.fail(f"{key}[{i}] is {length} bytes long; the limit is {MAX_STRING_BYTES}", pos)
        pos += 8
        if length > size - pos:
            cur.pos = pos
            cur.need(length, f"{key}[{i}] ({length} bytes)")
        starts[i] = len(blob)
        blob += buf[pos : pos + length]
        pos += length
    starts[n] = len(blob)
    cur.pos = pos
    return StringArray(bytes(blob), starts)


def check_write_caps(kvs, file=None) -> None:
    """What llmconv writes, its own reader must accept: the same caps on strings and arrays
    as gguf_reader applies on read (a 65 MiB chat template would make an unreadable file)."""

    def size(s) -> int:
        return len(s.encode("utf-8", "surrogatepass")) if isinstance(s, str) else len(s)

    for kv in kvs:
        values = kv.value if kv.type == GGUFValueType.ARRAY else [kv.value]
        if kv.type == GGUFValueType.ARRAY and len(values) > MAX_ARRAY_ITEMS:
            raise LlmconvError(
                f"metadata {kv.key} would have {len(values)} items; GGUF readers accept at most {MAX_ARRAY_ITEMS}",
                file=file,
            )
        if GGUFValueType.STRING in (kv.type, kv.sub_type):
            for s in values:
                if size(s) > MAX_STRING_BYTES:
                    raise LlmconvError(
                        f"metadata {kv.key} would hold a string of {size(s)} bytes; GGUF readers "
                        f"accept at most {MAX_STRING_BYTES}",
                        file=file,
                    )
