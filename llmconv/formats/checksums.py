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
import re
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


MAX_SIDECAR_BYTES = 64 << 20
_SPLIT_NAME = re.compile(r"(.+)-(\d{5})-of-(\d{5})\.gguf")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def load_sidecar(path: str | Path) -> dict:
    """The sidecar's document, with every field it uses checked: a malformed one is one line."""
    from ..errors import read_regular_file

    path = Path(path)
    if not path.is_file():
        raise LlmconvError("no checksum sidecar (write one with `convert --checksum`)", file=path)
    try:
        doc = json.loads(read_regular_file(path, MAX_SIDECAR_BYTES).decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LlmconvError(f"not a checksum sidecar: {e}", file=path) from None
    except RecursionError:
        raise LlmconvError("not a checksum sidecar: JSON nested too deeply", file=path) from None
    except OSError as e:
        raise LlmconvError(f"cannot read: {e.strerror or e}", file=path) from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("tensors"), dict):
        raise LlmconvError(
            f"not a checksum sidecar (format {doc.get('format') if isinstance(doc, dict) else None!r:.40}, "
            f"want {FORMAT!r})",
            file=path,
        )
    files = doc.get("files")
    if files is not None and (not isinstance(files, list) or not all(isinstance(f, str) for f in files)):
        raise LlmconvError("'files' is not a list of file names", file=path)
    for name, entry in doc["tensors"].items():
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("sha256"), str)
            or not _SHA256.fullmatch(entry["sha256"])
        ):
            raise LlmconvError(f"tensors.{name}: expected an object with a 64-digit hex sha256", file=path)
    return doc


def check_split_set(model_path: Path, names: list[str], side: Path) -> None:
    """A sidecar next to `model_path` may list only the file itself or the parts of one split
    set of it (Stem-0000k-of-0000N.gguf, where Stem is model_path's stem or, for a part, its
    set's). Anything else (another model, ../secret, /etc/passwd) is refused."""
    m = _SPLIT_NAME.fullmatch(model_path.name)
    stem = m.group(1) if m else model_path.name.removesuffix(".gguf")
    counts = set()
    for name in names:
        part = _SPLIT_NAME.fullmatch(name)
        if name == model_path.name or (
            part and part.group(1) == stem and 1 <= int(part.group(2)) <= int(part.group(3))
        ):
            counts |= {part.group(3)} if part else set()
            continue
        raise LlmconvError(
            f"lists {name!r:.80}, which is neither {model_path.name} nor a part of its split set", file=side
        )
    if len(counts) > 1:
        raise LlmconvError(f"lists parts of split sets of different sizes ({', '.join(sorted(counts))})", file=side)


def check_sidecar(model_path: str | Path, sidecar: str | Path | None = None) -> list[str]:
    """Hash every tensor of the model file(s) named in the sidecar; return one message per
    mismatch, missing or extra tensor (empty: all equal)."""
    from .gguf_reader import read_gguf

    model_path = Path(model_path)
    side = Path(sidecar) if sidecar else sidecar_path(model_path)
    doc = load_sidecar(side)
    want = doc["tensors"]
    seen: dict[str, str] = {}
    names = doc.get("files") or [model_path.name]
    check_split_set(model_path, names, side)
    problems = []
    for f in (model_path.with_name(name) for name in dict.fromkeys(names)):
        if not f.is_file():
            problems.append(f"{f}: listed in {side.name} but missing")
            continue
        for t in read_gguf(f).tensors:  # the hardened reader: offsets and sizes checked
            seen[t.name] = tensor_sha256(t.data)
    for name, entry in want.items():
        if name not in seen:
            problems.append(f"{name}: in {side.name} but not in the file")
        elif seen[name] != entry.get("sha256"):
            problems.append(f"{name}: sha256 differs from {side.name} (data changed since it was written)")
    problems += [f"{name}: in the file but not in {side.name}" for name in seen if name not in want]
    return problems
