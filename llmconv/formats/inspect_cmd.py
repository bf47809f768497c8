"""What `llmconv inspect FILE` shows: what a GGUF (v2, v3) or legacy ggml (ggml, ggmf, ggjt) file holds.

One summary is built from the file's header and tensor table (never its data) and then
printed either as tables or, with --json, as JSON. Both show the same facts: format and
version, alignment, metadata with types (arrays shortened to their first items, with their
length), vocabulary size, the tensor table (name, type, shape, offset, bytes) and totals
per type with bits per weight.

GGUF files go through llmconv.formats.gguf_reader, which validates every count, length
and offset before using it, so a corrupt file gets a one-line error, not a traceback.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import click
import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType

from ..errors import LlmconvError, printable
from .ggml_reader import legacy_magic

ARRAY_PREVIEW = 8  # array items shown (text and JSON); the length is always given
TEXT_WIDTH = 72  # longest metadata value shown in the table before it is cut

_SHORT_TYPE = {
    GGUFValueType.UINT8: "u8",
    GGUFValueType.INT8: "i8",
    GGUFValueType.UINT16: "u16",
    GGUFValueType.INT16: "i16",
    GGUFValueType.UINT32: "u32",
    GGUFValueType.INT32: "i32",
    GGUFValueType.FLOAT32: "f32",
    GGUFValueType.BOOL: "bool",
    GGUFValueType.STRING: "str",
    GGUFValueType.ARRAY: "arr",
    GGUFValueType.UINT64: "u64",
    GGUFValueType.INT64: "i64",
    GGUFValueType.FLOAT64: "f64",
}
_LEGACY_HPARAMS = ("n_vocab", "n_embd", "n_mult", "n_head", "n_layer", "n_rot", "ftype")


# ---- the summary -------------------------------------------------------------------------------


def _json_value(v: Any) -> Any:
    """A metadata value as JSON can hold it: bytes (non-UTF-8 strings) with escapes, and
    non-finite floats as strings."""
    if isinstance(v, bytes):
        return v.decode("utf-8", "backslashreplace")
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def _entry(vtype: GGUFValueType, value: Any, element: GGUFValueType | None = None) -> dict:
    e: dict[str, Any] = {"type": vtype.name}
    if vtype == GGUFValueType.ARRAY:
        e["element_type"] = element.name if element is not None else None
        e["count"] = len(value)
        e["value"] = [_json_value(x) for x in value[:ARRAY_PREVIEW]]
        e["shortened"] = len(value) > ARRAY_PREVIEW
    else:
        e["value"] = _json_value(value)
    return e


def _type_name(t: int) -> str:
    try:
        return GGMLQuantizationType(t).name
    except ValueError:
        return f"type {t}"


def _totals(tensors: list[dict]) -> dict:
    by_type: dict[str, dict[str, Any]] = {}
    for t in tensors:
        s = by_type.setdefault(t["type"], {"tensors": 0, "elements": 0, "bytes": 0})
        s["tensors"] += 1
        s["elements"] += t["elements"]
        s["bytes"] += t["bytes"]
    for s in by_type.values():
        s["bits_per_weight"] = 8 * s["bytes"] / s["elements"] if s["elements"] else None
    n = sum(t["elements"] for t in tensors)
    b = sum(t["bytes"] for t in tensors)
    return {
        "by_type": by_type,
        "all": {"tensors": len(tensors), "elements": n, "bytes": b, "bits_per_weight": 8 * b / n if n else None},
    }


def _gguf_summary(path: Path) -> dict:
    from .gguf_reader import read_gguf

    g = read_gguf(path, check_types=False)  # show whatever the file holds
    tokens = g.kvs.get("tokenizer.ggml.tokens")
    return {
        "file": str(path),
        "format": "gguf",
        "version": g.version,
        "file_bytes": g.file_size,
        "alignment": g.alignment,
        "data_offset": g.data_offset,
        "metadata": {k: _entry(g.kv_types[k].type, v, g.kv_types[k].element) for k, v in g.kvs.items()},
        "vocab_size": len(tokens) if tokens is not None and not isinstance(tokens, (str, bytes, int, float)) else None,
        "tensors": [
            {
                "name": t.name,
                "type": t.ggml_type.name,
                "shape": list(t.shape),
                "offset": t.offset,
                "bytes": t.nbytes,
                "elements": t.n_elements,
            }
            for t in g.tensors
        ],
    }


def _ggml_summary(path: Path, magic: str) -> dict:
    from .ggml_reader import read_ggml

    g = read_ggml(path)
    h = g.hparams
    meta = {name: _entry(GGUFValueType.UINT32, int(getattr(h, name))) for name in _LEGACY_HPARAMS}
    # The vocabulary section, shown as GGUF shows its token arrays.
    meta["vocab.tokens"] = _entry(GGUFValueType.ARRAY, [_token_text(t) for t in g.vocab.tokens], GGUFValueType.STRING)
    meta["vocab.scores"] = _entry(GGUFValueType.ARRAY, [float(x) for x in g.vocab.scores], GGUFValueType.FLOAT32)
    return {
        "file": str(path),
        "format": g.magic,
        "version": g.version,
        "file_bytes": path.stat().st_size,
        "alignment": g.alignment if g.alignment > 1 else None,
        "data_offset": None,  # ggml/ggmf: unaligned
        "metadata": meta,
        "vocab_size": len(g.vocab.tokens),
        "tensors": [
            {
                "name": t.name,
                "type": _legacy_type_name(t),
                "shape": [int(d) for d in t.shape],
                "offset": int(t.offset),
                "bytes": int(t.nbytes),
                "elements": int(np.prod(t.shape, dtype=object)),
            }
            for t in g.tensors
        ],
    }


def _legacy_type_name(t) -> str:
    """GGUF's name for the type id; files before ggjt v3 stored q4_0/q4_1/q8_0 blocks with f32
    scales (and had q4_2/q4_3), which the name says, since their bits per weight differ."""
    from .ggml_reader import OLD_TYPE_NAMES

    name = OLD_TYPE_NAMES.get(int(t.ggml_type)) or _type_name(int(t.ggml_type))
    return name if getattr(t, "gguf_layout", True) else f"{name} (pre-v3 layout)"


def _token_text(t: bytes | str) -> str | bytes:
    if isinstance(t, str):
        return t
    try:
        return bytes(t).decode("utf-8")
    except UnicodeDecodeError:
        return bytes(t)


def summarize(path: str | Path, tensor_filter: str | None = None) -> dict:
    """Everything `inspect` shows, as a JSON-ready dict (only the header is read)."""
    path = Path(path)
    if path.is_dir():
        raise LlmconvError("is a directory; inspect reads a GGUF or ggml file", file=path)
    if not path.is_file():
        raise LlmconvError("no such file", file=path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if legacy_magic(magic):
        s = _ggml_summary(path, legacy_magic(magic))
    elif magic == b"GGUF" or len(magic) < 4:  # (the reader says how a short file ends)
        s = _gguf_summary(path)
    else:
        raise LlmconvError(f"not a GGUF or ggml file (magic {magic!r})", file=path)
    s["tensor_count"] = len(s["tensors"])
    s["tensors"] = [{"index": i, **t} for i, t in enumerate(s["tensors"])]
    s["tensor_filter"] = tensor_filter
    if tensor_filter is not None:
        try:
            rx = re.compile(tensor_filter)
        except re.error as e:
            raise LlmconvError(f"--tensors {tensor_filter!r}: not a regular expression ({e})") from None
        s["tensors"] = [t for t in s["tensors"] if rx.search(t["name"])]
    s["totals"] = _totals(s["tensors"])
    return s


# ---- text rendering ----------------------------------------------------------------------------


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n / 2**10:,.1f} KiB" if n >= 2**10 else f"{n} B"


def _scalar_text(v: Any, vtype: str) -> str:
    if vtype == "FLOAT32" and isinstance(v, float):
        return str(np.float32(v))  # the shortest text that gives back the stored f32
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str) and vtype == "STRING":
        return repr(v)
    return str(v)


def _cut(text: str) -> str:
    return text if len(text) <= TEXT_WIDTH else text[: TEXT_WIDTH - 1] + "…"


def _value_text(e: dict) -> str:
    if e["type"] != "ARRAY":
        return _cut(_scalar_text(e["value"], e["type"]))
    items: list[str] = []
    for x in e["value"]:  # as many whole items as fit in the column
        t = _scalar_text(x, e["element_type"])
        if items and sum(len(i) + 2 for i in items) + len(t) > TEXT_WIDTH - 5:
            break
        items.append(t)
    more = ", …" if e["shortened"] or len(items) < len(e["value"]) else ""
    return _cut(f"[{', '.join(items)}{more}]")


def _type_text(e: dict) -> str:
    if e["type"] == "ARRAY":
        el = GGUFValueType[e["element_type"]] if e["element_type"] else None
        return f"{_SHORT_TYPE.get(el, '?')}[{e['count']:,}]"
    return _SHORT_TYPE[GGUFValueType[e["type"]]]


def _table(rows: list[list[str]], right: set[int], indent: str = "  ") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for n, r in enumerate(rows):
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        line = (indent + "  ".join(cells)).rstrip()
        out.append(click.style(line, bold=True) if n == 0 else line)
    return out


def _heading(text: str) -> str:
    return click.style(text, bold=True, underline=True)


def render_text(s: dict) -> str:
    lines = []
    name = click.style(printable(Path(s["file"]).name), bold=True)
    if s["format"] == "gguf":
        kind = f"GGUF v{s['version']}"
    else:
        kind = f"{s['format']} v{s['version']}" if s["version"] else f"{s['format']} (unversioned)"
    head = [kind, _mib(s["file_bytes"])]
    if s["alignment"] is not None:
        head.append(f"alignment {s['alignment']}")
    if s["data_offset"] is not None:
        head.append(f"data at byte {s['data_offset']:,}")
    lines.append(f"{name}: " + ", ".join(head))
    lines.append(f"vocab: {s['vocab_size']:,} tokens" if s["vocab_size"] is not None else "vocab: none in the file")

    meta = s["metadata"]
    lines += ["", _heading(f"Metadata ({len(meta)} {'key' if len(meta) == 1 else 'keys'})")]
    if meta:
        rows = [["key", "type", "value"]] + [
            [_cut(printable(k)), _type_text(e), printable(_value_text(e))] for k, e in meta.items()
        ]
        lines += _table(rows, right=set())

    shown, total = len(s["tensors"]), s["tensor_count"]
    filt = f", {shown} matching '{s['tensor_filter']}'" if s["tensor_filter"] is not None else ""
    lines += ["", _heading(f"Tensors ({total}{filt})")]
    if s["tensors"]:
        rows = [["#", "name", "type", "shape", "offset", "bytes"]]
        rows += [
            [
                str(t["index"]),
                printable(t["name"]),
                t["type"],
                " x ".join(map(str, t["shape"])),
                f"{t['offset']:,}",
                f"{t['bytes']:,}",
            ]
            for t in s["tensors"]
        ]
        lines += _table(rows, right={0, 4, 5})

    tot = s["totals"]
    if tot["all"]["tensors"]:
        lines += ["", _heading("Totals" + (" (matching tensors)" if s["tensor_filter"] is not None else ""))]
        rows = [["type", "tensors", "weights", "bytes", "size", "bits/weight"]]

        def row(label, d):
            bpw = f"{d['bits_per_weight']:.2f}" if d["bits_per_weight"] is not None else "-"
            return [label, f"{d['tensors']:,}", f"{d['elements']:,}", f"{d['bytes']:,}", _mib(d["bytes"]), bpw]

        rows += [row(k, d) for k, d in sorted(tot["by_type"].items(), key=lambda kv: -kv[1]["bytes"])]
        rows.append(row("all", tot["all"]))
        lines += _table(rows, right={1, 2, 3, 4, 5})
    return "\n".join(lines)
