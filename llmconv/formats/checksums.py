"""Per-tensor sha256 sidecar: `model.gguf` -> `model.gguf.sha256.json`.

Written by `convert/quantize --checksum` from the bytes as they are written (no second pass),
checked by `verify --checksums` and `check_sidecar` against the data the file holds now.
A whole-file hash would say only "something changed"; per-tensor hashes say which tensor.

    {"format": "llmconv-checksums/1",
     "files": ["Name-7B-Q4_0.gguf"],                         # the output files (several when split)
     "tensors": {"blk.0.attn_q.weight": {"file": "Name-7B-Q4_0.gguf", "type": "q4_0",
                                         "shape": [4096, 4096], "bytes": 9437184, "sha256": "..."}}}
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from ..errors import LlmconvError

FORMAT = "llmconv-checksums/1"
SUFFIX = ".sha256.json"


def sidecar_path(model_path: str | Path) -> Path:
    p = Path(model_path)
    return p.with_name(p.name + SUFFIX)


def tensor_sha256(blob: np.ndarray) -> str:
    return hashlib.sha256(memoryview(np.ascontiguousarray(blob)).cast("B")).hexdigest()


def sidecar_document(files: list[Path], entries: dict[str, dict]) -> dict:
    return {"format": FORMAT, "files": [Path(f).name for f in files], "tensors": entries}


def load_sidecar(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise LlmconvError("no checksum sidecar (write one with `convert --checksum`)", file=path)
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LlmconvError(f"not a checksum sidecar: {e}", file=path) from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("tensors"), dict):
        raise LlmconvError(f"not a checksum sidecar (format {doc.get('format') if isinstance(doc, dict) else None!r}, "
                           f"want {FORMAT!r})", file=path)
    return doc


def check_sidecar(model_path: str | Path, sidecar: str | Path | None = None) -> list[str]:
    """Hash every tensor of the model file(s) named in the sidecar; return one message per
    mismatch, missing or extra tensor (empty: all equal)."""
    from gguf import GGUFReader

    model_path = Path(model_path)
    side = Path(sidecar) if sidecar else sidecar_path(model_path)
    doc = load_sidecar(side)
    want = doc["tensors"]
    seen: dict[str, str] = {}
    files = [model_path.with_name(f) for f in doc.get("files") or [model_path.name]]
    problems = []
    for f in files:
        if not f.is_file():
            problems.append(f"{f}: listed in {side.name} but missing")
            continue
        try:
            r = GGUFReader(f)
        except (ValueError, OSError, IndexError) as e:
            raise LlmconvError(f"not a readable GGUF file: {e}", file=f) from None
        for t in r.tensors:
            seen[t.name] = tensor_sha256(np.asarray(t.data).view(np.uint8))
    for name, entry in want.items():
        if name not in seen:
            problems.append(f"{name}: in {side.name} but not in the file")
        elif seen[name] != entry.get("sha256"):
            problems.append(f"{name}: sha256 differs from {side.name} (data changed since it was written)")
    problems += [f"{name}: in the file but not in {side.name}" for name in seen if name not in want]
    return problems
