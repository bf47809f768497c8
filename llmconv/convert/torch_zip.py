"""Where each tensor of a torch.save zip lies in the file, so its bytes can be read with
pread (formats/rawread.py) instead of through torch's memory map.

torch.load with mmap maps the whole file once and gives every storage a slice of that
mapping, but does not say which record (`archive/data/<key>`) a storage came from. The
records are stored uncompressed (pth._check_zip), so a record's bytes start right after
its local zip header, and every storage's address minus the mapping's base is its record's
file offset. The base is the one constant that maps every storage's address onto the start
of a record at least as long as the storage; it is found by trying the records in order
against the lowest address, and a few bytes of every tensor are then compared both ways.
If no base fits (a writer that is not torch.save), the caller keeps the mapped path.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..formats.rawread import RawTensor, SourceFile
from .torch_pickle import stored_records

_DATA_RECORD = re.compile(r"(?:^|/)data/\d+$")
# torch dtype -> llmconv's name for it (the float types a checkpoint may store); the one copy
TORCH_DTYPE_NAMES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


def record_offsets(path: Path) -> dict[int, int]:
    """File offset of each data record's first byte -> the record's size."""
    with open(path, "rb") as f, zipfile.ZipFile(f) as zf:
        return {offset: size for name, (offset, size) in stored_records(zf, f).items() if _DATA_RECORD.search(name)}


def raw_tensors(path: Path, state: dict[str, torch.Tensor]) -> dict[str, RawTensor] | None:
    """name -> RawTensor for every float tensor of a state dict pth.safe_torch_load mapped, or
    None when the storages cannot be placed in the file (the caller then reads the mapping)."""
    storages = {}
    for t in state.values():
        s = t.untyped_storage()
        if s.nbytes():
            storages[s.data_ptr()] = s.nbytes()
    if not storages:
        return None
    records = record_offsets(path)
    low = min(storages)
    for start in sorted(records):
        base = low - start
        if all(records.get(ptr - base, -1) >= n for ptr, n in storages.items()):
            break
    else:
        return None
    file = SourceFile(path)
    out = {}
    for name, t in state.items():
        dtype = TORCH_DTYPE_NAMES.get(t.dtype)
        if dtype is None or not t.is_contiguous():
            return None
        offset = t.untyped_storage().data_ptr() - base + t.storage_offset() * t.element_size()
        out[name] = RawTensor(file, offset, dtype, tuple(t.shape), name)
    if not all(_same_head(out[n], t) for n, t in state.items() if t.numel()):
        return None
    return out


def _same_head(raw: RawTensor, t: torch.Tensor) -> bool:
    """The first bytes of the tensor through the mapping equal those pread from `raw.offset`."""
    n = min(16, raw.nbytes)
    mapped = t.reshape(-1)[: n // t.element_size()].view(torch.uint8).numpy()
    buf = np.empty(n, np.uint8)
    raw.file.read_into(raw.offset, buf, raw.label)
    return bool(np.array_equal(mapped, buf[: mapped.size]))
