"""What every checkpoint format yields (a leaf module: the format readers import it, and
`sources.py` picks the reader)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LlmconvError
from .hparams import LlamaHParams
from .plan import SourceTensor
from .tokenizer import Vocab


@dataclass
class Source:
    kind: str  # "meta", "hf" or "mistral"
    path: Path
    hparams: LlamaHParams
    vocab: Vocab
    tensors: list[SourceTensor]
    extra_kvs: list = field(default_factory=list)  # format-specific GGUF metadata (KV), e.g. rope scaling
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # things done on the user's behalf, e.g. where the tokenizer was

    @property
    def n_files(self) -> int:
        return len({f for t in self.tensors for f in t.files})


def explicit_tokenizer(path: Path) -> tuple[Path, Path | None]:
    """--tokenizer PATH -> (folder, file or None); a folder is searched by each format's rules."""
    if path.is_dir():
        return path, None
    if path.is_file():
        return path.parent, path
    raise LlmconvError("--tokenizer: no such file or folder", file=path)
