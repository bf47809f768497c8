"""The streaming engine's workers as forked processes (stream.run at -t 2 and up, on Linux,
for runs that quantize: see `wanted`).

Why processes: a worker spends most of its time in numpy calls that release the GIL, but
between them it runs Python glue that holds it, and a quantization kernel makes a few dozen
such calls per 1M-weight chunk. Two worker threads then hand the GIL back and forth at
nearly every call boundary, each handoff a futex wake on the other CPU. `python
bench/workers.py` runs one kernel as one thread, two threads and two processes: on this idle
2-core VM two threads gave 1.54x one thread's throughput for q4_0 (1.43x for q8_0), two
processes 1.67x (1.71x). In the whole 1.1B q4_0 conversion at -t 2, worker threads took 3.31 s
and processes 2.81 s (bench/pipeline.py's engines section).

How: the plan, the open files and every job's reader already exist when the engine starts,
so the workers are forked from it and inherit them all (nothing is pickled or re-opened).
Each worker claims the next work item from a counter in shared memory, converts it with the
same code as a worker thread (chunk_work.py), writes the bytes itself at their planned
offsets (positional writes: any process may write any chunk), behind a writer thread of its
own, and reports each written chunk on a pipe. The parent only counts progress and runs each
job's `done` (marking, hashing) in job order, as with threads. Output bytes do not depend on
who converts a chunk (tests/test_stream_engine.py compares the engines' files).

A job whose source can only load whole tensors (or whole experts) is one work item per
tensor (or expert): one process loads it, as one shared load did with threads.

Failure: a worker sends the first error it hits (LlmconvError, OSError, or a bug's
traceback) and exits; the parent stops the others from claiming work, kills and reaps them
and raises it. Workers ignore SIGINT (the parent handles Ctrl-C and kills them) and die with
the parent (PR_SET_PDEATHSIG). They leave with os._exit: no atexit handler, temp-file
cleanup or stdio flush of the parent's runs twice.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import sys
import traceback
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

from ..errors import LlmconvError
from .chunk_work import Job, read_ahead
from .worker_threads import interrupts_held, name_os_thread

# One message per pipe write, at most PIPE_BUF bytes, so that writes of several workers never
# interleave: kind, payload length, job index, bytes (a chunk), then the payload (an error).
_HEAD = struct.Struct("<BIqq")
_CHUNK, _ERROR, _EXIT = 1, 2, 3
_PAYLOAD_MAX = 4096 - _HEAD.size
_NEXT, _STOP, _PREFETCHED = 0, 1, 2  # slots of the shared counter array

Item = list  # [(job index, first row, end row), ...]: converted by one worker, in order


class Unavailable(Exception):
    """No worker process could be started here (no shared semaphores, fork refused); raised
    before any work is done, so the run can go on with threads."""


def wanted(threads: int, quantizes: bool) -> bool:
    """Processes at -t 2 and up on Linux for a run that quantizes (stream._quantizes);
    LLMCONV_WORKERS=threads or =processes decides instead. Elsewhere: threads. fork is Linux's
    cheap, well-trodden path; macOS's system libraries are not fork-safe, and Windows has no fork."""
    if threads < 2 or not sys.platform.startswith("linux") or not hasattr(os, "fork"):
        return False
    choice = os.environ.get("LLMCONV_WORKERS", "auto")
    return choice == "processes" or (choice != "threads" and quantizes)


def work_items(jobs: Sequence[Job], spans: list[list[tuple[int, int]]]) -> list[Item]:
    """One item per chunk; for a job without read_rows, one per whole tensor or per expert
    (chunks of one expert are contiguous: stream.chunks never lets one cross an expert)."""
    items: list[Item] = []
    for i, (job, job_spans) in enumerate(zip(jobs, spans)):
        if job.src.read_rows is not None:
            items.extend([(i, a, b)] for a, b in job_spans)
            continue
        rows = job.rows_cols[0]
        per = rows // len(job.src.parts) if job.src.parts else max(rows, 1)
        groups: dict[int, Item] = {}
        for a, b in job_spans:
            groups.setdefault(a // per, []).append((i, a, b))
        items.extend(groups.values())
    return items


def run(
    jobs: Sequence[Job],
    spans: list[list[tuple[int, int]]],
    processes: int,
    on_chunk: Callable[[int, int], None],
    convert: Callable,
    write: Callable,
) -> None:
    """Convert and write every item with `processes` forked workers; `on_chunk(job index,
    bytes)` runs in this process for each written chunk. `convert(job, a, b, turn)` and
    `write(writes)` are stream.py's. Raises the first worker's error, or Unavailable before
    any work when no worker can be started."""
    try:
        import multiprocessing

        ctx = multiprocessing.get_context("fork")
        shared = ctx.RawArray("q", 3)
        lock = ctx.Lock()  # a POSIX semaphore: needs /dev/shm
    except (ImportError, OSError, ValueError) as e:
        raise Unavailable(f"no shared counter for worker processes: {e}") from None
    items = work_items(jobs, spans)
    sys.stdout.flush()
    sys.stderr.flush()
    rfd, wfd = os.pipe()
    pids: list[int] = []
    try:
        with interrupts_held():  # every forked pid recorded before a Ctrl-C can interrupt
            _fork_workers(
                processes, items, pids, rfd, lambda: _worker_main(jobs, items, shared, lock, wfd, convert, write)
            )
        os.close(wfd)
        wfd = -1
        error = _collect(rfd, len(pids), shared, on_chunk)
        if error is not None:
            raise error
    except BaseException:
        shared[_STOP] = 1
        for pid in pids:
            _kill(pid)
        raise
    finally:
        if wfd >= 0:
            os.close(wfd)
        os.close(rfd)
        for pid in pids:
            _reap(pid)


def _fork_workers(processes: int, items, pids: list[int], rfd: int, worker_main) -> None:
    """Fork up to `processes` workers (one per item at most), recording each pid in `pids`."""
    for _ in range(min(processes, len(items)) or 1):
        # Python 3.12+ warns when a process with threads (tqdm's monitor) forks; the worker
        # runs only this module's code and leaves with os._exit
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                pid = os.fork()
        except OSError as e:  # EAGAIN, ENOMEM: go on with the workers there are, or threads
            if not pids:
                raise Unavailable(f"cannot fork a worker process: {e.strerror}") from None
            break
        if pid == 0:  # the worker: never returns
            os.close(rfd)
            worker_main()
        pids.append(pid)


def _collect(rfd: int, workers: int, shared, on_chunk) -> BaseException | None:
    """Read the workers' messages until all have left. Returns the first error (the others
    are then stopped), or a worker's death as an error."""
    pipe = os.fdopen(os.dup(rfd), "rb", buffering=1 << 16)
    error: BaseException | None = None
    left = workers
    with pipe:
        while left:
            head = pipe.read(_HEAD.size)
            if len(head) < _HEAD.size:  # every writer is gone, some without saying goodbye
                return error or RuntimeError(f"{left} worker process(es) died without a word (killed? out of memory?)")
            kind, n, i, nbytes = _HEAD.unpack(head)
            payload = pipe.read(n) if n else b""
            if kind == _CHUNK and error is None:
                try:
                    on_chunk(i, nbytes)
                except BaseException as e:  # a failing `done` stops the workers too
                    shared[_STOP] = 1
                    error = e
            elif kind == _ERROR:
                shared[_STOP] = 1
                error = error or _error_from(json.loads(payload))
            elif kind == _EXIT:
                left -= 1
    return error


def _send(wfd: int, kind: int, i: int = 0, nbytes: int = 0, payload: bytes = b"") -> None:
    os.write(wfd, _HEAD.pack(kind, len(payload), i, nbytes) + payload)


def _worker_main(jobs, items, shared, lock, wfd, convert, write) -> None:
    code = 1
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for sig in (signal.SIGTERM, signal.SIGHUP):  # not the parent's handlers (atomic.py's, the
            signal.signal(sig, signal.SIG_DFL)  # fork's): a worker killed from outside just dies
        _die_with_parent()
        name_os_thread()
        if "torch" in sys.modules:  # as a DataLoader worker does: no intra-op pool after fork
            sys.modules["torch"].set_num_threads(1)
        _convert_items(jobs, items, shared, lock, wfd, convert, write)
        code = 0
    except BaseException as e:
        shared[_STOP] = 1  # the other workers claim nothing more, even before the parent hears of it
        try:
            _send(wfd, _ERROR, payload=_error_payload(e))
        except BaseException:
            pass
    finally:
        try:
            _send(wfd, _EXIT)
        finally:
            os._exit(code)


def _convert_items(jobs, items, shared, lock, wfd, convert, write) -> None:
    """The worker thread's loop (stream._worker) in a worker process, one chunk ahead: a reader
    thread reads chunk k + 1's stored bytes (for data not in the page cache, a synchronous
    direct read) while this thread converts chunk k and a writer thread writes chunk k - 1
    behind. Each of the three is in its own turn of the arenas (chunk_work.py), so none
    overwrites another's bytes. Only the pread is ahead: the widening and everything else that
    runs Python stays on this thread (two busy threads would hand the GIL back and forth)."""
    reader = ThreadPoolExecutor(1, initializer=name_os_thread, initargs=(b"llmconv-read",))
    writer = ThreadPoolExecutor(1, initializer=name_os_thread, initargs=(b"llmconv-write",))
    pending = None  # (write in flight, job index, bytes) of the previous chunk
    todo = _claimed_chunks(jobs, items, shared, lock)
    try:
        nxt, turn = next(todo, None), 0
        ahead = reader.submit(read_ahead, jobs[nxt[0]], nxt[1], nxt[2], turn) if nxt else None
        while nxt is not None:
            (i, a, b), this_turn = nxt, turn
            loaded = ahead.result()
            nxt, turn = next(todo, None), (turn + 1) % 3
            if nxt is not None:
                ahead = reader.submit(read_ahead, jobs[nxt[0]], nxt[1], nxt[2], turn)
            writes = convert(jobs[i], a, b, this_turn, loaded)
            del loaded
            if pending is not None:
                _finish(pending, wfd)
            pending = (writer.submit(write, writes), i, jobs[i].chunk_bytes(a, b))
            if nxt is None or nxt[0] != i:  # this process is done with job i: drop whole-tensor loads
                jobs[i]._whole, jobs[i]._slices = None, {}
        if pending is not None:
            _finish(pending, wfd)
    finally:
        reader.shutdown(wait=True)
        writer.shutdown(wait=True)


def _claimed_chunks(jobs, items, shared, lock):
    """(job index, first row, end row) of every chunk of every item this worker claims, in order."""
    while (k := _claim(jobs, items, shared, lock)) is not None:
        yield from items[k]


def _finish(pending, wfd: int) -> None:
    write, i, nbytes = pending
    write.result()
    _send(wfd, _CHUNK, i, nbytes)


def _claim(jobs, items, shared, lock) -> int | None:
    """The next item for this worker, or None when all are taken or the run stops. The first
    claim of a job's item starts reading the next job's tensor (read-ahead, as with threads)."""
    with lock:
        k = shared[_NEXT]
        if shared[_STOP] or k >= len(items):
            return None
        shared[_NEXT] = k + 1
        nxt = items[k][0][0] + 1
        prefetch = nxt > shared[_PREFETCHED] and nxt < len(jobs)
        if prefetch:
            shared[_PREFETCHED] = nxt
    if prefetch and jobs[nxt].src.prefetch is not None:
        jobs[nxt].src.prefetch()
    return k


def _error_payload(e: BaseException) -> bytes:
    if isinstance(e, LlmconvError):
        doc = {"kind": "llmconv", "message": e.message, "file": e.file, "tensor": e.tensor}
    elif isinstance(e, OSError):
        doc = {"kind": "os", "errno": e.errno, "strerror": e.strerror, "filename": e.filename}
        doc["filename"] = None if doc["filename"] is None else str(doc["filename"])
    else:
        doc = {"kind": "bug", "what": f"{type(e).__name__}: {e}", "where": traceback.format_exc()}
    raw = json.dumps(doc).encode()
    while len(raw) > _PAYLOAD_MAX:  # keep one message one atomic pipe write: trim the longest text
        key = max((k for k, v in doc.items() if isinstance(v, str)), key=lambda k: len(doc[k]))
        doc[key] = doc[key][: len(doc[key]) - (len(raw) - _PAYLOAD_MAX) - 16] + "…"
        raw = json.dumps(doc).encode()
    return raw


def _error_from(doc: dict) -> BaseException:
    if doc["kind"] == "llmconv":
        return LlmconvError(doc["message"], file=doc["file"], tensor=doc["tensor"])
    if doc["kind"] == "os":
        args = (doc["errno"], doc["strerror"]) + ((doc["filename"],) if doc["filename"] else ())
        return OSError(*args)
    return RuntimeError(f"a worker process failed: {doc['what']}\n{doc['where']}")


def _die_with_parent() -> None:
    """PR_SET_PDEATHSIG: a worker dies with the conversion (no orphan writing into an unlinked
    temp file). If the parent is already gone, leave now."""
    parent = os.getppid()
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(1)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass
