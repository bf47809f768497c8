"""glibc malloc settings for a process that streams tensors through reused chunk buffers.

Two opposite costs to avoid:

* Fresh memory for every temporary. Above M_MMAP_THRESHOLD glibc serves a request with a
  new mmap and unmaps it on free, so every later use faults its pages in again, 4 KiB at a
  time, and the threads serialize on the kernel's mmap lock. With the threshold at 1 MiB,
  the kernels' chunk-sized temporaries (a few MiB each) did exactly that: 1.8 million page
  faults and more system than user time for a 1.1B-parameter conversion. The same happens
  when glibc trims freed memory off the top of a heap (M_TRIM_THRESHOLD, 128 KiB by
  default) and the next chunk asks for it again.
* Whole-tensor buffers kept in the heap. By default glibc raises the mmap threshold to the
  size of every mmapped block freed (up to 32 MiB), after which tensor-sized buffers come
  from the heap arenas of several threads, where freed memory is kept and fragments.

So: a fixed mmap threshold of 32 MiB (setting it turns the dynamic adjustment off; larger
buffers, e.g. whole 7B tensors on the fallback path, still get their own mapping and go
back to the OS), and a trim threshold high enough that the heaps keep their chunk-sized
working set instead of returning and re-faulting it for every chunk.
"""

from __future__ import annotations

import ctypes

from ._libc import libc_function

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
THRESHOLD = 32 << 20  # glibc's maximum on 64-bit
TRIM_THRESHOLD = 256 << 20


def pin_mmap_threshold(threshold: int = THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Fix glibc's mmap and trim thresholds; a no-op (False) on other C libraries."""
    mallopt = libc_function("mallopt", [ctypes.c_int, ctypes.c_int])
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, threshold)) and bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))
