"""The C library's functions that Python's os module lacks (fallocate, mallopt, madvise on an
address, raw syscalls), looked up in one place."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def libc_function(name: str, argtypes: list | None = None, restype=ctypes.c_int):
    """libc's `name` as a fresh ctypes function (so callers' argtypes never clash), or None where
    there is no such C library or function (musl, macOS, ...): callers fall back to plain Python."""
    try:
        fn = _libc()[name]
    except (OSError, AttributeError):
        return None
    if argtypes is not None:
        fn.argtypes = argtypes
    fn.restype = restype
    return fn
