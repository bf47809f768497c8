"""Importance matrices: llama-imatrix's statistic, computed from the original checkpoint, and
its file formats (files.py)."""
from .files import Imatrix, ImatrixEntry, read_imatrix, write_imatrix_gguf

__all__ = ["Imatrix", "ImatrixEntry", "read_imatrix", "write_imatrix_gguf"]
