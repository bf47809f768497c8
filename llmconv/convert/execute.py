"""Run a plan: load each tensor, convert it, and stream it into a GGUF file.

The layout is fixed before the first byte of data, so every tensor has a known offset.
While one tensor is converted and written, the next one is already being loaded in a
background thread (the only read-ahead: memory stays at about two tensors).
The output appears under its final name only when complete (see formats/atomic.py).
"""
from __future__ import annotations

import errno
import json
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from gguf import GGMLQuantizationType
from gguf import GGUFValueType as T
from gguf import Keys
from tqdm import tqdm

from .. import quantize as q
from .._malloc import pin_mmap_threshold
from ..errors import LlmconvError
from ..formats.atomic import atomic_outputs
from ..formats.checksums import sidecar_document, sidecar_path, tensor_sha256
from ..formats.gguf_writer import KV, GGUFFileWriter, TensorEntry, plan_layout, read_tensor_infos
from .moe import convert_stacked
from .plan import Plan, PlannedTensor


@dataclass
class WriteResult:
    path: Path
    n_tensors: int
    nbytes: int
    seconds: float
    paths: list[Path] = field(default_factory=list)   # all files written (more than one when split)


def convert_tensor(t: PlannedTensor, data: np.ndarray, threads: int) -> np.ndarray:
    """Float array -> the bytes of `t` in its planned type, with errors that name the tensor."""
    where = t.src.files[0] if t.src.files else None
    label = t.src.source_name or t.name
    if data is None and t.src.parts is not None:
        return convert_stacked(t, threads, _load_part)      # MoE experts, one slice at a time
    if tuple(data.shape) != tuple(t.shape):
        raise LlmconvError(f"loaded shape {tuple(data.shape)} != planned {tuple(t.shape)}", file=where, tensor=label)
    try:
        return q.quantize_tensor(data, t.qtype, threads=threads, imatrix=t.imatrix)
    except q.NonFiniteError as e:
        raise LlmconvError(f"{e} (cannot convert to {t.qtype.name})", file=where, tensor=label) from None


def _load(t: PlannedTensor, part: int | None = None) -> np.ndarray | None:
    """The tensor's float data; None for a stacked tensor, whose slices are read one at a
    time while it is converted (`part`: read that slice)."""
    if t.src.parts is not None and part is None:
        return None
    where = t.src.files[0] if t.src.files else None
    try:
        return t.src.load() if part is None else t.src.parts[part]()
    except LlmconvError:
        raise
    except (RuntimeError, OSError, ValueError) as e:
        raise LlmconvError(f"cannot read tensor data: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
                           file=where, tensor=t.src.source_name or t.name) from None


def _load_part(t: PlannedTensor, part: int) -> np.ndarray:
    return _load(t, part)


def split_plan(kvs: Sequence[KV], plan: Plan, max_bytes: int = 0, max_tensors: int = 0):
    """[(path suffix, kvs, tensors)] for each output file. Without limits: one file.
    With them, llama.cpp's split convention: the first file holds all metadata, every file
    holds split.no / split.count / split.tensors.count, names end -0000k-of-0000N.gguf."""
    groups: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in plan.tensors:
        g = groups[-1]
        if g and ((max_tensors and len(g) >= max_tensors) or (max_bytes and size + t.nbytes > max_bytes)):
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    if len(groups) == 1:
        return [("", list(kvs), groups[0])]
    n = len(groups)
    out = []
    for i, g in enumerate(groups):
        split_kvs = [KV(Keys.Split.LLM_KV_SPLIT_NO, i, T.UINT16), KV(Keys.Split.LLM_KV_SPLIT_COUNT, n, T.UINT16),
                     KV(Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT, len(plan.tensors), T.INT32)]
        out.append((f"-{i + 1:05d}-of-{n:05d}", (list(kvs) if i == 0 else []) + split_kvs, g))
    return out


def split_paths(out_path: Path, n: int) -> list[Path]:
    if n == 1:
        return [out_path]
    stem = out_path.name[:-5] if out_path.name.endswith(".gguf") else out_path.name
    return [out_path.with_name(f"{stem}-{i + 1:05d}-of-{n:05d}.gguf") for i in range(n)]


def write_gguf(out_path: str | Path, kvs: Sequence[KV], plan: Plan, *, threads: int = 1,
               progress: bool = True, force: bool = False, verbose: bool = False,
               split_max_size: int = 0, split_max_tensors: int = 0, checksum: bool = False) -> WriteResult:
    """Write `plan` to `out_path` (or its split parts). With `checksum`, also write the
    sha256 of every tensor's bytes to `out_path.sha256.json` (see formats/checksums.py)."""
    out_path = Path(out_path)
    pin_mmap_threshold()
    parts = split_plan(kvs, plan, split_max_size, split_max_tensors)
    paths = split_paths(out_path, len(parts))
    layouts = [plan_layout(p_kvs, [TensorEntry(t.name, t.shape, t.qtype.ggml_type, t.nbytes) for t in p_ts])
               for _, p_kvs, p_ts in parts]
    where = {t.name: i for i, (_, _, p_ts) in enumerate(parts) for t in p_ts}
    total = sum(lay.total_size for lay in layouts)
    start = time.perf_counter()
    with ExitStack() as files:
        # every part and the sidecar appear together, or none of them (formats/atomic.py)
        targets = paths + ([sidecar_path(out_path)] if checksum else [])
        outs = files.enter_context(atomic_outputs(targets, force=force))
        tmps, side_tmp = outs[:len(paths)], (outs[-1] if checksum else None)
        sums: dict[str, dict] = {}
        try:
            writers = [files.enter_context(GGUFFileWriter(tmp, lay)) for tmp, lay in zip(tmps, layouts)]
            reader = files.enter_context(ThreadPoolExecutor(1, thread_name_prefix="llmconv-read"))
            writer = files.enter_context(ThreadPoolExecutor(1, thread_name_prefix="llmconv-write"))
            bar = files.enter_context(tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                                           desc=out_path.name, disable=None if progress else True, leave=False))
            bar.update(sum(lay.data_start for lay in layouts))

            def write(t: PlannedTensor, blob: np.ndarray) -> None:
                writers[where[t.name]].write_tensor(t.name, blob)
                if checksum:
                    sums[t.name] = {"file": paths[where[t.name]].name, "type": t.qtype.name, "shape": list(t.shape),
                                    "bytes": int(blob.nbytes), "sha256": tensor_sha256(blob)}

            # Three stages overlap: the next tensor is read while this one is converted and the
            # previous one written. One tensor in each stage at most, so memory stays bounded.
            pending = reader.submit(_load, plan.tensors[0]) if plan.tensors else None
            written = None
            for i, t in enumerate(plan.tensors):
                data = pending.result()
                pending = reader.submit(_load, plan.tensors[i + 1]) if i + 1 < len(plan.tensors) else None
                bar.set_postfix_str(t.name, refresh=False)
                blob = convert_tensor(t, data, threads)
                del data
                if written is not None:
                    written.result()
                written = writer.submit(write, t, blob)
                del blob
                if verbose:
                    bar.write(f"  {t.name:32s} {t.qtype.name:6s} {str(t.shape):18s} {t.nbytes:>12,d} B")
                bar.update(t.nbytes)
            if written is not None:
                written.result()
            for w in writers:
                w.close()
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise LlmconvError(f"write failed: {e.strerror}", file=out_path) from None
            raise
        for tmp, lay, p in zip(tmps, layouts, paths):
            check_written(Path(tmp.read_path), lay, p)
        if side_tmp is not None:
            side_tmp.write_bytes((json.dumps(sidecar_document(paths, sums), indent=1) + "\n").encode())
    return WriteResult(paths[0], len(plan.tensors), total, time.perf_counter() - start, paths)


def check_written(path: Path, layout, label: Path) -> None:
    """Re-read what was just written: the file size, the header bytes (metadata and tensor
    table) against the planned ones, and every tensor's type, size and offset parsed back
    from the file (in bounds, aligned, not overlapping). Reads only the header, so it costs
    milliseconds even for a 128k-token vocabulary."""
    from gguf import GGML_QUANT_SIZES

    size = path.stat().st_size
    if size != layout.total_size:
        raise LlmconvError(f"written size {size} != planned {layout.total_size}", file=label)
    with open(path, "rb") as f:
        head = f.read(layout.data_start)
    if head != layout.header:
        at = next((i for i, (a, b) in enumerate(zip(head, layout.header)) if a != b), len(head))
        raise LlmconvError(f"re-read header differs from the planned one at byte {at}", file=label)
    infos = read_tensor_infos(head, layout.infos_start, len(layout.tensors))
    end = 0
    for (name, dims, ggml_type, offset), t in zip(infos, layout.tensors):
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        n = int(np.prod(dims, dtype=np.int64))
        nbytes = n // block * type_size
        if (name, offset, nbytes) != (t.name, t.offset, t.nbytes) or offset % layout.alignment or offset < end \
                or layout.data_start + offset + nbytes > size:
            raise LlmconvError(f"re-read tensor table disagrees: offset {offset}, {nbytes} bytes "
                               f"(planned {t.offset}, {t.nbytes})", file=label, tensor=name)
        end = offset + nbytes
