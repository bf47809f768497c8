"""GGUF files built byte by byte for the reader tests (test_gguf_reader.py, test_fuzz.py,
test_inspect.py): `build_gguf` is independent of llmconv's reader and records where it put each
field; `compare_with_gguf_reader` checks a reading against gguf.GGUFReader's."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT, GGUFReader, GGUFValueType as VT

from llmconv.formats.gguf_arrays import CompactArray
from llmconv.formats.gguf_reader import read_gguf

_PACK = {
    VT.UINT8: "<B",
    VT.INT8: "<b",
    VT.UINT16: "<H",
    VT.INT16: "<h",
    VT.UINT32: "<I",
    VT.INT32: "<i",
    VT.FLOAT32: "<f",
    VT.BOOL: "<B",
    VT.UINT64: "<Q",
    VT.INT64: "<q",
    VT.FLOAT64: "<d",
}


# ---- a byte-level GGUF writer that remembers where everything is -------------------------------


@dataclass
class Built:
    data: bytes
    at: dict[str, int]  # named positions, e.g. "value:general.name"
    marks: dict[str, list[int]] = field(default_factory=dict)  # every position of a kind (for fuzzing)


class _Buf:
    def __init__(self):
        self.b = bytearray()
        self.at: dict[str, int] = {}
        self.marks: dict[str, list[int]] = {}

    def put(self, fmt: str, v, kind: str | None = None) -> None:
        if kind:
            self.marks.setdefault(kind, []).append(len(self.b))
        self.b += struct.pack(fmt, v)

    def string(self, s: bytes | str) -> None:
        s = s.encode() if isinstance(s, str) else s
        self.put("<Q", len(s), "length")
        self.b += s

    def here(self, name: str) -> None:
        self.at[name] = len(self.b)


def _value(buf: _Buf, vtype, value, elem=None) -> None:
    if isinstance(value, (bytes, bytearray)) and vtype not in (VT.STRING,):
        buf.b += value  # raw payload, for unknown types and hand-made values
    elif vtype == VT.STRING:
        buf.string(value)
    elif vtype == VT.ARRAY:
        buf.put("<I", int(elem), "type")
        buf.put("<Q", len(value), "count")
        for x in value:
            _value(buf, elem, x)
    else:
        buf.put(_PACK[vtype], value, "bool" if vtype == VT.BOOL else None)


def build_gguf(
    kvs=(), tensors=(), *, version=3, n_kv=None, n_tensors=None, alignment=32, magic=b"GGUF", fill=0, with_data=True
) -> Built:
    """kvs: (key, type, value[, element type]); tensors: (name, ne innermost first, type[, offset]).
    Tensor data (zeros, or random bytes if `fill` is a seed) follows at aligned offsets (or the
    given ones) and the file ends after the last; offsets beyond 1 TiB get no data."""
    buf = _Buf()
    buf.b += magic
    buf.put("<I", version)
    buf.here("n_tensors")
    buf.put("<Q", len(tensors) if n_tensors is None else n_tensors, "count")
    buf.here("n_kv")
    buf.put("<Q", len(kvs) if n_kv is None else n_kv, "count")
    for kv in kvs:
        key, vtype, value = kv[:3]
        buf.here(f"kv:{key!s}")
        buf.string(key)
        buf.put("<I", int(vtype), "type")
        buf.here(f"value:{key!s}")
        _value(buf, vtype, value, kv[3] if len(kv) > 3 else None)
    offset, spans = 0, []
    for t in tensors:
        name, ne, ttype = t[:3]
        block, size = GGML_QUANT_SIZES.get(QT(ttype), (1, 1)) if ttype in QT._value2member_map_ else (1, 1)
        nbytes = int(np.prod(ne, dtype=object)) // block * size if all(d > 0 for d in ne) else 0
        off = t[3] if len(t) > 3 else offset
        buf.here(f"tensor:{name!s}")
        buf.string(name)
        buf.here(f"ndims:{name!s}")
        buf.put("<I", len(ne), "ndims")
        buf.here(f"dims:{name!s}")
        for d in ne:
            buf.put("<Q", d, "dim")
        buf.here(f"type:{name!s}")
        buf.put("<I", int(ttype), "type")
        buf.here(f"offset:{name!s}")
        buf.put("<Q", off, "offset")
        spans.append((off, nbytes))
        offset = -(-(off + nbytes) // alignment) * alignment
    buf.b += b"\0" * (-len(buf.b) % alignment)
    buf.here("data")
    end = max((o + n for o, n in spans if o + n < 1 << 40), default=0)
    if with_data:
        rng = np.random.default_rng(fill)
        buf.b += rng.integers(0, 256, end, dtype=np.uint8).tobytes() if fill else b"\0" * end
    return Built(bytes(buf.b), buf.at, buf.marks)


# Every value type, plus tensors of 1-4 dims in block and non-block types.
GOOD_KVS = [
    ("general.architecture", VT.STRING, "llama"),
    ("general.alignment", VT.UINT32, 64),
    ("test.u8", VT.UINT8, 200),
    ("test.i8", VT.INT8, -100),
    ("test.u16", VT.UINT16, 60000),
    ("test.i16", VT.INT16, -30000),
    ("test.u32", VT.UINT32, 4_000_000_000),
    ("test.i32", VT.INT32, -2_000_000_000),
    ("test.f32", VT.FLOAT32, 1e-5),
    ("test.bool", VT.BOOL, 1),
    ("test.u64", VT.UINT64, 2**64 - 1),
    ("test.i64", VT.INT64, -(2**63)),
    ("test.f64", VT.FLOAT64, 3.141592653589793),
    ("test.unicode", VT.STRING, "naïve 東京 🙂"),
    ("test.empty_string", VT.STRING, ""),
    ("tokenizer.ggml.tokens", VT.ARRAY, ["<unk>", "<s>", "</s>", "▁the", "<0x0A>"], VT.STRING),
    ("tokenizer.ggml.scores", VT.ARRAY, [0.0, -1.5, 2.25, -3.0, 1e-30], VT.FLOAT32),
    ("test.bools", VT.ARRAY, [1, 0, 1], VT.BOOL),
    ("test.i64s", VT.ARRAY, [-1, 2**62], VT.INT64),
    ("test.empty_array", VT.ARRAY, [], VT.UINT32),
]
GOOD_TENSORS = [
    ("a.f32", [7], QT.F32),
    ("b.f16", [3, 5], QT.F16),
    ("c.q4_0", [64, 3], QT.Q4_0),
    ("d.q8_0", [32, 2, 2], QT.Q8_0),
    ("e.q4_k", [256, 1, 1, 2], QT.Q4_K),
]


def good(**kw) -> Built:
    kw.setdefault("alignment", 64)
    return build_gguf(GOOD_KVS, GOOD_TENSORS, fill=1, **kw)


def write_file(tmp_path: Path, data: bytes, name: str = "x.gguf") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def gguf_reader_view(path: Path):
    """KVs and tensors as gguf.GGUFReader sees them: strings as bytes, numbers as Python values."""
    r = GGUFReader(path)
    kvs = {}
    for name, f in r.fields.items():
        if name.startswith("GGUF."):
            continue
        main = f.types[0]
        sub = VT(int(f.parts[3][0])) if main == VT.ARRAY else None  # (f.types omits it for empty arrays)
        if main == VT.ARRAY:
            if sub == VT.STRING:
                val = [bytes(f.parts[i]) for i in f.data]
            else:
                val = [_number(f.parts[i], sub) for i in f.data]
        elif main == VT.STRING:
            val = bytes(f.parts[-1])
        else:
            val = _number(f.parts[-1], main)
        kvs[name] = (main, sub, val)
    tensors = [
        (
            t.name,
            QT(int(t.tensor_type)),
            tuple(reversed(t.shape.tolist())),
            int(t.data_offset),
            int(t.n_bytes),
            int(t.n_elements),
            bytes(np.asarray(t.data).view(np.uint8).reshape(-1)),
        )
        for t in r.tensors
    ]
    return r, kvs, tensors


def _number(part, vtype):
    # Bools as their byte, so that a 2 read as True by numpy shows.
    return int(part.view(np.uint8)[0]) if vtype == VT.BOOL else part.tolist()[0]


def _as_bytes(v):
    if isinstance(v, str):
        return v.encode("utf-8")
    if isinstance(v, CompactArray):  # long arrays: compact, list-like
        v = v.tolist()
    if isinstance(v, list):
        return [_as_bytes(x) for x in v]
    return v


def compare_with_gguf_reader(g, path: Path) -> None:
    """`g` (our reading of `path`) holds what gguf.GGUFReader reads there, and its bools are 0 or 1."""
    r, kvs, tensors = gguf_reader_view(path)
    assert g.version == int(r.fields["GGUF.version"].parts[0][0])
    assert g.alignment == int(r.alignment) and g.data_offset == int(r.data_offset)
    assert list(g.kvs) == list(kvs)
    for k, (main_t, sub, val) in kvs.items():
        assert g.kv_types[k] == (main_t, sub), k
        if VT.BOOL in (main_t, sub):
            raw = val if isinstance(val, list) else [val]
            assert set(raw) <= {0, 1}, (k, raw)
            val = [bool(x) for x in val] if isinstance(val, list) else bool(val)
        assert repr(_as_bytes(g.kvs[k])) == repr(val), k  # repr: NaN equals NaN, -0.0 differs from 0.0
    assert [
        (t.name, t.ggml_type, t.shape, t.offset, t.nbytes, t.n_elements, bytes(t.data)) for t in g.tensors
    ] == tensors


def assert_agrees_with_gguf_reader(path: Path):
    g = read_gguf(path)
    compare_with_gguf_reader(g, path)
    return g
