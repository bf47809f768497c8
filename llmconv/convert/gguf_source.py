"""A GGUF file as a source, for `llmconv quantize`: its metadata passes through, its
tensors are dequantized to float32 one at a time when the writer asks for them."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, Keys

from .. import quantize as q
from ..errors import LlmconvError
from ..formats.gguf_writer import KV
from .plan import SourceTensor

# Keys the writer sets itself: the file type changes, alignment is ours, a split file is rejoined.
_REPLACED_KEYS = {Keys.General.FILE_TYPE, Keys.General.QUANTIZATION_VERSION, Keys.General.ALIGNMENT}
_FLOAT_INPUTS = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16}


@dataclass
class GGUFSource:
    path: Path
    arch: str
    kvs: list[KV]                # pass-through metadata, in file order
    tensors: list[SourceTensor]
    source_types: dict[str, GGMLQuantizationType]

    @property
    def tied_embeddings(self) -> bool:
        return not any(t.name == "output.weight" for t in self.tensors)


def _field_value(field):
    main = field.types[0]
    if main == GGUFValueType.ARRAY:
        sub = field.types[-1]
        if sub == GGUFValueType.STRING:
            return [bytes(field.parts[i]) for i in field.data], sub
        return [field.parts[i].tolist()[0] for i in field.data], sub
    if main == GGUFValueType.STRING:
        return bytes(field.parts[-1]), None
    return field.parts[-1].tolist()[0], None


def open_gguf_source(path: str | Path, allow_requantize: bool = False) -> GGUFSource:
    path = Path(path)
    if not path.is_file():
        raise LlmconvError("no such file", file=path)
    _validate(path)
    try:
        reader = GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError) as e:
        raise LlmconvError(f"not a readable GGUF file: {e}", file=path) from None
    kvs = []
    arch = None
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in _REPLACED_KEYS or name.startswith("split."):
            continue
        value, sub = _field_value(field)
        if name == Keys.General.ARCHITECTURE:
            arch = value.decode("utf-8", "replace")
        kvs.append(KV(name, value, field.types[0], sub))
    if arch is None:
        raise LlmconvError("no general.architecture key", file=path)
    if reader.get_field("split.count") is not None and reader.get_field("split.count").contents() > 1:
        raise LlmconvError("split GGUF input is not supported; merge it first (llama-gguf-split --merge)", file=path)

    tensors, types = [], {}
    mm = np.memmap(path, mode="r")
    for t in reader.tensors:
        ttype = GGMLQuantizationType(t.tensor_type)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists ne[0] first
        if ttype not in _FLOAT_INPUTS and not allow_requantize:
            raise LlmconvError(f"tensor is already {ttype.name}; requantizing loses quality "
                               "(pass --allow-requantize to do it anyway)", file=path, tensor=t.name)
        try:
            qt = q.get(ttype)
        except KeyError:
            raise LlmconvError(f"no kernel to read {ttype.name}", file=path, tensor=t.name) from None
        types[t.name] = ttype
        tensors.append(SourceTensor(
            name=t.name, shape=shape, files=[path], source_name=t.name, source_dtype=qt.name,
            load=lambda off=int(t.data_offset), n=int(t.n_bytes), shape=shape, qt=qt: _load(mm, off, n, shape, qt),
            parts=_slices(mm, int(t.data_offset), int(t.n_bytes), shape, qt) if len(shape) == 3 else None,
        ))
    return GGUFSource(path, arch, kvs, tensors, types)


def _load(mm: np.memmap, offset: int, nbytes: int, shape: tuple[int, ...], qt: q.QuantType) -> np.ndarray:
    raw = np.asarray(mm[offset:offset + nbytes])
    rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    return q.dequantize_tensor(raw.reshape(rows, -1), qt).reshape(shape)


def _slices(mm: np.memmap, offset: int, nbytes: int, shape: tuple[int, ...], qt: q.QuantType):
    """One loader per slice of a 3-D tensor (MoE experts), so the writer converts slice by slice."""
    step = nbytes // shape[0]
    return [lambda off=offset + i * step: _load(mm, off, step, shape[1:], qt) for i in range(shape[0])]


def _validate(path: Path) -> None:
    """Run the hardened header reader first when it is available, so a hostile file gets a
    one-line error before gguf.GGUFReader (which trusts the file) looks at it."""
    try:
        from ..formats.gguf_reader import read_gguf
    except ImportError:
        return
    read_gguf(path)
