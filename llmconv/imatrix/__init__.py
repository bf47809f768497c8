"""Importance matrices: llama-imatrix's statistic, computed from the original checkpoint, and
its file formats (files.py)."""

from .files import Imatrix, ImatrixEntry, read_imatrix, write_imatrix_gguf

__all__ = ["Imatrix", "ImatrixEntry", "read_imatrix", "write_imatrix_gguf"]

from .._callable import make_callable  # noqa: E402  (llmconv.imatrix(...) runs api.imatrix)

make_callable(__name__)
