"""Importance-matrix files: llama.cpp's GGUF imatrix format (read and write) and the legacy
`.dat` format of older llama-imatrix builds (read).

GGUF (what llama-imatrix writes today): `general.type = "imatrix"`, `imatrix.datasets`
(strings), `imatrix.chunk_count` and `imatrix.chunk_size` (u32), and per weight `W`:

    W.in_sum2   f32 [n_mat, n]   sum over tokens of x**2, x the input column of W's matmul
    W.counts    f32 [n_mat, 1]   the number of tokens summed (one per matrix; n_mat = 1 for LLaMA,
                                 the expert count for stacked experts, each counting its routed tokens)

Legacy .dat (little-endian): int32 n_entries, then per entry int32 name length, the name,
int32 ncall, int32 nval, float32[nval] holding (in_sum2 / tokens) * ncall; then optionally
int32 chunk count, int32 length and the dataset name.

`Imatrix.importance(name)` is what llama-quantize hands its quantizers for a tensor:
in_sum2 / counts (a matrix with count 0 gets all ones), or for .dat files sums / ncall.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType

from ..errors import LlmconvError

KV_DATASETS = "imatrix.datasets"
KV_CHUNK_COUNT = "imatrix.chunk_count"
KV_CHUNK_SIZE = "imatrix.chunk_size"
SUM_SUFFIX = ".in_sum2"
COUNT_SUFFIX = ".counts"
_GGUF_MAGIC = b"GGUF"
MAX_LEGACY_NAME = 4096  # bytes; a longer name is a corrupt file, not a tensor name


@dataclass
class ImatrixEntry:
    sums: np.ndarray  # float32 [n_mat, n]: GGUF in_sum2, or the legacy scaled means
    counts: np.ndarray  # int64 [n_mat]: tokens (GGUF) or ncall (legacy)


@dataclass
class Imatrix:
    entries: dict[str, ImatrixEntry] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    legacy: bool = False
    path: str | None = None  # where it was read from (error messages)

    def importance(self, name: str) -> np.ndarray | None:
        """float32 [n_mat * n]: the per-column weights llama-quantize passes for tensor `name`,
        or None when the file has no entry for it."""
        e = self.entries.get(name)
        if e is None:
            return None
        out = np.empty_like(e.sums)
        for j, c in enumerate(e.counts):
            if self.legacy:
                out[j] = e.sums[j] / np.float32(c) if c > 0 else e.sums[j]
            elif c > 0:
                out[j] = e.sums[j] / np.float32(c)  # C: sums[i] / (float) count
            else:
                out[j] = 1.0
        return out.reshape(-1)

    def for_tensor(self, name: str, row: int, n_mat: int = 1) -> np.ndarray | None:
        """importance(name) checked against the tensor's row length and matrix count (`n_mat`:
        the experts of a stacked [n_expert, rows, row] tensor), as llama-quantize checks it (a
        mismatch is an error, except for token_embd, which is then quantized unweighted).
        float32 [row], or [n_mat, row] for n_mat > 1: expert e's rows are weighted by row e."""
        w = self.importance(name)
        if w is None:
            return None
        if w.shape[0] != row * n_mat:
            if name == "token_embd.weight":
                return None
            whose = f"whose rows have {row}" if n_mat == 1 else f"whose {n_mat} experts have rows of {row}"
            raise LlmconvError(f"imatrix has {w.shape[0]} values for {name}, {whose}", file=self.path, tensor=name)
        return w if n_mat == 1 else w.reshape(n_mat, row)


def read_imatrix(path: str | Path) -> Imatrix:
    """Read a GGUF imatrix or a legacy .dat one (told apart by the GGUF magic)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise LlmconvError(f"cannot open imatrix: {e.strerror}", file=path) from None
    if magic == _GGUF_MAGIC:
        return _read_gguf(path)
    return _read_legacy(path)


def _read_gguf(path: Path) -> Imatrix:
    from ..formats.gguf_reader import read_gguf

    g = read_gguf(path)
    im = Imatrix(path=str(path))
    kvs = g.kvs
    if not all(k in kvs for k in (KV_DATASETS, KV_CHUNK_COUNT, KV_CHUNK_SIZE)):
        # llama-quantize refuses these too ("missing imatrix metadata")
        raise LlmconvError("not an imatrix file: no imatrix.datasets/chunk_count/chunk_size keys", file=path)
    im.datasets = [d if isinstance(d, str) else d.decode("utf-8", "replace") for d in kvs[KV_DATASETS]]
    im.chunk_count = int(kvs[KV_CHUNK_COUNT])
    im.chunk_size = int(kvs[KV_CHUNK_SIZE])
    sums, counts = {}, {}
    for t in g.tensors:
        for suffix, into in ((SUM_SUFFIX, sums), (COUNT_SUFFIX, counts)):
            if t.name.endswith(suffix) and len(t.name) > len(suffix):
                if t.ggml_type != GGMLQuantizationType.F32:
                    raise LlmconvError(f"{suffix[1:]} must be F32, is {t.ggml_type.name}", file=path, tensor=t.name)
                into[t.name[: -len(suffix)]] = np.asarray(t.data).view(np.float32).reshape(t.shape)
    for name in sorted(set(sums) | set(counts)):
        if name not in sums or name not in counts:
            raise LlmconvError("in_sum2 without counts or counts without in_sum2", file=path, tensor=name)
        s, c = sums[name], counts[name].reshape(-1)
        if s.size % c.size:
            raise LlmconvError(f"{s.size} sums do not split into {c.size} matrices", file=path, tensor=name)
        if not (np.isfinite(s).all() and np.isfinite(c).all()):
            raise LlmconvError("non-finite value", file=path, tensor=name)
        im.entries[name] = ImatrixEntry(
            np.array(s, np.float32).reshape(c.size, -1), np.rint(c).astype(np.int64)
        )  # C: lround
    if not im.entries:
        raise LlmconvError("imatrix holds no entries", file=path)
    return im


def _read_legacy(path: Path) -> Imatrix:
    data = path.read_bytes()
    pos = 0

    def take(fmt: str, what: str):
        nonlocal pos
        n = struct.calcsize(fmt)
        if pos + n > len(data):
            raise LlmconvError(f"truncated legacy imatrix: {what} at byte {pos}", file=path)
        v = struct.unpack_from(fmt, data, pos)
        pos += n
        return v[0] if len(v) == 1 else v

    n_entries = take("<i", "entry count")
    if n_entries < 1 or n_entries * 12 > len(data):
        raise LlmconvError(f"not an imatrix file (GGUF or legacy .dat): entry count {n_entries}", file=path)
    im = Imatrix(legacy=True, path=str(path))
    for i in range(n_entries):
        length = take("<i", f"entry {i} name length")
        if not 0 < length <= MAX_LEGACY_NAME or pos + length > len(data):
            raise LlmconvError(f"bad name length {length} for entry {i}", file=path)
        name = data[pos : pos + length].decode("utf-8", "replace")
        pos += length
        ncall, nval = take("<ii", f"entry {i} counts")
        if nval < 1 or pos + 4 * nval > len(data):
            raise LlmconvError(f"bad value count {nval}", file=path, tensor=name)
        sums = np.frombuffer(data, "<f4", nval, pos).astype(np.float32).reshape(1, nval)
        pos += 4 * nval
        if not np.isfinite(sums).all():
            raise LlmconvError("non-finite value", file=path, tensor=name)
        im.entries[name] = ImatrixEntry(sums, np.array([ncall], np.int64))
    if pos + 4 <= len(data):  # optional trailer: chunk count, dataset name
        im.chunk_count = take("<i", "chunk count")
        if pos + 4 <= len(data):
            length = take("<i", "dataset name length")
            if 0 < length <= len(data) - pos:
                im.datasets = [data[pos : pos + length].decode("utf-8", "replace")]
    return im


def write_imatrix_gguf(path: str | Path, im: Imatrix, *, force: bool = True) -> None:
    """Write `im` in llama-imatrix's GGUF layout (tensors in sorted name order, as it does),
    atomically (a temporary name renamed into place when complete)."""
    from ..formats.atomic import atomic_output
    from ..formats.gguf_writer import KV, TensorEntry, plan_layout

    kvs = [
        KV("general.type", "imatrix", GGUFValueType.STRING),
        KV(KV_DATASETS, list(im.datasets), GGUFValueType.ARRAY, GGUFValueType.STRING),
        KV(KV_CHUNK_COUNT, int(im.chunk_count), GGUFValueType.UINT32),
        KV(KV_CHUNK_SIZE, int(im.chunk_size), GGUFValueType.UINT32),
    ]
    arrays = {}
    for name in sorted(im.entries):
        e = im.entries[name]
        arrays[name + SUM_SUFFIX] = np.ascontiguousarray(e.sums, "<f4")
        arrays[name + COUNT_SUFFIX] = e.counts.astype("<f4").reshape(-1, 1)
    layout = plan_layout(kvs, [TensorEntry(n, a.shape, GGMLQuantizationType.F32, a.nbytes) for n, a in arrays.items()])
    # small (a 7B model's is ~7 MB): assembled in memory, written in one go
    blob = bytearray(layout.total_size)
    blob[: layout.data_start] = layout.header
    for t in layout.tensors:
        at = layout.data_start + t.offset
        blob[at : at + t.nbytes] = arrays[t.name].tobytes()
    with atomic_output(path, force=force) as tmp:
        tmp.write_bytes(bytes(blob))
