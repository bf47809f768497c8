"""The streaming engine's scheduling (convert/stream.py): workers pull chunks themselves, so
a slow chunk holds up nobody else, yet every job is finished (`done`) in job order and only
once all its chunks are written; the first error stops the run and is raised."""
from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from llmconv import quantize as q
from llmconv.convert import stream
from llmconv.convert.plan import SourceTensor
from llmconv.errors import LlmconvError


def _job(name, rows, cols, fd, offset, read_rows, done):
    src = SourceTensor(name=name, shape=(rows, cols), load=lambda: None, files=[], source_name=name,
                       read_rows=read_rows)
    return stream.Job(src, [stream.Sink(q.get("f32"), fd, offset)], done=done)


def test_a_slow_chunk_blocks_no_other_worker_and_jobs_finish_in_order(tmp_path):
    """Job 0's only chunk waits until the last job has been read by the other worker. The old
    engine handed chunks out from the main thread, at most 2 per worker in flight, and waited
    for the oldest: the last job was never handed out and job 0 timed out. Here the other
    worker pulls every remaining chunk, and done() still runs in job order, after each job's
    bytes are written."""
    rows, cols, n_jobs = 4, 8, 6
    last_read = threading.Event()
    fd = os.open(tmp_path / "out.bin", os.O_RDWR | os.O_CREAT, 0o644)
    finished: list[int] = []

    def reader(i):
        def read(a, b, out):
            if i == 0:
                assert last_read.wait(timeout=20), "the other worker never got to the last job"
            out[...] = i
            if i == n_jobs - 1:
                last_read.set()
        return read

    def done(job):
        i = int(job.src.name)
        data = np.fromfile(tmp_path / "out.bin", np.float32, count=rows * cols, offset=i * rows * cols * 4)
        assert np.all(data == i)            # all of its bytes are written before done()
        finished.append(i)

    jobs = [_job(str(i), rows, cols, fd, i * rows * cols * 4, reader(i), done) for i in range(n_jobs)]
    try:
        stream.run(jobs, threads=2)
    finally:
        os.close(fd)
    assert finished == list(range(n_jobs))


def test_the_first_error_stops_the_run_and_is_raised(tmp_path):
    fd = os.open(tmp_path / "out.bin", os.O_RDWR | os.O_CREAT, 0o644)
    started: list[int] = []

    def reader(i):
        def read(a, b, out):
            started.append(i)
            if i == 1:
                raise LlmconvError("cannot read", file="f", tensor=str(i))
            out[...] = 0
        return read

    jobs = [_job(str(i), 2, 4, fd, i * 32, reader(i), None) for i in range(50)]
    try:
        with pytest.raises(LlmconvError, match="tensor 1: cannot read"):
            stream.run(jobs, threads=1)
    finally:
        os.close(fd)
    assert started == [0, 1]
