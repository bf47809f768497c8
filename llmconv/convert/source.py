"""What every checkpoint format yields (a leaf module: the format readers import it, and
`sources.py` picks the reader)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .hparams import LlamaHParams
from .plan import SourceTensor
from .tokenizer import Vocab


@dataclass
class Source:
    kind: str                          # "meta" or "hf"
    path: Path
    hparams: LlamaHParams
    vocab: Vocab
    tensors: list[SourceTensor]
    extra_kvs: list = field(default_factory=list)   # format-specific GGUF metadata (KV), e.g. rope scaling
    warnings: list[str] = field(default_factory=list)

    @property
    def n_files(self) -> int:
        return len({f for t in self.tensors for f in t.files})
