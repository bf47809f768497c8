"""Input read past the page cache where it is not cached (formats/direct_read.py). The bytes must
be exactly the file's wherever a piece starts and ends and wherever the buffer lies; cold pieces
must really go direct (and leave the page cache empty), cached ones buffered, a mix by segment;
a file system that refuses O_DIRECT gets buffered reads; a file cut short gives the one-line error."""

from __future__ import annotations

import os

import numpy as np
import pytest

from llmconv.errors import LlmconvError
from llmconv.formats import direct_read
from llmconv.formats.direct_read import SEGMENT, cached_pages
from llmconv.formats.positional import DIRECT_ALIGN
from llmconv.formats.rawread import RawTensor, SourceFile, raw_arena

SIZE = 3 << 20


def _cold_file(tmp_path) -> tuple[SourceFile, bytes]:
    data = np.random.default_rng(7).integers(0, 256, SIZE, dtype=np.uint8).tobytes()
    path = tmp_path / "in.bin"
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    src = SourceFile(path)
    if src.direct_fd < 0:
        pytest.skip(f"the file system of {path} refuses O_DIRECT, or the kernel has no cachestat")
    _evict(src)
    return src, data


def _evict(src: SourceFile) -> None:
    os.posix_fadvise(src.fd, 0, 0, os.POSIX_FADV_DONTNEED)
    if cached_pages(src.fd, 0, SIZE):
        pytest.skip("the page cache keeps the test file after POSIX_FADV_DONTNEED")


def _spy(monkeypatch) -> list[tuple[int, int, int]]:
    """Every pread direct_read makes: (descriptor, file offset, bytes)."""
    calls = []
    real = os.preadv

    def preadv(fd, bufs, pos, *flags):
        calls.append((fd, pos, sum(memoryview(b).nbytes for b in bufs)))
        return real(fd, bufs, pos, *flags)

    monkeypatch.setattr(direct_read.os, "preadv", preadv)
    return calls


@pytest.mark.parametrize("placed", [True, False])
@pytest.mark.parametrize(
    ("pos", "nbytes"), [(0, 1 << 20), (100, 700_001), (DIRECT_ALIGN - 3, 2 * SEGMENT + 5), (SIZE - 300_007, 300_007)]
)
def test_cold_pieces_at_unaligned_offsets_read_exactly_and_past_the_page_cache(
    tmp_path, monkeypatch, pos, nbytes, placed
):
    """Placed like the file offset (the aligned middle lands in the buffer) or not (all through
    the bounce buffer): the file's bytes, every block read through the direct descriptor, and
    nothing of the range left in the page cache."""
    src, data = _cold_file(tmp_path)
    calls = _spy(monkeypatch)
    buf = raw_arena(nbytes, read_pos=pos if placed else pos + 8, slot="test")
    src.read_into(pos, buf, "t")
    assert bytes(buf) == data[pos : pos + nbytes]
    assert calls and all(fd == src.direct_fd for fd, _, _ in calls)
    assert sum(n for _, _, n in calls) < nbytes + 3 * DIRECT_ALIGN  # each block read once (+ both ends)
    assert cached_pages(src.fd, 0, SIZE) == 0


def test_rows_of_a_tensor_at_an_odd_offset_equal_the_buffered_read(tmp_path):
    """The reader every format uses: rows of a bf16 tensor starting at an odd byte, cold."""
    src, data = _cold_file(tmp_path)
    t = RawTensor(src, 1001, "bf16", (500, 1024), "odd")
    want = np.frombuffer(data, np.uint8, t.nbytes, t.offset).view(np.uint16).reshape(500, 1024)
    for a, b in [(0, 37), (37, 300), (300, 500)]:
        assert np.array_equal(t.raw_rows(a, b), want[a:b])
    assert cached_pages(src.fd, 0, SIZE) == 0


def test_a_partly_cached_piece_reads_cached_segments_buffered_and_the_rest_direct(tmp_path, monkeypatch):
    src, data = _cold_file(tmp_path)
    warm = os.open(src.path, os.O_RDONLY)
    os.posix_fadvise(warm, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead past it
    os.preadv(warm, [bytearray(SEGMENT)], 2 * SEGMENT)  # one segment in the page cache
    os.close(warm)
    pos, nbytes = 100, 5 * SEGMENT
    if cached_pages(src.fd, 2 * SEGMENT, SEGMENT) != SEGMENT // DIRECT_ALIGN:
        pytest.skip("the buffered read did not leave its segment in the page cache")
    calls = _spy(monkeypatch)
    buf = raw_arena(nbytes, read_pos=pos, slot="test")
    src.read_into(pos, buf, "t")
    assert bytes(buf) == data[pos : pos + nbytes]
    buffered = [(p, n) for fd, p, n in calls if fd == src.fd]
    assert buffered == [(2 * SEGMENT, SEGMENT)]  # the cached segment, and only it
    direct = [(p, n) for fd, p, n in calls if fd == src.direct_fd]
    assert direct and all(p + n <= 2 * SEGMENT or p >= 3 * SEGMENT for p, n in direct)


def test_a_refused_direct_read_falls_back_to_the_page_cache(tmp_path, monkeypatch):
    """EINVAL from the direct descriptor (a file system that takes the open but not the read):
    the bytes still arrive, through the buffered descriptor."""
    src, data = _cold_file(tmp_path)
    real = os.preadv

    def refusing(fd, bufs, pos, *flags):
        if fd == src.direct_fd:
            raise OSError(22, "Invalid argument")
        return real(fd, bufs, pos, *flags)

    monkeypatch.setattr(direct_read.os, "preadv", refusing)
    buf = raw_arena(1 << 20, read_pos=4096, slot="test")
    src.read_into(4096, buf, "t")
    assert bytes(buf) == data[4096 : 4096 + (1 << 20)]
    assert cached_pages(src.fd, 4096, 1 << 20) == 256  # it went through the page cache


def test_no_direct_descriptor_where_o_direct_cannot_be_opened(tmp_path, monkeypatch):
    real = os.open

    def no_direct(path, flags, *mode):
        if flags & os.O_DIRECT:
            raise OSError(22, "Invalid argument")
        return real(path, flags, *mode)

    monkeypatch.setattr(direct_read.os, "open", no_direct)
    path = tmp_path / "in.bin"
    path.write_bytes(bytes(range(256)) * 1024)
    src = SourceFile(path)
    assert src.direct_fd == -1
    buf = np.empty(200_000, np.uint8)
    src.read_into(7, buf, "t")
    assert bytes(buf) == path.read_bytes()[7:200_007]


def test_a_cold_file_cut_short_is_the_one_line_error(tmp_path):
    src, data = _cold_file(tmp_path)
    os.truncate(src.path, 1_000_003)
    buf = raw_arena(1 << 20, read_pos=500_000, slot="test")
    with pytest.raises(LlmconvError) as e:
        src.read_into(500_000, buf, "tok_embeddings.weight")
    msg = str(e.value)
    assert "the file ends at byte 1000003" in msg and "tok_embeddings.weight" in msg and "\n" not in msg
    assert bytes(buf[:500_003]) == data[500_000:1_000_003]
