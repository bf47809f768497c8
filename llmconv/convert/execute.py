"""Run a plan (or several plans over the same source): stream it into GGUF files.

The layout of every file is fixed before the first byte of data, so every tensor has a
known offset; the streaming engine (stream.py) then reads each source tensor once, in
chunks, and pwrites each chunk converted to every output's type at its offset.
Each output appears under its final name only when complete (see formats/atomic.py).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from gguf import GGUFValueType as T
from gguf import Keys

from .._malloc import pin_mmap_threshold
from ..errors import LlmconvError
from ..formats.atomic import atomic_outputs
from ..formats.checksums import sidecar_document, sidecar_path
from ..formats.gguf_writer import KV, GGUFFileWriter, TensorEntry, plan_layout
from ..progress import byte_bar
from . import stream
from .plan import Plan, PlannedTensor


@dataclass
class WriteResult:
    path: Path
    n_tensors: int
    nbytes: int
    seconds: float
    paths: list[Path] = field(default_factory=list)  # all files written (more than one when split)


def split_plan(kvs: Sequence[KV], plan: Plan, max_bytes: int = 0, max_tensors: int = 0):
    """[(kvs, tensors)] for each output file (split_paths names them). Without limits: one file.
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
        return [(list(kvs), groups[0])]
    n = len(groups)
    out = []
    for i, g in enumerate(groups):
        split_kvs = [
            KV(Keys.Split.LLM_KV_SPLIT_NO, i, T.UINT16),
            KV(Keys.Split.LLM_KV_SPLIT_COUNT, n, T.UINT16),
            KV(Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT, len(plan.tensors), T.INT32),
        ]
        out.append(((list(kvs) if i == 0 else []) + split_kvs, g))
    return out


def split_paths(out_path: Path, n: int) -> list[Path]:
    if n == 1:
        return [out_path]
    stem = out_path.name[:-5] if out_path.name.endswith(".gguf") else out_path.name
    return [out_path.with_name(f"{stem}-{i + 1:05d}-of-{n:05d}.gguf") for i in range(n)]


@dataclass
class OutputRequest:
    """One GGUF output of a multi-output run: where, its metadata, its plan."""

    out_path: Path
    kvs: list[KV]
    plan: Plan


def write_gguf(
    out_path: str | Path,
    kvs: Sequence[KV],
    plan: Plan,
    *,
    threads: int = 1,
    progress: bool = True,
    force: bool = False,
    verbose: bool = False,
    split_max_size: int = 0,
    split_max_tensors: int = 0,
    checksum: bool = False,
) -> WriteResult:
    """Write `plan` to `out_path` (or its split parts). With `checksum`, also write the
    sha256 of every tensor's bytes to `out_path.sha256.json` (see formats/checksums.py)."""
    return write_ggufs(
        [OutputRequest(Path(out_path), list(kvs), plan)],
        threads=threads,
        progress=progress,
        force=force,
        verbose=verbose,
        split_max_size=split_max_size,
        split_max_tensors=split_max_tensors,
        checksum=checksum,
    )[0]


@dataclass
class _Output:
    req: OutputRequest
    paths: list[Path]
    layouts: list
    where: dict[str, int]  # tensor name -> index of its file in `paths`
    writers: list = field(default_factory=list)
    sums: dict[str, dict] = field(default_factory=dict)


def _prepare(req: OutputRequest, split_max_size: int, split_max_tensors: int) -> _Output:
    parts = split_plan(req.kvs, req.plan, split_max_size, split_max_tensors)
    layouts = [
        plan_layout(p_kvs, [TensorEntry(t.name, t.shape, t.qtype.ggml_type, t.nbytes) for t in p_ts])
        for p_kvs, p_ts in parts
    ]
    where = {t.name: i for i, (_, p_ts) in enumerate(parts) for t in p_ts}
    return _Output(req, split_paths(req.out_path, len(parts)), layouts, where)


def write_ggufs(
    reqs: Sequence[OutputRequest],
    *,
    threads: int = 1,
    progress: bool = True,
    force: bool = False,
    verbose: bool = False,
    split_max_size: int = 0,
    split_max_tensors: int = 0,
    checksum: bool = False,
) -> list[WriteResult]:
    """Write several GGUF files from one read of the source: every plan must list the same
    tensors in the same order (the same source, different types). Each file gets its own
    temporary name, check and rename; a failure in any of them leaves none behind."""
    pin_mmap_threshold()
    outs = [_prepare(r, split_max_size, split_max_tensors) for r in reqs]
    names = [t.name for t in reqs[0].plan.tensors]
    for r in reqs[1:]:
        if [t.name for t in r.plan.tensors] != names:
            raise ValueError("multi-output plans must list the same tensors in the same order")
    total = sum(lay.total_size for o in outs for lay in o.layouts)
    start = time.perf_counter()
    with ExitStack() as files:
        # every part of every output and the sidecars appear together, or none of them
        # (formats/atomic.py)
        targets = [p for o in outs for p in o.paths] + (
            [sidecar_path(o.req.out_path) for o in outs] if checksum else []
        )
        temps = iter(files.enter_context(atomic_outputs(targets, force=force)))
        tmps = [[next(temps) for _ in o.paths] for o in outs]
        side_tmps = [next(temps) if checksum else None for _ in outs]
        try:
            for o, o_tmps in zip(outs, tmps):
                o.writers = [files.enter_context(GGUFFileWriter(tmp, lay)) for tmp, lay in zip(o_tmps, o.layouts)]
            label = outs[0].req.out_path.name + (f" (+{len(outs) - 1})" if len(outs) > 1 else "")
            bar = files.enter_context(byte_bar(total, label, progress))
            bar.update(sum(lay.data_start for o in outs for lay in o.layouts))
            jobs = _jobs(outs, _on_written(outs, checksum, verbose, bar))
            stream.run(jobs, threads, progress=bar.update)
            for o in outs:
                for w in o.writers:
                    w.close()
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise LlmconvError(f"write failed: {e.strerror}", file=outs[0].req.out_path) from None
            raise
        for o, o_tmps in zip(outs, tmps):
            for tmp, lay, p in zip(o_tmps, o.layouts, o.paths):
                check_written(Path(tmp.read_path), lay, p)
        for o, side in zip(outs, side_tmps):
            if side is not None:
                side.write_bytes((json.dumps(sidecar_document(o.paths, o.sums), indent=1) + "\n").encode())
    seconds = time.perf_counter() - start
    return [
        WriteResult(o.paths[0], len(o.req.plan.tensors), sum(lay.total_size for lay in o.layouts), seconds, o.paths)
        for o in outs
    ]


def _on_written(outs: list[_Output], checksum: bool, verbose: bool, bar):
    """The callback for tensor i, once every output's copy of it is on disk: mark it written,
    hash it for the sidecar, print its -v line."""
    scratch = bytearray(8 << 20) if checksum else None

    def done(job: stream.Job, i: int) -> None:
        for o in outs:
            t = o.req.plan.tensors[i]
            w = o.writers[o.where[t.name]]
            w.mark_written(t.name)
            if checksum:
                o.sums[t.name] = {
                    "file": o.paths[o.where[t.name]].name,
                    "type": t.qtype.name,
                    "shape": list(t.shape),
                    "bytes": int(t.nbytes),
                    "sha256": file_sha256(w.fd, w.place(t.name), t.nbytes, scratch),
                }
        if verbose:
            t = outs[0].req.plan.tensors[i]
            types = ",".join(o.req.plan.tensors[i].qtype.name for o in outs)
            bar.write(
                f"  {t.name:32s} {types:6s} {str(t.shape):18s} "
                f"{sum(o.req.plan.tensors[i].nbytes for o in outs):>12,d} B"
            )

    return done


def _jobs(outs: list[_Output], done) -> list[stream.Job]:
    """One job per source tensor: read once, one sink (type, file, offset) per output."""
    jobs = []
    for i, t in enumerate(outs[0].req.plan.tensors):
        sinks = []
        for o in outs:
            ot = o.req.plan.tensors[i]
            w = o.writers[o.where[ot.name]]
            sinks.append(stream.Sink(ot.qtype, w.fd, w.place(ot.name), getattr(ot, "imatrix", None), w.direct_fd))
        jobs.append(stream.Job(t.src, sinks, done=lambda job, i=i: done(job, i)))
    return jobs


def file_sha256(fd: int, offset: int, nbytes: int, scratch: bytearray) -> str:
    """sha256 of bytes just written, read back from the page cache in pieces (the chunks of
    a tensor are written out of order by several workers, so they are hashed afterwards)."""
    h = hashlib.sha256()
    view = memoryview(scratch)
    while nbytes:
        n = os.preadv(fd, [view[: min(nbytes, len(view))]], offset)
        if n <= 0:
            raise OSError(errno.EIO, "short read while hashing the written tensor")
        h.update(view[:n])
        offset += n
        nbytes -= n
    return h.hexdigest()


def check_written(path: Path, layout, label: Path) -> None:
    """Re-read what was just written: the file size, the header bytes (metadata and tensor
    table) against the planned ones, and every tensor's name, size and offset as llmconv's
    hardened reader parses them back (formats/gguf_reader.py: in bounds, aligned, not
    overlapping). Reads only the header, so it costs milliseconds even for a 128k-token vocabulary."""
    from ..formats.gguf_reader import GGUFFormatError, read_gguf

    size = path.stat().st_size
    if size != layout.total_size:
        raise LlmconvError(f"written size {size} != planned {layout.total_size}", file=label)
    with open(path, "rb") as f:
        head = f.read(layout.data_start)
    if head != layout.header:
        at = next((i for i, (a, b) in enumerate(zip(head, layout.header)) if a != b), len(head))
        raise LlmconvError(f"re-read header differs from the planned one at byte {at}", file=label)
    try:
        g = read_gguf(path, check_types=False)
    except GGUFFormatError as e:
        raise LlmconvError(f"re-read: {e.message}", file=label, tensor=e.tensor) from None
    got = [(t.name, t.offset - g.data_offset, t.nbytes) for t in g.tensors]
    want = [(t.name, t.offset, t.nbytes) for t in layout.tensors]
    for a, b in zip(got, want):
        if a != b:
            raise LlmconvError(
                f"re-read tensor table disagrees: offset {a[1]}, {a[2]} bytes (planned {b[1]}, {b[2]})",
                file=label,
                tensor=b[0],
            )
    if len(got) != len(want) or g.data_offset != layout.data_start:
        raise LlmconvError(
            f"re-read {len(got)} tensors from byte {g.data_offset}, planned {len(want)} from byte {layout.data_start}",
            file=label,
        )
