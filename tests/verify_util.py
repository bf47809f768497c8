"""Shared by the verify tests: run `llmconv verify` in-process, and rewrite a GGUF file with one
planted defect (through gguf-py, independently of llmconv's writer)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

from llmconv.cli import main
from llmconv.formats.gguf_reader import read_gguf


def run_verify_cli(capsys, path: Path, ref: Path, *extra: str) -> tuple[int, str, str]:
    """Runs `llmconv verify` in-process; (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = main(["verify", str(path), "--reference", str(ref), *extra])
    out, err = capsys.readouterr()
    return code, out, err


def run_verify_json(capsys, path: Path, ref: Path, tmp_path: Path, *extra: str) -> tuple[int, dict, str]:
    report = tmp_path / f"{path.stem}-report.json"
    code, out, _ = run_verify_cli(capsys, path, ref, "--json", str(report), "--force", *extra)
    return code, json.loads(report.read_text(), parse_constant=_refuse), out


def _refuse(name: str):
    raise ValueError(f"not strict JSON: {name}")


def failures(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("FAIL: ")]


def verdict(out: str) -> str:
    """The last line's cause: 'FAILED (n check(s)): <the first failure>'."""
    last = out.rstrip().splitlines()[-1]
    assert last.startswith("FAILED"), out
    return last.split("): ", 1)[1]


def rewrite_gguf(
    src: Path,
    dst: Path,
    *,
    kvs: dict | None = None,
    tensors: dict | None = None,
    types: dict | None = None,
    drop: tuple[str, ...] = (),
) -> Path:
    """Copy `src` to `dst` through gguf-py. `kvs` replaces metadata values (same GGUF type; a key
    not in the file is added as a string); `tensors` maps a tensor name to a function
    (raw, reader) -> new raw, where raw is the tensor's data as the reader holds it (uint8 rows
    of blocks for quantized types); `types` gives such a tensor a new ggml type; `drop` leaves
    tensors out."""
    kvs, tensors, types = dict(kvs or {}), dict(tensors or {}), dict(types or {})
    r = GGUFReader(src)
    w = GGUFWriter(str(dst), r.get_field("general.architecture").contents())  # writes general.architecture
    for name, field in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        sub = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
        w.add_key_value(name, kvs.pop(name, field.contents()), field.types[0], sub_type=sub)
    for name, value in kvs.items():
        w.add_key_value(name, value, GGUFValueType.STRING)
    for t in r.tensors:
        if t.name in drop:
            continue
        data = np.array(t.data)  # a copy: the reader's view is read-only
        if t.name in tensors:
            data = np.ascontiguousarray(tensors.pop(t.name)(data, r))
        w.add_tensor(t.name, data, raw_dtype=GGMLQuantizationType(types.pop(t.name, int(t.tensor_type))))
    assert not tensors and not types, f"tensors not in the file: {list(tensors) + list(types)}"
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def tensor_raw(path: Path, name: str) -> np.ndarray:
    return np.array(next(t for t in GGUFReader(path).tensors if t.name == name).data)


def swap_experts(src, dst, layer: int, a: int, b: int):
    """Copy `src` with experts a and b of `layer` exchanged in its three stacked tensors."""
    shutil.copy(src, dst)
    g = read_gguf(dst)
    mm = np.memmap(dst, dtype=np.uint8, mode="r+")
    for kind in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"):
        t = g.tensor(f"blk.{layer}.{kind}.weight")
        step = t.nbytes // t.shape[0]
        sa = slice(t.offset + a * step, t.offset + (a + 1) * step)
        sb = slice(t.offset + b * step, t.offset + (b + 1) * step)
        mm[sa], mm[sb] = mm[sb].copy(), mm[sa].copy()
    mm.flush()
    del mm
    return dst


def verify(capsys, path, ckpt, *extra):
    capsys.readouterr()
    code = main(["verify", str(path), "--reference", str(ckpt), "--tokens", "64", *extra])
    out, err = capsys.readouterr()
    return code, out + err
