"""Progress of a forward pass on the terminal: one tqdm bar over the layers of each pass."""

from __future__ import annotations


def layer_progress(n: int, desc: str, progress: bool):
    """range(n), shown as a bar named `desc` when `progress` and stderr is a terminal."""
    from tqdm.auto import tqdm

    from ..progress import bar_label, terminal_columns

    return tqdm(
        range(n),
        desc=bar_label(desc, terminal_columns()),
        unit="layer",
        leave=False,
        disable=None if progress else True,
    )
