"""The streaming engine's worker threads as the OS and torch see them: the thread name that top -H,
perf and bench/pipeline.py's per-thread accounting show, and torch's intra-op pool held to one
thread while several workers cast at once (stream.run)."""

from __future__ import annotations

import contextlib
import signal
import threading


def name_os_thread(name: bytes = b"llmconv-work") -> None:
    """Name the calling OS thread (top -H, perf and bench/pipeline.py's per-thread accounting
    see it: it counts the `llmconv-work` threads); Python's own thread name stays inside the
    interpreter. A thread started from a worker inherits the worker's name unless it sets its own."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(15, name, 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def torch_module():
    import torch

    return torch


def one_torch_thread() -> int:
    """With several workers, each torch cast (f16/bf16 outputs) runs on its worker alone:
    torch's own intra-op pool would fork every cast over all cores again, and the workers sat
    in futex waits for it about half of an f16 run at -t 2 (sampled /proc wchan). Returns
    the previous setting. At -t 1 torch keeps its pool: it is then the only parallelism."""
    torch = torch_module()
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    return before


# The signals that interrupt a conversion with a Python exception: Ctrl-C, and those that
# formats/atomic.py turns into one while an output is open.
INTERRUPTS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def interrupts_held():
    """Hold Ctrl-C (and SIGTERM/SIGHUP) back while workers are started: a signal that comes in
    is noted, and raised again on leaving, where its own handler (KeyboardInterrupt, or
    atomic.py's cleanup) runs with every worker known. One landing inside Thread.start() left
    a thread started but not yet marked so, and the engine's cleanup then failed with "cannot
    join thread before it is started" (exit 70, not 130); one landing between a fork and
    recording the child's pid would leave a worker nobody reaps. (Masking the signal in this
    thread is not enough: another thread, tqdm's monitor, takes it.) Only the main thread can
    set handlers; elsewhere this holds nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted: list[int] = []
    before = {s: signal.signal(s, lambda signum, frame: noted.append(signum)) for s in INTERRUPTS}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
        if noted:
            signal.raise_signal(noted[0])
