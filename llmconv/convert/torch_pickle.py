"""A torch.save state dict's tensors read without importing torch: where each tensor's bytes
lie in the zip, its dtype and shape (formats/rawread.RawTensor), for the pread path.

Why: importing torch costs ~1.4 s of CPU per run (1.4 of the 3.8 s a 1.1B q4_0 conversion
took), and the conversion itself needs nothing from it. The pickle of a state dict is a
dict of `_rebuild_tensor_v2(storage, offset, size, stride, ...)` calls whose storages are
persistent ids naming zip records (`archive/data/<key>`); this unpickler builds those calls
into descriptions and never calls anything else. guards.scan_torch_pickle has already
refused any opcode or global outside that set before this runs.

Anything unusual (a dtype other than bf16/f16/f32, a non-contiguous view, two tensors on one
storage, a view outside its storage, big-endian data, a pickle that does not rebuild a dict
of tensors) returns None: the caller then loads the file with torch (pth.safe_torch_load),
whose checks and messages cover those cases.
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..formats.rawread import RawTensor, SourceFile

_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # zipfile's structFileHeader: 30 bytes
# typed storage class named in a persistent id -> (llmconv's dtype name, bytes per element)
_STORAGE_DTYPES = {"FloatStorage": ("f32", 4), "HalfStorage": ("f16", 2), "BFloat16Storage": ("bf16", 2)}


class _Unusual(Exception):
    """The pickle is not the plain state dict this reader handles: let torch read it."""


@dataclass(frozen=True)
class _StorageType:
    name: str


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: str
    itemsize: int
    numel: int


@dataclass(frozen=True)
class _Stored:
    storage: _Storage
    offset: int  # in elements
    shape: tuple[int, ...]
    stride: tuple[int, ...]


class _StateDict(dict):
    """collections.OrderedDict as pickled by torch.save (BUILD may set its _metadata)."""


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    if not isinstance(storage, _Storage) or not isinstance(storage_offset, int):
        raise _Unusual("tensor without a storage")
    if not all(isinstance(v, int) and v >= 0 for v in (*size, *stride)) or len(size) != len(stride):
        raise _Unusual("malformed size or stride")
    return _Stored(storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    return data


_GLOBALS = {
    ("collections", "OrderedDict"): _StateDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _GLOBALS:
            return _GLOBALS[module, name]
        if module == "torch" and name.endswith("Storage"):
            return _StorageType(name)
        raise _Unusual(f"{module}.{name}")

    def persistent_load(self, pid):
        if not (
            isinstance(pid, tuple)
            and len(pid) == 5
            and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)
            and isinstance(pid[2], str)
            and isinstance(pid[4], int)
        ):
            raise _Unusual("persistent id")
        if pid[1].name not in _STORAGE_DTYPES:
            raise _Unusual(f"storage {pid[1].name}")
        dtype, itemsize = _STORAGE_DTYPES[pid[1].name]
        return _Storage(pid[2], dtype, itemsize, pid[4])


def _contiguous(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    expect = 1
    for size, st in zip(reversed(shape), reversed(stride)):
        if size > 1 and st != expect:
            return False
        expect *= size
    return True


def stored_records(zf: zipfile.ZipFile, f) -> dict[str, tuple[int, int]]:
    """Member name -> (file offset of its first byte, size), for stored (uncompressed) members."""
    out = {}
    for info in zf.infolist():
        if info.compress_type != zipfile.ZIP_STORED:
            continue
        f.seek(info.header_offset)
        head = f.read(_LOCAL_HEADER.size)
        if len(head) != _LOCAL_HEADER.size or head[:4] != b"PK\x03\x04":
            continue
        fields = _LOCAL_HEADER.unpack(head)
        out[info.filename] = (info.header_offset + _LOCAL_HEADER.size + fields[10] + fields[11], info.file_size)
    return out


def read_state_dict(path: Path) -> dict[str, RawTensor] | None:
    """name -> RawTensor of every tensor of a torch.save'd state dict, in the pickle's order,
    or None when torch should read the file instead (see the module docstring). The caller has
    checked the zip (pth._check_zip) and scanned the pickle (guards.scan_torch_pickle)."""
    try:
        with open(path, "rb") as f, zipfile.ZipFile(f) as zf:
            pkl = [n for n in zf.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
            if len(pkl) != 1:
                return None
            prefix = pkl[0][: -len("data.pkl")]
            if prefix + "byteorder" in zf.namelist() and zf.read(prefix + "byteorder") != b"little":
                return None
            state = _Unpickler(io.BytesIO(zf.read(pkl[0]))).load()
            records = stored_records(zf, f)
    except (
        _Unusual,
        pickle.UnpicklingError,
        zipfile.BadZipFile,
        OSError,
        ValueError,
        TypeError,
        EOFError,
        AttributeError,
        IndexError,
        KeyError,
    ):
        return None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, _Stored) for k, v in state.items()):
        return None
    file = SourceFile(path)
    out: dict[str, RawTensor] = {}
    keys: set[str] = set()
    for name, t in state.items():
        s = t.storage
        record = records.get(f"{prefix}data/{s.key}")
        numel = 1
        for d in t.shape:
            numel *= d
        if (
            record is None
            or s.key in keys
            or not _contiguous(t.shape, t.stride)
            or s.numel * s.itemsize > record[1]
            or t.offset + numel > s.numel
        ):
            return None
        keys.add(s.key)
        out[name] = RawTensor(file, record[0] + t.offset * s.itemsize, s.dtype, t.shape, name)
    return out
