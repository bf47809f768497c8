"""A GGUF file as a source, for `llmconv quantize`: its metadata passes through, its
tensors are dequantized to float32 one at a time when the writer asks for them.

The file is read only by llmconv's hardened reader (formats/gguf_reader.py), which checks
every count, length, offset and the known keys' types before anything is allocated; the
tensor data is read with pread at the offsets it validated (formats/rawread.py), so a file
that shrinks during the run is an error naming the tensor, not a SIGBUS.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, Keys

from .. import quantize as q
from ..errors import LlmconvError
from ..formats.gguf_reader import read_gguf
from ..formats.gguf_writer import KV
from ..formats.rawread import RawTensor, SourceFile, raw_arena
from .plan import SourceTensor

# Keys the writer sets itself: the file type changes, alignment is ours, a split file is rejoined.
_REPLACED_KEYS = {Keys.General.FILE_TYPE, Keys.General.QUANTIZATION_VERSION, Keys.General.ALIGNMENT}
_FLOAT_INPUTS = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16}


@dataclass
class GGUFSource:
    path: Path
    arch: str
    kvs: list[KV]  # pass-through metadata, in file order
    tensors: list[SourceTensor]
    source_types: dict[str, GGMLQuantizationType]  # each tensor's type in the file (requantize warning)

    @property
    def tied_embeddings(self) -> bool:
        return not any(t.name == "output.weight" for t in self.tensors)


def open_gguf_source(path: str | Path, allow_requantize: bool = False) -> GGUFSource:
    path = Path(path)
    g = read_gguf(path)  # structure and the known keys' types (general.architecture a string, ...)
    arch = g.kvs.get(Keys.General.ARCHITECTURE)
    if arch is None:
        raise LlmconvError("no general.architecture key", file=path)
    if int(g.kvs.get("split.count", 1)) > 1:
        raise LlmconvError("split GGUF input is not supported; merge it first (llama-gguf-split --merge)", file=path)
    kvs = [
        KV(name, value, g.kv_types[name].type, g.kv_types[name].element)
        for name, value in g.kvs.items()
        if name not in _REPLACED_KEYS and not name.startswith("split.")
    ]

    tensors, types = [], {}
    file = SourceFile(path)
    for t in g.tensors:
        if t.ggml_type not in _FLOAT_INPUTS and not allow_requantize:
            raise LlmconvError(
                f"tensor is already {t.ggml_type.name}; requantizing loses quality "
                "(pass --allow-requantize to do it anyway)",
                file=path,
                tensor=t.name,
            )
        try:
            qt = q.get(t.ggml_type)
        except KeyError:
            raise LlmconvError(f"no kernel to read {t.ggml_type.name}", file=path, tensor=t.name) from None
        types[t.name] = t.ggml_type
        if t.ggml_type in _FLOAT_INPUTS:
            raw = RawTensor(file, t.offset, qt.name, t.shape, t.name)
            load, read_rows = raw.load, raw.read_rows
        else:
            load = lambda off=t.offset, n=t.nbytes, shape=t.shape, qt=qt, name=t.name: _load(
                file, off, n, shape, qt, name
            )
            read_rows = lambda a, b, out, off=t.offset, qt=qt, name=t.name: _read_rows(file, off, qt, name, a, b, out)
        tensors.append(
            SourceTensor(
                name=t.name,
                shape=t.shape,
                files=[path],
                source_name=t.name,
                source_dtype=qt.name,
                load=load,
                parts=_slices(file, t, qt) if len(t.shape) == 3 else None,
                read_rows=read_rows,
                prefetch=lambda off=t.offset, n=t.nbytes: file.will_need(off, n),
            )
        )
    return GGUFSource(path, arch, kvs, tensors, types)


def _load(file: SourceFile, offset: int, nbytes: int, shape: tuple[int, ...], qt: q.QuantType, name: str) -> np.ndarray:
    raw = np.empty(nbytes, np.uint8)
    file.read_into(offset, raw, name)
    rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    return q.dequantize_tensor(raw.reshape(rows, -1), qt).reshape(shape)


def _slices(file: SourceFile, t, qt: q.QuantType):
    """One loader per slice of a 3-D tensor (MoE experts), so the writer converts slice by slice."""
    step = t.nbytes // t.shape[0]
    return [lambda off=t.offset + i * step: _load(file, off, step, t.shape[1:], qt, t.name) for i in range(t.shape[0])]


def _read_rows(file: SourceFile, offset: int, qt: q.QuantType, name: str, a: int, b: int, out: np.ndarray) -> None:
    """Rows [a, b) of a quantized tensor, read with pread and dequantized into out[b - a, n]."""
    row = qt.row_nbytes(out.shape[1])
    raw = raw_arena((b - a) * row, read_pos=offset + a * row)
    file.read_into(offset + a * row, raw, name)
    out[...] = q.dequantize_tensor(raw.reshape(b - a, row), qt)


__all__ = ["GGUFSource", "open_gguf_source", "GGUFValueType"]
