"""The streaming engine's scheduling (convert/stream.py): workers pull chunks themselves, so
a slow chunk holds up nobody else, yet every job is finished (`done`) in job order and only
once all its chunks are written; the first error stops the run and is raised."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from llmconv import quantize as q
from llmconv.convert import stream
from llmconv.convert.plan import SourceTensor
from llmconv.errors import LlmconvError


def _job(name, rows, cols, fd, offset, read_rows, done):
    src = SourceTensor(
        name=name, shape=(rows, cols), load=lambda: None, files=[], source_name=name, read_rows=read_rows
    )
    return stream.Job(src, [stream.Sink(q.get("f32"), fd, offset)], done=done)


ENGINES = ["threads", "processes"]


@pytest.mark.parametrize("workers", ENGINES)
def test_a_slow_chunk_blocks_no_other_worker_and_jobs_finish_in_order(tmp_path, workers):
    """Job 0's only chunk waits until the last job has been read by the other worker. The old
    engine handed chunks out from the main thread, at most 2 per worker in flight, and waited
    for the oldest: the last job was never handed out and job 0 timed out. Here the other
    worker pulls every remaining chunk, and done() still runs in job order, after each job's
    bytes are written. (The signal is a file: forked workers share no memory.)"""
    rows, cols, n_jobs = 4, 8, 6
    last_read = tmp_path / "last-job-read"
    fd = os.open(tmp_path / "out.bin", os.O_RDWR | os.O_CREAT, 0o644)
    finished: list[int] = []

    def reader(i):
        def read(a, b, out):
            if i == 0:
                deadline = time.monotonic() + 20
                while not last_read.exists():
                    assert time.monotonic() < deadline, "the other worker never got to the last job"
                    time.sleep(0.005)
            out[...] = i
            if i == n_jobs - 1:
                last_read.touch()

        return read

    def done(job):
        i = int(job.src.name)
        data = np.fromfile(tmp_path / "out.bin", np.float32, count=rows * cols, offset=i * rows * cols * 4)
        assert np.all(data == i)  # all of its bytes are written before done()
        finished.append(i)

    jobs = [_job(str(i), rows, cols, fd, i * rows * cols * 4, reader(i), done) for i in range(n_jobs)]
    try:
        stream.run(jobs, threads=2, workers=workers)
    finally:
        os.close(fd)
    assert finished == list(range(n_jobs))


@pytest.mark.parametrize("workers, threads", [("threads", 1), ("processes", 2)])
def test_the_first_error_stops_the_run_and_is_raised(tmp_path, workers, threads):
    """The error crosses from a worker process as the same one-line LlmconvError; the run
    stops (a worker finishes at most the chunk it holds), and no job after it is `done`."""
    fd = os.open(tmp_path / "out.bin", os.O_RDWR | os.O_CREAT, 0o644)
    log = tmp_path / "started.log"
    finished: list[int] = []

    def reader(i):
        def read(a, b, out):
            with open(log, "a") as f:
                f.write(f"{i}\n")
            if i == 1:
                raise LlmconvError("cannot read", file="f", tensor=str(i))
            time.sleep(0.01)
            out[...] = 0

        return read

    jobs = [
        _job(str(i), 2, 4, fd, i * 32, reader(i), lambda job: finished.append(int(job.src.name))) for i in range(50)
    ]
    try:
        with pytest.raises(LlmconvError, match="^f: tensor 1: cannot read$"):
            stream.run(jobs, threads=threads, workers=workers)
    finally:
        os.close(fd)
    started = sorted(int(x) for x in log.read_text().split())
    assert started[:2] == [0, 1] and len(started) <= 6, started  # each worker: its chunk and the one claimed ahead
    assert finished in ([], [0])


def _stored(tmp_path, dtype: str, values: np.ndarray):
    """A RawTensor over `values` written to a file in `dtype` (bf16: the top half of float32)."""
    from llmconv.formats.rawread import RawTensor, SourceFile

    if dtype == "bf16":
        data = (values.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    else:
        data = values.astype({"f16": np.float16, "f32": np.float32}[dtype])
    path = tmp_path / f"{dtype}.bin"
    path.write_bytes(b"\0" * 24 + data.tobytes())  # the tensor does not start the file
    return RawTensor(SourceFile(path), 24, dtype, values.shape, f"w.{dtype}")


def _written(tmp_path, raw, types, verbatim: bool, label: str) -> list[bytes]:
    """Every type's bytes of `raw`, through the engine; verbatim=False hides the RawTensor behind
    a lambda, so the engine widens and casts as for any other source."""
    rows, cols = raw.shape
    read = raw.read_rows if verbatim else (lambda a, b, out: raw.read_rows(a, b, out))
    src = SourceTensor(
        name="w", shape=raw.shape, load=raw.load, files=[raw.file.path], source_name=raw.label, read_rows=read
    )
    paths = [tmp_path / f"{label}-{t}.bin" for t in types]
    fds = [os.open(p, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644) for p in paths]
    try:
        job = stream.Job(src, [stream.Sink(q.get(t), fd, 0) for t, fd in zip(types, fds)])
        assert (stream.verbatim_source(job) is not None) == verbatim
        stream.run([job], threads=2, chunk_weights=3 * cols)
    finally:
        for fd in fds:
            os.close(fd)
    return [p.read_bytes() for p in paths]


@pytest.mark.parametrize("dtype, outtype", [("bf16", "bf16"), ("f16", "f16"), ("f32", "f32"), ("bf16", "f16")])
def test_an_output_written_from_the_stored_bytes_equals_the_cast(tmp_path, dtype, outtype, monkeypatch):
    """bf16 -> bf16, f16 -> f16, f32 -> f32 copy the stored bytes and bf16 -> f16 transcodes
    them (stream.verbatim_source, floats.FROM_STORED): every byte equals what widening and
    casting gives, for normals, subnormals, signed zeros and values past f16's range; the other
    outputs of the same read are unchanged; a NaN is refused with the same message either way.
    Writes are slowed down, so the stored bytes of a chunk still being written behind must
    survive the worker's next reads."""
    write = stream.pwrite_direct
    monkeypatch.setattr(stream, "pwrite_direct", lambda *a: (threading.Event().wait(0.003), write(*a))[1])
    rng = np.random.default_rng(7)
    v = rng.standard_normal((11, 2048)).astype(np.float32) * 0.02  # chunks past 4 KiB: they share arena pages
    v[0, :8] = [0.0, -0.0, 1e-41, -3e-39, 6e-8, -3e-5, 65504.0, -1e5 if dtype != "f16" else -65504.0]
    raw = _stored(tmp_path, dtype, v)
    types = [outtype, "q8_0", "f32" if dtype != "f32" else "f16"]
    assert _written(tmp_path, raw, types, True, "copy") == _written(tmp_path, raw, types, False, "cast")
    v[9, 5] = np.nan
    bad = _stored(tmp_path, dtype, v)
    errors = []
    for verbatim in (True, False):
        with pytest.raises(LlmconvError) as e:
            _written(tmp_path, bad, [outtype], verbatim, f"nan-{verbatim}")
        errors.append(str(e.value))
    assert errors[0] == errors[1] and "row 9" in errors[0]


def _children() -> list[int]:
    """This process's live children (zombies included)."""
    pid = os.getpid()
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        out += [int(c) for c in open(f"/proc/{pid}/task/{tid}/children").read().split()]
    return out


@pytest.mark.parametrize("outtype", ["q8_0,q4_K_M,f16", "q2_K"])
def test_worker_processes_write_the_bytes_worker_threads_write(tmp_path, monkeypatch, outtype):
    """A real conversion (the bundled 2-shard fixture, several outputs from one read, 4-row
    chunks so that both workers share every tensor) gives the same files with forked worker
    processes as with worker threads, and leaves no process behind."""
    from llmconv.convert import chunk_work

    import llmconv

    fixture = Path(__file__).resolve().parents[1] / "fixtures" / "tiny-llama-2shard"
    monkeypatch.setattr(chunk_work, "CHUNK_WEIGHTS", 4 * 288)
    monkeypatch.setattr(stream, "CHUNK_WEIGHTS", 4 * 288)
    files = {}
    for workers in ("threads", "processes"):
        monkeypatch.setenv("LLMCONV_WORKERS", workers)
        out = tmp_path / workers
        out.mkdir()
        llmconv.convert(fixture, f"{out}/", outtype=outtype, threads=2, checksum=True)
        files[workers] = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    assert files["threads"].keys() == files["processes"].keys() and len(files["threads"]) >= 2
    for name, data in files["threads"].items():
        assert files["processes"][name] == data, name
    assert _children() == []


def test_a_killed_worker_process_fails_the_run_in_one_line_and_nothing_is_left(tmp_path):
    """A worker that dies without a word (the OOM killer, a segfault in a library) must not
    hang the run or pass for success: the parent raises, reaps every worker, and the CLI's
    temp file is gone."""
    import signal

    fd = os.open(tmp_path / "out.bin", os.O_RDWR | os.O_CREAT, 0o644)
    parent = os.getpid()

    def read(a, b, out):
        if a == 6 and os.getpid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)
        out[...] = 1

    jobs = [_job("w", 40, 8, fd, 0, read, None)]
    try:
        with pytest.raises(RuntimeError, match=r"^1 worker process\(es\) died without a word"):
            stream.run(jobs, threads=2, chunk_weights=2 * 8, workers="processes")
    finally:
        os.close(fd)
    assert _children() == []


def test_which_engine_runs(monkeypatch):
    """Forked workers at -t 2 and up for runs that quantize; threads for a float-only run
    (copies and casts release the GIL) and at -t 1; LLMCONV_WORKERS decides when set."""
    from llmconv.convert import worker_processes as wp

    monkeypatch.delenv("LLMCONV_WORKERS", raising=False)
    assert [wp.wanted(t, qz) for t in (1, 2) for qz in (False, True)] == [False, False, False, True]
    monkeypatch.setenv("LLMCONV_WORKERS", "threads")
    assert not wp.wanted(2, True)
    monkeypatch.setenv("LLMCONV_WORKERS", "processes")
    assert wp.wanted(2, False) and not wp.wanted(1, True)
    job = _job("w", 2, 32, -1, 0, None, None)
    assert not stream._quantizes([job])  # f32
    job.sinks.append(stream.Sink(q.get("q8_0"), -1, 0))
    assert stream._quantizes([job])


@pytest.mark.parametrize("failing", ["semaphore", "fork"])
def test_without_worker_processes_the_run_goes_on_with_threads(tmp_path, monkeypatch, failing):
    """No /dev/shm for the shared counter's semaphore (some containers), or fork refused
    (EAGAIN under a process limit): the same run completes with worker threads, every job
    `done` once, in order."""
    import multiprocessing.context

    from llmconv.convert import worker_processes as wp

    def refuse(*a, **k):
        raise OSError(11 if failing == "fork" else 38, "refused here")

    if failing == "fork":
        monkeypatch.setattr(wp.os, "fork", refuse)
    else:
        monkeypatch.setattr(multiprocessing.context.ForkContext, "Lock", refuse)
    rows, cols, n_jobs = 5, 16, 4
    fd = os.open(tmp_path / "out.bin", os.O_RDWR | os.O_CREAT, 0o644)
    finished: list[str] = []

    def reader(i):
        def read(a, b, out):
            out[...] = np.arange(a, b, dtype=np.float32)[:, None] + 100 * i

        return read

    jobs = [
        _job(
            str(i),
            rows,
            cols,
            fd,
            i * rows * cols * 4,
            reader(i),
            lambda j: finished.append(j.src.name),
        )
        for i in range(n_jobs)
    ]
    try:
        stream.run(jobs, threads=2, chunk_weights=2 * cols, workers="processes")
    finally:
        os.close(fd)
    assert finished == ["0", "1", "2", "3"]
    got = np.fromfile(tmp_path / "out.bin", np.float32).reshape(n_jobs, rows, cols)
    for i in range(n_jobs):
        assert np.array_equal(got[i], np.arange(rows, dtype=np.float32)[:, None] + 100 * i + np.zeros(cols)), i


def test_a_ctrl_c_while_workers_start_is_raised_once_they_all_have():
    """Ctrl-C held back while the engine starts its threads or forks its processes: raised on
    leaving, not inside (inside Thread.start() it left a thread that cleanup could not join:
    "cannot join thread before it is started", exit 70 instead of 130)."""
    import signal

    from llmconv.convert.worker_threads import interrupts_held

    reached_end = False
    with pytest.raises(KeyboardInterrupt):
        with interrupts_held():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # without the hold, KeyboardInterrupt would be raised here
            reached_end = True
    assert reached_end
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is restored
