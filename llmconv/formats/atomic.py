"""Write a file under a temporary name and rename it into place only when complete.

The temporary file sits in the target directory (so the rename is atomic on one
filesystem) and is named `.<target>.llmconv-partial-<pid>` so a user recognizes it.
On any exception, Ctrl-C or SIGTERM it is removed and the target is untouched.
A temp file left by a killed run (SIGKILL) is removed by the next run for the same target.
"""
from __future__ import annotations

import os
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import LlmconvError

PARTIAL_TAG = ".llmconv-partial-"


def partial_name(target: Path, pid: int | None = None) -> Path:
    return target.with_name(f".{target.name}{PARTIAL_TAG}{pid if pid is not None else os.getpid()}")


def clean_stale_partials(target: Path) -> list[Path]:
    """Remove temp files of earlier runs for `target` whose process is gone."""
    removed = []
    prefix = f".{target.name}{PARTIAL_TAG}"
    if not target.parent.is_dir():
        return removed
    for p in target.parent.iterdir():
        if not p.name.startswith(prefix):
            continue
        try:
            pid = int(p.name[len(prefix):])
        except ValueError:
            continue
        if pid != os.getpid() and _pid_alive(pid):
            continue
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Terminated(BaseException):
    pass


def _raise_terminated(signum, frame):  # noqa: ARG001
    raise _Terminated()


@contextmanager
def atomic_output(target: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temp path to write; on success fsync and rename it to `target`."""
    target = Path(target)
    if target.exists() and not force:
        raise LlmconvError("output exists; pass --force to overwrite it", file=target)
    if not target.parent.is_dir():
        raise LlmconvError("output directory does not exist", file=target.parent)
    clean_stale_partials(target)
    tmp = partial_name(target)
    # SIGTERM becomes an exception so the cleanup below runs, like Ctrl-C does.
    old = signal.getsignal(signal.SIGTERM)
    in_main = _is_main_thread()
    if in_main:
        signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except _Terminated:
        tmp.unlink(missing_ok=True)
        raise SystemExit(143)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, old)


def _is_main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


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
