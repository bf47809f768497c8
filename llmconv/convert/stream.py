"""The streaming engine every writer uses: read each source tensor once, in chunks of rows,
convert every chunk to each output's type, and pwrite it at its place in each output file.

Why chunks, not tensors: a chunk is ~4 MB of float32, so a worker's buffers (one float32
arena, one output arena per distinct output type) are allocated once and reused for the
whole model: no fresh memory per tensor (each fresh mmap costs a page fault per 4 KiB and
serializes the threads on the kernel's mmap lock), and peak memory does not grow with the
largest tensor. Rows are quantized independently by every kernel, so the bytes do not
depend on where chunks are cut or which thread runs them (tested).

Each of `threads` workers runs the path for its chunk (chunk_work.py): widen the source rows
into its float32 arena (bf16 -> f32 is a shift: floats.widen_into), quantize into its output
arena; one writer thread then pwrites the bytes from there (past the page cache where it
can: formats/positional.py) while the worker goes on with its next chunk. Every step is a
long numpy/torch call or a syscall that releases the GIL, so while the writer writes, one
worker reads and another computes. Workers take the next chunk themselves; the main thread
only tracks progress and finishes jobs (see run).

Several outputs from one read: a job has one sink per output file. Sinks that want the same
type share one quantization of the chunk.
"""

from __future__ import annotations

import gc
import queue
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

from .. import quantize as q
from ..errors import LlmconvError
from ..formats.positional import pwrite_direct
from ..quantize import floats
from .chunk_work import (
    CHUNK_WEIGHTS,
    Job,
    Sink,
    Write,
    _convert_chunk,
    _from_stored,
    _where,
    Loaded,
    convert_loaded,
    verbatim_source,
    widen_loaded,
)
from . import worker_processes
from .worker_threads import interrupts_held, name_os_thread, one_torch_thread, torch_module

__all__ = ["CHUNK_WEIGHTS", "Job", "Sink", "chunks", "run", "verbatim_source"]


def _work(job: Job, a: int, b: int, turn: int) -> list[Write]:
    try:
        return _convert_chunk(job, a, b, turn)
    except q.NonFiniteError as e:
        raise _non_finite(job, e) from None


def _non_finite(job: Job, e: q.NonFiniteError) -> LlmconvError:
    where, label = _where(job)
    types = ", ".join(dict.fromkeys(s.qtype.name for s in job.sinks))
    return LlmconvError(f"{e} (cannot convert to {types})", file=where, tensor=label)


def _work_loaded(job: Job, a: int, b: int, turn: int, loaded) -> list[Write]:
    """_work for a chunk whose stored bytes may already be read (a worker process reads one
    chunk ahead: chunk_work.read_ahead)."""
    try:
        return convert_loaded(job, a, b, turn, widen_loaded(job, a, b, loaded or Loaded(None, None)))
    except q.NonFiniteError as e:
        raise _non_finite(job, e) from None


def _write(writes: list[Write]) -> None:
    for fd, direct_fd, blob, pos in writes:
        pwrite_direct(fd, direct_fd, blob, pos)


def _written(job: Job) -> None:
    with job._lock:  # the last chunk frees the job's whole-tensor buffers
        job._remaining -= 1
        if job._remaining == 0:
            job._whole, job._slices = None, {}


def chunks(job: Job, chunk_weights: int | None = None):
    """(first row, end row) of each chunk of about `chunk_weights` weights (at least a row).
    A stacked tensor read expert by expert is cut at every expert's first row."""
    rows, n = job.rows_cols
    step = max(1, (chunk_weights or CHUNK_WEIGHTS) // max(n, 1))
    per = rows // len(job.src.parts) if job.src.read_rows is None and job.src.parts else rows
    for first in range(0, rows, per):
        for a in range(first, first + per, step):
            yield a, min(first + per, a + step)


class _Chunks:
    """Hands out every job's chunks in order to whichever worker asks, under a lock, and
    starts reading the next tensor from disk when a job's first chunk goes out."""

    def __init__(self, jobs: Sequence[Job], spans: list[list[tuple[int, int]]]):
        self._items = ((i, a, b) for i, job_spans in enumerate(spans) for a, b in job_spans)
        self._jobs = jobs
        self._lock = threading.Lock()
        self._stopped = False
        self._prefetched = -1

    def next(self) -> tuple[int, int, int] | None:
        with self._lock:
            item = None if self._stopped else next(self._items, None)
            if item is not None and item[0] + 1 > self._prefetched:
                self._prefetched = item[0] + 1
                after = self._jobs[item[0] + 1] if item[0] + 1 < len(self._jobs) else None
                if after is not None and after.src.prefetch is not None:
                    after.src.prefetch()  # read-ahead: the next tensor streams in meanwhile
            return item

    def stop(self) -> None:
        with self._lock:
            self._stopped = True


def _worker(
    jobs: Sequence[Job], work: _Chunks, finished: queue.SimpleQueue, errors: list[BaseException], writer
) -> None:
    """One worker thread of `run`: convert chunks until none is left, each written behind by
    `writer` while the worker converts its next one (a direct write waits for the device:
    0.1 s per 200 MiB here, which the worker would otherwise sit out); report each chunk
    (job index, bytes) on `finished` once it is written, then None when leaving."""
    name_os_thread()
    pending = None  # (write in flight, job index, a, b) of this worker's previous chunk
    turn = 0
    try:
        while (item := work.next()) is not None:
            i, a, b = item
            writes = _work(jobs[i], a, b, turn)
            if pending is not None:
                _finish(jobs, pending, finished)
            pending = (writer.submit(_write, writes), i, a, b)
            turn ^= 1
        if pending is not None:
            _finish(jobs, pending, finished)
    except BaseException as e:  # reraised by the main thread
        work.stop()
        errors.append(e)
    finally:
        finished.put(None)


def _finish(jobs: Sequence[Job], pending, finished: queue.SimpleQueue) -> None:
    """Wait for a chunk's write (raising its error), then count the chunk as done."""
    write, i, a, b = pending
    write.result()
    _written(jobs[i])
    finished.put((i, jobs[i].chunk_bytes(a, b)))


def run(
    jobs: Sequence[Job],
    threads: int = 1,
    progress: Callable[[int], None] | None = None,
    chunk_weights: int | None = None,
    workers: str = "auto",
) -> None:
    """Convert and write every job. Raises the first error (LlmconvError for bad data);
    chunks not yet started are then dropped.

    Workers pull the next chunk themselves and report finished ones on a queue: no worker
    waits for the main thread (handing chunks out from the main thread, as this engine first
    did, left each worker idle a quarter of the time at -t 2 whenever the oldest chunk in
    flight was slow or the main thread was not scheduled). The main thread only counts
    progress and calls each job's `done`, in job order, once all its chunks are written.

    `workers`: "threads", "processes" (forked: worker_processes.py, Linux) or "auto": as
    worker_processes.wanted says (processes at -t 2 and up for runs that quantize). Same bytes
    either way."""
    threads = max(1, threads)
    spans = [list(chunks(job, chunk_weights)) for job in jobs]
    left = [len(s) for s in spans]
    for job, n in zip(jobs, left):
        job._remaining = n
    if workers == "processes" or (workers == "auto" and worker_processes.wanted(threads, _quantizes(jobs))):
        _run_processes(jobs, spans, left, threads, progress)
    else:
        _run_threads(jobs, spans, left, threads, progress)


def _run_threads(jobs: Sequence[Job], spans, left: list[int], threads: int, progress) -> None:
    """run() with worker threads: this thread counts progress and runs the `done`s in order."""
    work = _Chunks(jobs, spans)
    finished: queue.SimpleQueue = queue.SimpleQueue()  # (job index, bytes) per chunk; None: a worker left
    errors: list[BaseException] = []
    # The checkpoint's and torch's objects never become garbage here; without this, the
    # collector walks all of them again and again while chunks are converted (9 % of the
    # f16 conversion's samples were gc_collect_main).
    gc.freeze()
    torch_threads = one_torch_thread() if threads > 1 and _uses_torch(jobs) else None
    # one thread makes every write: the device takes them one at a time anyway
    writer = ThreadPoolExecutor(
        1, thread_name_prefix="llmconv-write", initializer=name_os_thread, initargs=(b"llmconv-write",)
    )
    pool = [
        threading.Thread(
            target=_worker, args=(jobs, work, finished, errors, writer), name=f"llmconv-work-{k}", daemon=True
        )
        for k in range(threads)
    ]
    try:
        with interrupts_held():  # a Ctrl-C inside Thread.start() leaves a thread cleanup cannot join
            for t in pool:
                t.start()
        running, next_done = len(pool), 0
        while True:
            while next_done < len(jobs) and left[next_done] == 0 and not errors:
                if jobs[next_done].done:
                    jobs[next_done].done(jobs[next_done])
                next_done += 1
            if not running:
                break
            item = finished.get()
            if item is None:
                running -= 1
                continue
            left[item[0]] -= 1
            if progress:
                progress(item[1])
        if errors:
            raise errors[0]
    finally:
        work.stop()
        for t in pool:
            t.join()
        writer.shutdown(wait=True)  # no write may outlive the run: the caller closes the files next
        if torch_threads is not None:
            torch_module().set_num_threads(torch_threads)
        gc.unfreeze()


def _run_processes(jobs: Sequence[Job], spans, left: list[int], threads: int, progress) -> None:
    """run() with forked workers: this process counts progress and runs the `done`s in order."""
    next_done = 0

    def finish_ready() -> None:
        nonlocal next_done
        while next_done < len(jobs) and left[next_done] == 0:
            if jobs[next_done].done:
                jobs[next_done].done(jobs[next_done])
            next_done += 1

    def on_chunk(i: int, nbytes: int) -> None:
        left[i] -= 1
        if progress:
            progress(nbytes)
        finish_ready()

    if _uses_torch(jobs):
        torch_module()  # imported once, before the fork, not in every worker (~1.4 s of CPU each)
    gc.freeze()  # as in run(); here it also keeps the workers' copy-on-write pages shared
    try:
        worker_processes.run(jobs, spans, threads, on_chunk, _work_loaded, _write)
    except worker_processes.Unavailable:
        _run_threads(jobs, spans, left, threads, progress)  # nothing was done yet
        return
    finally:
        gc.unfreeze()
    finish_ready()  # the jobs after the last chunk that have no rows


def _quantizes(jobs: Sequence[Job]) -> bool:
    """Whether any output runs a quantization kernel. A run that only copies, transcodes or
    casts floats (f32/f16/bf16) spends its time in syscalls and single numpy or torch calls,
    which release the GIL: threads serve it as well as processes, without the fork (bench/
    pipeline.py's engines section: f16 -t 2 took 0.96x to 1.38x the wall with processes in
    four runs, 1.06x and 0.96x of them on the idle machine)."""
    return any(s.qtype.name not in floats.FLOAT_TYPES for j in jobs for s in j.sinks)


def _uses_torch(jobs: Sequence[Job]) -> bool:
    """Whether any output is cast by torch (quantize/floats.py), or torch is loaded anyway: a
    run without either does not import it (that costs ~1.4 s of CPU)."""
    return "torch" in sys.modules or any(
        s.qtype.name in floats.TORCH_CAST_TYPES and _from_stored(s, verbatim_source(j)) is None
        for j in jobs
        for s in j.sinks
    )
