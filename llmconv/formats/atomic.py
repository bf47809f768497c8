"""Write files under temporary names and rename them into place only when complete.

Each temp file sits in its target's directory (so the rename is atomic on one filesystem),
is named `.<target>.llmconv-partial-<random>` so a user recognizes it, and is created with
`mkstemp` (O_CREAT|O_EXCL|O_NOFOLLOW, an unpredictable name): another user who can write to
that directory (/tmp, a shared models folder) cannot make us write through a symlink. The
writers use the open descriptor, never the name again. The writer holds an flock on it for
its whole life, which is how a later run proves a leftover partial is stale (a SIGKILLed
run's) before deleting it, even across PID namespaces.

A group of files (split parts, a checksum sidecar) appears together: all are written and
fsynced first, then renamed; on any failure, Ctrl-C, SIGTERM or SIGHUP every temp file is
removed and existing targets are untouched. Without `force` the rename never replaces a
file that appeared meanwhile (a second run for the same target).
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import stat
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from ..errors import LlmconvError

PARTIAL_TAG = ".llmconv-partial-"
_NAME_KEEP = 120  # target-name characters kept in a temp name: it must fit NAME_MAX


@dataclass
class TempOutput:
    """An open temp file: write through `fd`; `read_path` reopens this very file (not the name).
    `target` is the file it becomes, the name an error message gives."""

    path: Path
    fd: int
    target: Path | None = None

    @property
    def read_path(self) -> str:
        proc = f"/proc/self/fd/{self.fd}"
        return proc if os.path.exists(proc) else str(self.path)

    def write_bytes(self, data: bytes) -> None:
        from .positional import pwrite_all

        try:
            os.ftruncate(self.fd, 0)
            pwrite_all(self.fd, data, 0)
        except OSError as e:  # a full disk, a quota: say which output
            raise LlmconvError(f"write failed: {e.strerror}", file=self.target or self.path) from None


def partial_prefix(target: Path) -> str:
    return f".{target.name[:_NAME_KEEP]}{PARTIAL_TAG}"


def clean_stale_partials(target: Path) -> list[Path]:
    """Remove temp files of earlier runs for `target`: only our own regular files that no
    live writer holds locked."""
    removed = []
    prefix = partial_prefix(target)
    if not target.parent.is_dir():
        return removed
    for p in target.parent.iterdir():
        if p.name.startswith(prefix) and _remove_if_stale(p):
            removed.append(p)
    return removed


def _remove_if_stale(p: Path) -> bool:
    try:
        st = os.lstat(p)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            return False
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        fst = os.fstat(fd)
        if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # a live writer holds it
        now = os.lstat(p)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            return False
        os.unlink(p)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def check_target(target: Path, *, force: bool) -> None:
    """The target may be absent, or (with `force`) a regular file; never a link, a directory,
    a device or a FIFO, which a rename would silently replace."""
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise LlmconvError(f"cannot use output path: {e.strerror}", file=target) from None
    if st is not None:
        if not stat.S_ISREG(st.st_mode):
            if stat.S_ISDIR(st.st_mode):
                raise LlmconvError(
                    f"output exists and is not a regular file (a directory): to write the "
                    f"default-named file into it, add a slash ({target}/)",
                    file=target,
                )
            kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "a special file"
            raise LlmconvError(f"output exists and is not a regular file ({kind}); refusing to replace it", file=target)
        if not force:
            raise LlmconvError("output exists; pass --force to overwrite it", file=target)
    if not target.parent.is_dir():
        raise LlmconvError("output directory does not exist", file=target.parent)


def check_output_path(target: str | Path, *, force: bool) -> None:
    """`check_target`, and the folder must be writable: for a command that computes for minutes
    before it writes (imatrix), so a read-only file system fails first, not last."""
    target = Path(target)
    check_target(target, force=force)
    if not os.access(target.parent, os.W_OK | os.X_OK):
        why = "Read-only file system" if os.statvfs(target.parent).f_flag & os.ST_RDONLY else "Permission denied"
        raise LlmconvError(f"cannot write to the output folder: {why}", file=target)


def _create_temp(target: Path) -> TempOutput:
    try:
        fd, name = tempfile.mkstemp(prefix=partial_prefix(target), dir=target.parent)
    except OSError as e:
        raise LlmconvError(f"cannot create a temporary file beside the output: {e.strerror}", file=target) from None
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a model file is shared like any file
    return TempOutput(Path(name), fd, target)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _discard(tmp: TempOutput) -> None:
    """Remove the temp file if its name still names our file, and close it."""
    try:
        st, fst = os.lstat(tmp.path), os.fstat(tmp.fd)
        if (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino):
            os.unlink(tmp.path)
    except OSError:
        pass
    _close(tmp)


def _close(tmp: TempOutput) -> None:
    if tmp.fd >= 0:
        os.close(tmp.fd)
        tmp.fd = -1


def _publish(tmp: TempOutput, target: Path, force: bool) -> None:
    """Rename `tmp` to `target`. Without force, never replace a file that appeared meanwhile."""
    if force:
        os.replace(tmp.path, target)
        return
    try:
        os.link(tmp.path, target, follow_symlinks=False)
    except FileExistsError:
        raise LlmconvError(
            "output appeared while this run was writing it (another run?); pass --force to overwrite it", file=target
        ) from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        if os.path.lexists(target):  # a filesystem without hard links: check, then rename
            raise LlmconvError("output appeared while this run was writing it; pass --force", file=target) from None
        os.replace(tmp.path, target)
        return
    os.unlink(tmp.path)


class _Terminated(BaseException):
    def __init__(self, signum: int):
        self.signum = signum


def _raise_terminated(signum, frame):  # noqa: ARG001
    raise _Terminated(signum)


_CAUGHT = (signal.SIGTERM, signal.SIGHUP)


@contextmanager
def atomic_outputs(targets: Sequence[str | Path], *, force: bool = False) -> Iterator[list[TempOutput]]:
    """Yield one open temp file per target; when the body succeeds, fsync them all and rename
    them into place together. If a rename fails, the targets already renamed are removed."""
    targets = [Path(t) for t in targets]
    for t in targets:
        check_target(t, force=force)
    # SIGTERM and SIGHUP become an exception so the cleanup below runs, like Ctrl-C does.
    in_main = threading.current_thread() is threading.main_thread()
    old = {s: signal.getsignal(s) for s in _CAUGHT} if in_main else {}
    for s in old:
        signal.signal(s, _raise_terminated)
    tmps: list[TempOutput] = []
    try:
        for t in targets:
            clean_stale_partials(t)
            tmps.append(_create_temp(t))
        yield tmps
        for tmp in tmps:
            try:
                os.fsync(tmp.fd)  # where a delayed write error (ENOSPC, EIO) shows up
            except OSError as e:
                raise LlmconvError(f"write failed: {e.strerror}", file=tmp.target) from None
        published: list[Path] = []
        try:
            for tmp, t in zip(tmps, targets):
                _publish(tmp, t, force)
                published.append(t)
        except BaseException:
            for t in published:
                Path(t).unlink(missing_ok=True)
            raise
        for d in {t.parent for t in targets}:
            _fsync_dir(d)
        for tmp in tmps:
            _close(tmp)
    except _Terminated as e:
        for tmp in tmps:
            _discard(tmp)
        raise SystemExit(128 + e.signum)
    except BaseException:
        for tmp in tmps:
            _discard(tmp)
        raise
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextmanager
def atomic_output(target: str | Path, *, force: bool = False) -> Iterator[TempOutput]:
    """One file: see `atomic_outputs`."""
    with atomic_outputs([target], force=force) as (tmp,):
        yield tmp


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
