"""Metadata arrays that cost about what they occupy in the file.

A GGUF array of 4 Mi u8 items is 4 MiB on disk but 32 MiB as a Python list of ints, and a
vocabulary of empty strings is 8 bytes an item on disk but ~60 as a list of str. The reader
keeps long arrays in these compact forms instead (numbers in a numpy array, strings as one
bytes blob plus offsets): at most about twice the bytes the array has in the file. They read
like lists: len, indexing (Python values), slicing (a list), iteration, ==, repr.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

LIST_MAX_ITEMS = 64  # shorter arrays are plain lists (their overhead is bounded by the KV cap)


class CompactArray(Sequence):
    def __eq__(self, other):
        if isinstance(other, (list, tuple, CompactArray)):
            return len(self) == len(other) and list(self) == list(other)
        return NotImplemented

    def __repr__(self) -> str:
        return repr(list(self))

    def tolist(self) -> list:
        return list(self)

    def _item(self, i: int):
        raise NotImplementedError

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._item(k) for k in range(*i.indices(len(self)))]
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(i)
        return self._item(i)


class NumberArray(CompactArray):
    """Numbers (bool arrays as bools) backed by a numpy array."""

    def __init__(self, values: np.ndarray, is_bool: bool = False):
        self.values, self.is_bool = values, is_bool

    def __len__(self) -> int:
        return len(self.values)

    def _item(self, i: int):
        v = self.values[i].item()
        return bool(v) if self.is_bool else v

    def __iter__(self):
        return (
            iter(self.values.astype(bool).tolist() if self.is_bool else self.values.tolist())
            if len(self.values) <= 1 << 16
            else (self._item(i) for i in range(len(self)))
        )

    def __array__(self, dtype=None, copy=None):
        return self.values if dtype is None else self.values.astype(dtype)


class StringArray(CompactArray):
    """Strings (str, or bytes where not UTF-8, as the reader gives them) backed by one bytes
    object and the start of each string in it."""

    def __init__(self, blob: bytes, starts: np.ndarray):
        self.blob, self.starts = blob, starts  # starts has len + 1 entries

    def __len__(self) -> int:
        return len(self.starts) - 1

    def _item(self, i: int):
        b = self.blob[self.starts[i] : self.starts[i + 1]]
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            return b

    def __iter__(self):
        return (self._item(i) for i in range(len(self)))
