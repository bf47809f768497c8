"""Progress bars (tqdm) on stderr, shared by the commands: drawn only on a terminal, and
with a label short enough to leave the bar room in a narrow one."""

from __future__ import annotations

import os
import shutil
import sys

from .errors import printable

# tqdm's text beside the label for a byte count: ":  43%|" and "| 3.00G/7.00G [00:12<00:30, 120MB/s]"
STATS_WIDTH = 44
MIN_BAR = 10  # cells of bar a label may never take away
MIN_LABEL = 8


def terminal_columns(file=None) -> int:
    """The width of the terminal `file` (stderr) is; COLUMNS or 80 when it is not one."""
    try:
        return os.get_terminal_size((file or sys.stderr).fileno()).columns
    except (AttributeError, OSError, ValueError):
        return shutil.get_terminal_size().columns


def bar_label(text: str, columns: int) -> str:
    """`text` (a file name) with control characters escaped and, when it would squeeze the bar
    below MIN_BAR cells in `columns`, an ellipsis in the middle: the end, which holds the type
    label (...-Q4_K_M.gguf), stays readable."""
    text = printable(text)
    room = max(MIN_LABEL, columns - STATS_WIDTH - MIN_BAR)
    if len(text) <= room:
        return text
    head = max(3, (room - 1) // 4)
    return text[:head] + "\u2026" + text[len(text) - (room - 1 - head) :]


def byte_bar(total: int, label: str, progress: bool, file=None, columns: int | None = None):
    """A bar over `total` bytes, named `label` (shortened to fit); off when not `progress` or
    when stderr is not a terminal (no frames in a log)."""
    from tqdm import tqdm

    file = file or sys.stderr
    columns = columns or terminal_columns(file)
    return tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=bar_label(label, columns),
        ncols=columns,
        file=file,
        disable=None if progress else True,
        leave=False,
    )
