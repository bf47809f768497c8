"""Run a plan: load each tensor, convert it, and stream it into a GGUF file.

The layout is fixed before the first byte of data, so every tensor has a known offset.
While one tensor is converted and written, the next one is already being loaded in a
background thread (the only read-ahead: memory stays at about two tensors).
The output appears under its final name only when complete (see formats/atomic.py).
"""
from __future__ import annotations

import errno
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from .. import quantize as q
from ..errors import LlmconvError
from ..formats.atomic import atomic_output
from ..formats.gguf_writer import KV, GGUFFileWriter, TensorEntry, plan_layout
from .plan import Plan, PlannedTensor


@dataclass
class WriteResult:
    path: Path
    n_tensors: int
    nbytes: int
    seconds: float


def convert_tensor(t: PlannedTensor, data: np.ndarray, threads: int) -> np.ndarray:
    """Float array -> the bytes of `t` in its planned type, with errors that name the tensor."""
    where = t.src.files[0] if t.src.files else None
    label = t.src.source_name or t.name
    if tuple(data.shape) != tuple(t.shape):
        raise LlmconvError(f"loaded shape {tuple(data.shape)} != planned {tuple(t.shape)}", file=where, tensor=label)
    try:
        return q.quantize_tensor(data, t.qtype, threads=threads)
    except q.NonFiniteError as e:
        raise LlmconvError(f"{e} (cannot convert to {t.qtype.name})", file=where, tensor=label) from None


def _load(t: PlannedTensor) -> np.ndarray:
    where = t.src.files[0] if t.src.files else None
    try:
        return t.src.load()
    except LlmconvError:
        raise
    except (RuntimeError, OSError, ValueError) as e:
        raise LlmconvError(f"cannot read tensor data: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
                           file=where, tensor=t.src.source_name or t.name) from None


def layout_for(kvs: Sequence[KV], plan: Plan):
    return plan_layout(kvs, [TensorEntry(t.name, t.shape, t.qtype.ggml_type, t.nbytes) for t in plan.tensors])


def write_gguf(out_path: str | Path, kvs: Sequence[KV], plan: Plan, *, threads: int = 1,
               progress: bool = True, force: bool = False, verbose: bool = False) -> WriteResult:
    out_path = Path(out_path)
    layout = layout_for(kvs, plan)
    start = time.perf_counter()
    with atomic_output(out_path, force=force) as tmp:
        try:
            with GGUFFileWriter(tmp, layout) as writer, ThreadPoolExecutor(1) as reader, \
                    tqdm(total=layout.total_size, unit="B", unit_scale=True, unit_divisor=1024,
                         desc=out_path.name, disable=not progress, leave=False) as bar:
                bar.update(layout.data_start)
                pending = reader.submit(_load, plan.tensors[0]) if plan.tensors else None
                for i, t in enumerate(plan.tensors):
                    data = pending.result()
                    # read the next tensor while this one is converted and written
                    pending = reader.submit(_load, plan.tensors[i + 1]) if i + 1 < len(plan.tensors) else None
                    bar.set_postfix_str(t.name, refresh=False)
                    blob = convert_tensor(t, data, threads)
                    del data
                    writer.write_tensor(t.name, blob)
                    del blob
                    if verbose:
                        bar.write(f"  {t.name:32s} {t.qtype.name:6s} {str(t.shape):18s} {t.nbytes:>12,d} B")
                    bar.update(t.nbytes)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise LlmconvError(f"write failed: {e.strerror}", file=out_path) from None
            raise
        check_written(tmp, layout, out_path)
    return WriteResult(out_path, len(plan.tensors), layout.total_size, time.perf_counter() - start)


def check_written(path: Path, layout, label: Path) -> None:
    """Re-read the header and tensor table just written and compare with the layout."""
    from gguf import GGUFReader

    size = path.stat().st_size
    if size != layout.total_size:
        raise LlmconvError(f"written size {size} != planned {layout.total_size}", file=label)
    r = GGUFReader(path)
    got = {t.name: (int(t.data_offset), int(t.n_bytes), int(t.tensor_type)) for t in r.tensors}
    for t in layout.tensors:
        want = (layout.data_start + t.offset, t.nbytes, int(t.ggml_type))
        if got.get(t.name) != want:
            raise LlmconvError(f"re-read tensor table disagrees: {got.get(t.name)} != {want}", file=label, tensor=t.name)
