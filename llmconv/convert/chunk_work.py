"""One chunk of the streaming engine (stream.py): rows [a, b) of a source tensor read into a
worker's arenas and converted to every sink's type, ready to be written.

The arenas are per worker and reused for every chunk, in turns: a chunk's bytes are written
behind while the worker converts its next chunk into the next turn's arenas (a worker thread
alternates two turns; a worker process three, as it also reads one chunk ahead). The output
arenas (and the stored-bytes one, for an output in the source's own type) are placed so that
their addresses line up with the bytes' file offsets, for direct writes (formats/positional.py).
"""

from __future__ import annotations

import inspect
import threading
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .. import quantize as q
from ..errors import LlmconvError
from ..formats.positional import DIRECT_ALIGN
from ..formats.rawread import RawTensor
from ..quantize import floats
from ..quantize.floats import widen_into

from .plan import SourceTensor

CHUNK_WEIGHTS = 1 << 20  # weights per work item: 4 MiB of float32


@dataclass
class Sink:
    """One tensor's destination in one output file."""

    qtype: q.QuantType
    fd: int
    offset: int  # absolute file offset of the tensor's first byte
    imatrix: np.ndarray | None = None  # importance of each column: the type's weighted kernel
    direct_fd: int = -1  # the same file opened O_DIRECT (formats/positional.py), or -1

    def row_nbytes(self, n: int) -> int:
        return self.qtype.row_nbytes(n)


@dataclass
class Job:
    """One source tensor and where it goes. `done(job)` runs on the main thread when every
    chunk of it is written."""

    src: SourceTensor
    sinks: list[Sink]
    done: Callable[["Job"], None] | None = None
    # internal: whole-tensor (or per-expert slice) fallback for sources without read_rows
    _whole: np.ndarray | None = field(default=None, repr=False)
    _slices: dict[int, np.ndarray] = field(default_factory=dict, repr=False)
    _remaining: int = field(default=0, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def rows_cols(self) -> tuple[int, int]:
        shape = self.src.shape
        n = int(shape[-1]) if shape else 1
        rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
        return rows, n

    def chunk_bytes(self, a: int, b: int) -> int:
        n = self.rows_cols[1]
        return sum((b - a) * s.row_nbytes(n) for s in self.sinks)


def _where(job: Job) -> tuple[object, str]:
    return (job.src.files[0] if job.src.files else None), (job.src.source_name or job.src.name)


class _Arenas(threading.local):
    """Per-worker buffers, grown on demand and then reused for every chunk."""

    def __init__(self):
        self.bufs: dict[str, np.ndarray] = {}

    def get(self, key: str, nbytes: int, file_pos: int | None = None) -> np.ndarray:
        """`nbytes` of the buffer `key`; with `file_pos`, placed so that their address lines up
        with that file offset modulo DIRECT_ALIGN: the bytes bound for pos can then go to the
        file past the page cache (pwrite_direct), straight from here."""
        slack = DIRECT_ALIGN if file_pos is not None else 0
        buf = self.bufs.get(key)
        if buf is None or buf.nbytes < nbytes + slack:
            buf = self.bufs[key] = np.empty(max(nbytes, CHUNK_WEIGHTS * 4) + DIRECT_ALIGN, np.uint8)
        start = 0 if file_pos is None else (file_pos - buf.ctypes.data) % DIRECT_ALIGN
        return buf[start : start + nbytes]


_arenas = _Arenas()


def _read_chunk(job: Job, a: int, b: int) -> np.ndarray:
    """Rows [a, b) of the source as float32, in this worker's arena (or a view of the
    whole tensor, or of one expert's slice, for sources that can only load those)."""
    rows, n = job.rows_cols
    try:
        if job.src.read_rows is not None:
            x = _arenas.get("f32", (b - a) * n * 4).view(np.float32).reshape(b - a, n)
            job.src.read_rows(a, b, x)
            return x
        if job.src.parts is not None:
            per = rows // len(job.src.parts)  # chunks never cross experts (see chunks)
            e = a // per
            return _expert_slice(job, e, per, n)[a - e * per : b - e * per]
        with job._lock:
            if job._whole is None:
                job._whole = _checked(job, job.src.load(), tuple(job.src.shape)).reshape(rows, n)
        return job._whole[a:b]
    except (RuntimeError, OSError, ValueError) as e:
        where, label = _where(job)
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LlmconvError(f"cannot read tensor data: {first}", file=where, tensor=label) from None


def _expert_slice(job: Job, e: int, per: int, n: int) -> np.ndarray:
    """Expert e's float32 slice [per, n] of a stacked tensor, loaded once. Older slices are
    dropped first (chunks still converting hold their own reference), so at most the slice
    being read and the one before it are alive."""
    with job._lock:
        arr = job._slices.get(e)
        if arr is None:
            job._slices = {k: v for k, v in job._slices.items() if k > e}
            want = tuple(job.src.shape[1:])
            arr = job._slices[e] = _checked(job, job.src.parts[e](), want, f"expert {e}: ").reshape(per, n)
        return arr


def _checked(job: Job, data: np.ndarray, want: tuple[int, ...], what: str = "") -> np.ndarray:
    if tuple(data.shape) != want:
        where, label = _where(job)
        raise LlmconvError(f"{what}loaded shape {tuple(data.shape)} != planned {want}", file=where, tensor=label)
    return np.ascontiguousarray(data, dtype=np.float32)


def _check_finite(x: np.ndarray) -> int | None:
    """First row of x holding NaN/inf, or None. One pass, into a reused bool arena."""
    ok = _arenas.get("finite", x.size).view(np.bool_).reshape(x.shape)
    np.isfinite(x, out=ok)
    if ok.all():
        return None
    return int(np.argmin(ok.all(axis=1)))


def _takes_out(fn) -> bool:
    try:
        return "out" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _quantize(x: np.ndarray, sink: Sink, out: np.ndarray, a: int, rows: int) -> np.ndarray:
    """The chunk (rows [a, a + len(x)) of `rows`) in the sink's type: into `out` where the
    kernel can write there."""
    qt = sink.qtype
    if sink.imatrix is not None and qt.quantize_weighted is not None:
        imp = np.asarray(sink.imatrix, dtype=np.float32)
        if imp.ndim == 1 or imp.shape[0] == 1:
            return qt.quantize_weighted(x, np.ascontiguousarray(imp).reshape(-1))
        # stacked experts, imatrix [n_mat, n]: each expert's rows with its own slice
        per = rows // imp.shape[0]
        cuts = [a] + list(range((a // per + 1) * per, a + len(x), per)) + [a + len(x)]
        return np.concatenate(
            [
                qt.quantize_weighted(x[lo - a : hi - a], np.ascontiguousarray(imp[lo // per]))
                for lo, hi in zip(cuts, cuts[1:])
            ]
        )
    return qt.quantize(x, out=out) if _takes_out(qt.quantize) else qt.quantize(x)


def verbatim_source(job: Job) -> RawTensor | None:
    """The tensor's stored bytes when they are exactly what the source gives (its read_rows is
    the RawTensor's own: no shard join, no Q/K reordering, no adapter merge). An output in the
    stored type is then those bytes, and bf16 -> f16 is an integer transcode of them
    (floats.FROM_STORED): no widening to float32, no cast back, no torch."""
    rr = job.src.read_rows
    owner = getattr(rr, "__self__", None)
    return owner if isinstance(owner, RawTensor) and getattr(rr, "__func__", None) is RawTensor.read_rows else None


def _from_stored(sink: Sink, verbatim: RawTensor | None):
    """The function writing `sink` from the stored bytes, or None (then: widen and quantize)."""
    if verbatim is None or sink.imatrix is not None:
        return None
    return floats.FROM_STORED.get((verbatim.dtype, sink.qtype.name))


def _first_nonfinite_raw(raw: np.ndarray) -> int | None:
    """First row of stored bytes (bf16 bits as uint16, float16, float32) holding NaN/inf, or None."""
    if raw.dtype == np.uint16:  # bf16: all exponent bits set
        bad = np.bitwise_and(raw, 0x7F80) == 0x7F80
    else:
        bad = ~np.isfinite(raw)
    return int(np.argmax(bad.any(axis=1))) if bad.any() else None


Write = tuple  # (fd, direct fd, bytes, file offset): one pwrite_direct


@dataclass
class Loaded:
    """A chunk's source rows: the stored bytes (for outputs written from them) and/or float32."""

    raw: np.ndarray | None
    x: np.ndarray | None


def load_chunk(job: Job, a: int, b: int, turn: int) -> Loaded:
    """Read rows [a, b) for every sink, in this thread's arenas of `turn`: the stored bytes
    where an output is written from them (stream.verbatim_source), float32 where any output is
    quantized or cast."""
    return widen_loaded(job, a, b, read_ahead(job, a, b, turn) or Loaded(None, None))


def read_ahead(job: Job, a: int, b: int, turn: int) -> Loaded | None:
    """The I/O half of load_chunk, which a worker process runs on a reader thread for its next
    chunk while it converts the current one (worker_processes.py): a verbatim source's stored
    bytes, read and nothing else (a pread releases the GIL; widening them is left to
    widen_loaded, on the converting thread). None for other sources: they are read there."""
    verbatim = verbatim_source(job)
    if verbatim is None or not job.sinks:
        return None
    rows, n = job.rows_cols
    # an output of the stored bytes themselves writes them from the raw arena: place it for that file offset
    as_is = [s for s in job.sinks if _from_stored(s, verbatim) is floats.stored_as_is]
    at = as_is[0].offset + a * as_is[0].row_nbytes(n) if as_is else None
    return Loaded(verbatim.raw_rows(a, b, at, slot=f"stored{turn}"), None)


def widen_loaded(job: Job, a: int, b: int, loaded: Loaded) -> Loaded:
    """`loaded` (from read_ahead, or empty) completed with float32 rows where a sink needs them."""
    if not job.sinks:
        return loaded
    verbatim = verbatim_source(job)
    if loaded.raw is not None and all(_from_stored(s, verbatim) for s in job.sinks):
        return loaded  # every output is written from the stored bytes
    rows, n = job.rows_cols
    # float32 rows are made and used by the converting thread alone, within one chunk: one arena
    x = _read_chunk(job, a, b) if loaded.raw is None else _widened(loaded.raw, b - a, n)
    return Loaded(loaded.raw, x)


def _convert_chunk(job: Job, a: int, b: int, turn: int) -> list[Write]:
    """Rows [a, b) read and converted for every sink (a worker thread's whole step)."""
    return convert_loaded(job, a, b, turn, load_chunk(job, a, b, turn))


def convert_loaded(job: Job, a: int, b: int, turn: int, loaded: Loaded) -> list[Write]:
    """Rows [a, b), as read by load_chunk, converted for every sink: the writes to make. The
    bytes are in this worker's arenas of `turn`, which stay untouched until the worker comes
    back to that turn, so they can be written while the worker converts its next chunk."""
    rows, n = job.rows_cols
    verbatim = verbatim_source(job)
    raw, x = loaded.raw, loaded.x
    writes: list[Write] = []
    checked = raw_checked = False
    made: dict[tuple, np.ndarray] = {}
    for sink in job.sinks:
        qt = sink.qtype
        weighted = sink.imatrix is not None and qt.quantize_weighted is not None
        key = (qt.name, id(sink.imatrix) if weighted else None)
        blob = made.get(key)
        transcode = _from_stored(sink, verbatim) if raw is not None else None
        pos = sink.offset + a * qt.row_nbytes(n)
        if blob is None and transcode is not None:
            if not raw_checked:
                bad = _first_nonfinite_raw(raw)
                if bad is not None:
                    raise q.NonFiniteError(a + bad)
                raw_checked = True
            out = _arenas.get(f"out{len(made)}/{turn}", (b - a) * qt.row_nbytes(n), pos)
            out = out.view(raw.dtype).reshape(raw.shape)
            blob = made[key] = transcode(raw, out)
        elif blob is None:
            if (weighted or not qt.checks_finite) and not checked:
                bad = _check_finite(x)
                if bad is not None:
                    raise q.NonFiniteError(a + bad)
                checked = True
            out = _arenas.get(f"out{len(made)}/{turn}", (b - a) * qt.row_nbytes(n), pos)
            try:
                blob = made[key] = _quantize(x, sink, out, a, rows)
            except q.NonFiniteError as e:
                raise q.NonFiniteError(a + e.row, e.what) from None
        writes.append((sink.fd, sink.direct_fd, blob, pos))
    return writes


def _widened(raw: np.ndarray, rows: int, n: int) -> np.ndarray:
    """Stored rows already read (for a verbatim copy) as float32 in this worker's arena."""
    x = _arenas.get("f32", rows * n * 4).view(np.float32).reshape(rows, n)
    widen_into(raw, x)
    return x
