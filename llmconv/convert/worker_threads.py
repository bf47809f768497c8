"""The streaming engine's worker threads as the OS and torch see them: the thread name that top -H,
perf and bench/pipeline.py's per-thread accounting show, and torch's intra-op pool held to one
thread while several workers cast at once (stream.run)."""

from __future__ import annotations


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
