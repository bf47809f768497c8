"""Tensor data written past the page cache (formats/positional.py: O_DIRECT for the whole aligned
blocks of each piece, the rest buffered). The bytes must be exactly those a plain pwrite gives,
wherever the pieces start and end; the direct path must really be taken where it can be; and a
file system that refuses a direct write gets the bytes through the page cache instead."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from llmconv import quantize as q
from llmconv.convert import stream
from llmconv.convert.plan import SourceTensor
from llmconv.formats import positional
from llmconv.formats.positional import DIRECT_ALIGN, DIRECT_MIN, direct_span, open_direct, pwrite_direct


@pytest.mark.parametrize("pos", [0, 1, 100, DIRECT_ALIGN - 2, DIRECT_ALIGN, 3 * DIRECT_ALIGN + 32])
@pytest.mark.parametrize("nbytes", [DIRECT_MIN - 1, DIRECT_MIN + DIRECT_ALIGN, 5 * DIRECT_MIN + 7])
def test_the_direct_span_is_every_whole_aligned_block_and_nothing_else(pos, nbytes):
    addr = 7 * DIRECT_ALIGN + pos % DIRECT_ALIGN  # memory lined up with the file offset
    head, body = direct_span(pos, nbytes, addr)
    first = -(-pos // DIRECT_ALIGN) * DIRECT_ALIGN  # first block boundary at or after pos
    whole = ((pos + nbytes) // DIRECT_ALIGN * DIRECT_ALIGN - first) if pos + nbytes > first else 0
    if whole < DIRECT_MIN:
        assert (head, body) == (0, 0)
    else:
        assert (pos + head, body) == (first, whole)
        assert (addr + head) % DIRECT_ALIGN == 0 and head + body <= nbytes
    # memory not lined up with the file: nothing can go direct
    assert direct_span(pos, nbytes, addr + 8) == (0, 0)


def _open(path):
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    dfd = open_direct(fd)
    if dfd < 0:
        os.close(fd)
        pytest.skip(f"the file system of {path} refuses O_DIRECT")
    return fd, dfd


@pytest.mark.parametrize("workers", ["threads", "processes"])
def test_chunks_at_unaligned_offsets_land_byte_for_byte_and_mostly_direct(tmp_path, monkeypatch, workers):
    """The engine's chunks of two tensors at odd offsets (chunk edges fall mid-block), two
    workers (threads, or forked processes writing the same file): the file equals the data,
    and most of it went through the direct descriptor."""
    rows, cols = 96, 1000  # 4,000-byte rows, chunks of 20 rows: 80,000 bytes each
    data = [np.arange(rows * cols, dtype=np.float32).reshape(rows, cols) + 1e6 * k for k in range(2)]
    offsets = [100, 100 + rows * cols * 4 + 36]
    fd, dfd = _open(tmp_path / "out.bin")
    log = tmp_path / "direct.log"  # a file, not a list: forked workers share no memory

    def counted(*args):
        n = pwrite_direct(*args)
        with open(log, "a") as f:
            f.write(f"{n}\n")
        return n

    monkeypatch.setattr(stream, "pwrite_direct", counted)

    def reader(k):
        def read(a, b, out):
            out[...] = data[k][a:b]

        return read

    jobs = [
        stream.Job(
            SourceTensor(name=str(k), shape=(rows, cols), load=lambda: None, files=[], read_rows=reader(k)),
            [stream.Sink(q.get("f32"), fd, offsets[k], direct_fd=dfd)],
        )
        for k in range(2)
    ]
    try:
        stream.run(jobs, threads=2, chunk_weights=20 * cols, workers=workers)
    finally:
        os.close(dfd)
        os.close(fd)
    for k in range(2):
        got = np.fromfile(tmp_path / "out.bin", np.float32, count=rows * cols, offset=offsets[k])
        assert np.array_equal(got, data[k].reshape(-1)), f"tensor {k}"
    went_direct = [int(x) for x in log.read_text().split()]
    assert len(went_direct) == 10 and sum(went_direct) >= 0.75 * 2 * rows * cols * 4, went_direct


def test_a_refused_direct_write_goes_through_the_page_cache(tmp_path, monkeypatch):
    """A direct write the kernel rejects with EINVAL (here: 256-byte alignment, below the
    device's 512-byte sectors, a real refusal by the file system) must not lose the bytes."""
    monkeypatch.setattr(positional, "DIRECT_ALIGN", 256)
    monkeypatch.setattr(positional, "DIRECT_MIN", 256)
    fd, dfd = _open(tmp_path / "out.bin")
    buf = np.frombuffer(os.urandom(1 << 20), np.uint8)
    pos = 512 * 9 + 256
    start = (pos - buf.ctypes.data) % 256  # place the piece so memory lines up with pos
    piece = buf[start : start + 200_000]
    try:
        assert positional.direct_span(pos, piece.nbytes, piece.ctypes.data)[1] > 0
        try:
            os.pwrite(dfd, piece[:1024], pos)
            pytest.skip("this file system takes 256-byte-aligned direct writes: nothing to refuse")
        except OSError:
            pass
        assert pwrite_direct(fd, dfd, piece, pos) == 0
    finally:
        os.close(dfd)
        os.close(fd)
    got = np.fromfile(tmp_path / "out.bin", np.uint8, count=piece.nbytes, offset=pos)
    assert np.array_equal(got, piece)


def _f32_jobs(data, fd, offsets, dfd=-1, done=None):
    def reader(k):
        def read(a, b, out):
            out[...] = data[k][a:b]

        return read

    return [
        stream.Job(
            SourceTensor(name=str(k), shape=d.shape, load=lambda: None, files=[], read_rows=reader(k)),
            [stream.Sink(q.get("f32"), fd, offsets[k], direct_fd=dfd)],
            done=done,
        )
        for k, d in enumerate(data)
    ]


@pytest.mark.parametrize("threads", [1, 2])
def test_chunks_written_behind_keep_their_bytes_while_the_worker_goes_on(tmp_path, monkeypatch, threads):
    """Every write is delayed, so each worker converts its next chunk (and the one after)
    while the previous one is still being written: the bytes of a chunk in flight must not
    be overwritten by the next, and done() still sees all of a tensor's bytes on disk."""
    rows, cols = 40, 256
    data = [np.arange(rows * cols, dtype=np.float32).reshape(rows, cols) * (k + 1) for k in range(3)]
    offsets = [k * rows * cols * 4 for k in range(3)]
    path = tmp_path / "out.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    seen = []

    def slow(*args):
        threading.Event().wait(0.005)
        return pwrite_direct(*args)

    def done(job):
        k = int(job.src.name)
        got = np.fromfile(path, np.float32, count=rows * cols, offset=offsets[k])
        seen.append((k, np.array_equal(got, data[k].reshape(-1))))

    monkeypatch.setattr(stream, "pwrite_direct", slow)
    try:
        stream.run(_f32_jobs(data, fd, offsets, done=done), threads=threads, chunk_weights=4 * cols)
    finally:
        os.close(fd)
    assert seen == [(0, True), (1, True), (2, True)]
    assert not [t.name for t in threading.enumerate() if t.name.startswith("llmconv-write")]


def test_a_failed_write_behind_is_raised_and_no_writer_outlives_the_run(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDONLY)  # every pwrite fails (EBADF) in the writer thread
    data = [np.ones((8, 64), np.float32)]
    try:
        with pytest.raises(OSError):
            stream.run(_f32_jobs(data, fd, [0]), threads=2, chunk_weights=64)
    finally:
        os.close(fd)
    assert not [t.name for t in threading.enumerate() if t.name.startswith("llmconv-write")]
