"""Issue 5, inspect: `llmconv inspect` shows what GGUF and ggml files hold, and agrees with
gguf.GGUFReader (GGUF) and with the checkpoint the file was made from (ggml)."""

from __future__ import annotations

import json
import re
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT, GGUFReader, GGUFValueType as VT

import llmconv
from llmconv.cli import main
from synth import meta_state_dict, write_meta_checkpoint
from llmconv.testing.gguf_build import build_gguf, gguf_reader_view

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "fixtures" / "tiny-llama"
SHORT = {
    VT.UINT8: "u8",
    VT.INT8: "i8",
    VT.UINT16: "u16",
    VT.INT16: "i16",
    VT.UINT32: "u32",
    VT.INT32: "i32",
    VT.FLOAT32: "f32",
    VT.BOOL: "bool",
    VT.STRING: "str",
    VT.UINT64: "u64",
    VT.INT64: "i64",
    VT.FLOAT64: "f64",
}


@pytest.fixture(scope="module")
def files(tmp_path_factory, converted):
    """GGUF conversions of the fixture, and ggjt conversions of a checkpoint without GQA
    (ggjt cannot describe the fixture's grouped-query attention)."""
    out = tmp_path_factory.mktemp("inspect")
    paths = {outtype: converted(FIXTURE, outtype) for outtype in ("f16", "q4_0", "q4_k", "auto")}
    sd = meta_state_dict(dim=64, n_heads=4, n_kv_heads=4, ffn=192, seed=3)
    ckpt = write_meta_checkpoint(out / "mha", sd, n_heads=4)
    for outtype in ("f16", "q4_0"):
        p = out / f"mha-{outtype}.bin"
        llmconv.convert(ckpt, p, format="ggml", outtype=outtype)
        paths[f"ggml-{outtype}"] = p
    paths["sd"] = sd
    return paths


def inspect_json(path: Path, *extra: str) -> dict:
    out = path.parent / (path.name + ".json")
    assert main(["inspect", str(path), "--json", str(out), "--force", *extra]) == 0
    return json.loads(out.read_text())


def _json_scalar(v):
    if isinstance(v, bytes):
        return v.decode("utf-8")
    return v


@pytest.mark.parametrize("outtype", ["f16", "q4_0", "q4_k", "auto"])
def test_json_agrees_with_gguf_reader(files, outtype):
    path = files[outtype]
    s = inspect_json(path)
    r, kvs, tensors = gguf_reader_view(path)
    assert s["format"] == "gguf" and s["version"] == int(r.fields["GGUF.version"].parts[0][0])
    assert s["alignment"] == int(r.alignment) and s["data_offset"] == int(r.data_offset)
    assert s["file_bytes"] == path.stat().st_size

    assert list(s["metadata"]) == list(kvs)
    for key, (main_t, sub, val) in kvs.items():
        e = s["metadata"][key]
        assert e["type"] == main_t.name, key
        if main_t == VT.ARRAY:
            assert e["element_type"] == sub.name and e["count"] == len(val), key
            assert e["value"] == [_json_scalar(v) for v in val[: len(e["value"])]] and len(e["value"]) == min(
                8, len(val)
            )
            assert e["shortened"] == (len(val) > 8)
        else:
            assert e["value"] == _json_scalar(val), key
    assert s["vocab_size"] == len(kvs["tokenizer.ggml.tokens"][2]) == 512

    assert s["tensor_count"] == len(tensors) == len(s["tensors"]) == 21
    for t, (name, qt, shape, offset, nbytes, n_el, _) in zip(s["tensors"], tensors):
        assert (t["name"], t["type"], tuple(t["shape"]), t["offset"], t["bytes"], t["elements"]) == (
            name,
            qt.name,
            shape,
            offset,
            nbytes,
            n_el,
        )

    by_type: dict[str, list[int]] = {}
    for name, qt, shape, offset, nbytes, n_el, _ in tensors:
        acc = by_type.setdefault(qt.name, [0, 0, 0])
        acc[0] += 1
        acc[1] += n_el
        acc[2] += nbytes
    assert {k: [v["tensors"], v["elements"], v["bytes"]] for k, v in s["totals"]["by_type"].items()} == by_type
    for k, v in s["totals"]["by_type"].items():
        assert v["bits_per_weight"] == pytest.approx(8 * by_type[k][2] / by_type[k][1])
    n = sum(v[1] for v in by_type.values())
    b = sum(v[2] for v in by_type.values())
    assert s["totals"]["all"] == {"tensors": 21, "elements": n, "bytes": b, "bits_per_weight": pytest.approx(8 * b / n)}


def test_json_to_stdout_is_the_same(files, capsys):
    s = inspect_json(files["q4_0"])
    capsys.readouterr()
    assert main(["inspect", str(files["q4_0"]), "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out) == s


def test_text_shows_every_key_and_tensor(files, capsys):
    path = files["q4_k"]
    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    r, kvs, tensors = gguf_reader_view(path)
    lines = text.splitlines()
    assert lines[0].startswith(f"{path.name}: GGUF v3") and f"alignment {r.alignment}" in lines[0]
    assert f"data at byte {int(r.data_offset):,}" in lines[0] and "vocab: 512 tokens" in text
    for key, (main_t, sub, val) in kvs.items():
        if main_t == VT.ARRAY:
            want = rf"^  {re.escape(key)}\s+{SHORT[sub]}\[{len(val):,}\]\s+\["
        elif main_t == VT.STRING:
            want = rf"^  {re.escape(key)}\s+str\s+{re.escape(repr(val.decode()))}$"
        elif main_t == VT.BOOL:
            want = rf"^  {re.escape(key)}\s+bool\s+{str(bool(val)).lower()}$"
        elif main_t == VT.FLOAT32:
            want = rf"^  {re.escape(key)}\s+f32\s+{re.escape(str(np.float32(val)))}$"
        else:
            want = rf"^  {re.escape(key)}\s+{SHORT[main_t]}\s+{val}$"
        assert any(re.match(want, ln) for ln in lines), (key, want)
    for i, (name, qt, shape, offset, nbytes, _, _) in enumerate(tensors):
        want = rf"^\s+{i}\s+{re.escape(name)}\s+{qt.name}\s+{' x '.join(map(str, shape))}\s+{offset:,}\s+{nbytes:,}$"
        assert any(re.match(want, ln) for ln in lines), want
    n = sum(t[5] for t in tensors)
    b = sum(t[4] for t in tensors)
    assert any(re.match(rf"^\s+all\s+21\s+{n:,}\s+{b:,}\s+.*\s{8 * b / n:.2f}$", ln) for ln in lines)


def test_tensor_filter(files, capsys):
    path = files["q4_0"]
    names = [t.name for t in GGUFReader(path).tensors]
    s = inspect_json(path, "--tensors", r"blk\.1\.ffn_")
    want = [n for n in names if re.search(r"blk\.1\.ffn_", n)]
    assert [t["name"] for t in s["tensors"]] == want and len(want) == 4
    assert [t["index"] for t in s["tensors"]] == [names.index(n) for n in want]
    assert s["tensor_count"] == 21 and s["totals"]["all"]["tensors"] == 4
    assert s["totals"]["all"]["bytes"] == sum(t["bytes"] for t in s["tensors"])
    capsys.readouterr()
    assert main(["inspect", str(path), "--tensors", "("]) == 2
    assert "not a regular expression" in capsys.readouterr().err


def test_errors_exit_2(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing.gguf")]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "x.zip").write_bytes(b"PK\x03\x04" + bytes(100))
    assert main(["inspect", str(tmp_path / "x.zip")]) == 2
    assert "not a GGUF or ggml file" in capsys.readouterr().err


@pytest.mark.parametrize("outtype", ["f16", "q4_0"])
def test_ggml_file_agrees_with_its_checkpoint(files, outtype):
    """The ggjt header is read with struct here, the tensors are the checkpoint's (Meta names and
    shapes), and each f16 tensor's bytes at the offset inspect reports are the checkpoint's."""
    path, sd = files[f"ggml-{outtype}"], files["sd"]
    s = inspect_json(path)
    raw = path.read_bytes()
    magic, version, *hp = struct.unpack_from("<9I", raw, 0)
    assert (magic, version) == (0x67676A74, 3) and s["format"] == "ggjt" and s["version"] == 3
    assert [
        s["metadata"][k]["value"] for k in ("n_vocab", "n_embd", "n_mult", "n_head", "n_layer", "n_rot", "ftype")
    ] == hp
    assert hp[:2] == [512, 64] and hp[3:6] == [4, 2, 16] and s["alignment"] == 32
    assert s["vocab_size"] == 512 and s["metadata"]["vocab.tokens"]["count"] == 512
    assert {t["name"]: tuple(t["shape"]) for t in s["tensors"]} == {k: tuple(v.shape) for k, v in sd.items()}
    for t in s["tensors"]:
        w = sd[t["name"]]
        want = "F32" if w.dim() == 1 else outtype.upper()
        assert t["type"] == want and t["offset"] % 32 == 0 and t["elements"] == w.numel()
        if want == "F16":
            assert raw[t["offset"] : t["offset"] + t["bytes"]] == w.to(torch.float16).numpy().tobytes()
        elif want == "F32":
            assert raw[t["offset"] : t["offset"] + t["bytes"]] == w.float().numpy().tobytes()
        else:
            assert t["bytes"] == w.numel() // 32 * 18
    assert max(t["offset"] + t["bytes"] for t in s["tensors"]) == len(raw)  # ggjt: nothing after the last tensor


def test_ggml_text(files, capsys):
    assert main(["inspect", str(files["ggml-q4_0"])]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0].startswith("mha-q4_0.bin: ggjt v3") and "vocab: 512 tokens" in text
    assert re.search(r"^\s+0\s+tok_embeddings\.weight\s+Q4_0\s+512 x 64\s", text, re.M)


def test_multi_gb_file_is_quick(tmp_path):
    """A header with a 128k-token vocabulary before 4 GiB of (sparse) tensor data."""
    n_vocab = 128_000
    b = build_gguf(
        [
            ("general.architecture", VT.STRING, "llama"),
            ("tokenizer.ggml.tokens", VT.ARRAY, [f"tok{i}" for i in range(n_vocab)], VT.STRING),
            ("tokenizer.ggml.scores", VT.ARRAY, [0.0] * n_vocab, VT.FLOAT32),
        ],
        [("big", [1 << 15, 1 << 15], QT.F32)],
        with_data=False,
    )
    p = tmp_path / "big.gguf"
    with open(p, "wb") as f:
        f.write(b.data)
        f.truncate(b.at["data"] + (1 << 32))
    t0, c0 = time.perf_counter(), time.process_time()
    s = inspect_json(p)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert s["vocab_size"] == n_vocab and s["tensors"][0]["bytes"] == 1 << 32
    assert s["totals"]["all"]["bits_per_weight"] == 32.0
    # CPU time: the machine running the tests may be shared; the wall-clock bound only catches a hang.
    assert cpu < 0.5 and dt < 5.0, f"inspect took {cpu:.2f} s of CPU, {dt:.2f} s"


def _legacy_file(magic: str, version: int | None) -> tuple[bytes, list[dict]]:
    """A tiny pre-GGUF file written by hand: 3 tokens, an f32 vector and a q4_0 matrix in the
    old q4_0 layout (f32 scale: 20 bytes per 32 weights). Returns the bytes and, per tensor,
    where its data is."""
    code = {"ggml": 0x67676D6C, "ggmf": 0x67676D66, "ggjt": 0x67676A74}[magic]
    b = bytearray(struct.pack("<I", code))
    if version is not None:
        b += struct.pack("<I", version)
    b += struct.pack("<7I", 3, 32, 256, 4, 1, 8, 2)  # n_vocab, n_embd, n_mult, n_head, n_layer, n_rot, ftype
    for tok in (b"<unk>", b"\xe2\x96\x81a", b"b"):
        b += struct.pack("<I", len(tok)) + tok + (struct.pack("<f", -1.0) if magic != "ggml" else b"")
    want = []
    for name, dims, ttype, nbytes in (("norm.weight", [4], 0, 16), ("tok_embeddings.weight", [32, 2], 2, 40)):
        name_b = name.encode()
        b += struct.pack("<3i", len(dims), len(name_b), ttype) + struct.pack(f"<{len(dims)}i", *dims) + name_b
        if magic == "ggjt":
            b += bytes(-len(b) % 32)
        want.append(
            {
                "name": name,
                "shape": dims[::-1],
                "offset": len(b),
                "bytes": nbytes,
                "type": "F32" if ttype == 0 else "Q4_0 (pre-v3 layout)",
            }
        )
        b += bytes(range(nbytes))
    return bytes(b), want


@pytest.mark.parametrize("magic,version", [("ggml", None), ("ggmf", 1), ("ggjt", 1), ("ggjt", 2)])
def test_older_ggml_revisions(tmp_path, magic, version):
    data, want = _legacy_file(magic, version)
    p = tmp_path / f"{magic}{version}.bin"
    p.write_bytes(data)
    s = inspect_json(p)
    assert s["format"] == magic and s["version"] == (version or 0)
    assert s["alignment"] == (32 if magic == "ggjt" else None)
    assert [
        s["metadata"][k]["value"] for k in ("n_vocab", "n_embd", "n_mult", "n_head", "n_layer", "n_rot", "ftype")
    ] == [3, 32, 256, 4, 1, 8, 2]
    assert s["vocab_size"] == 3 and s["metadata"]["vocab.tokens"]["value"] == ["<unk>", "▁a", "b"]
    assert [{k: t[k] for k in ("name", "shape", "offset", "bytes", "type")} for t in s["tensors"]] == want
    assert s["totals"]["by_type"]["Q4_0 (pre-v3 layout)"]["bits_per_weight"] == 40 * 8 / 64


def test_truncated_ggml_file_exits_2(files, tmp_path, capsys):
    data = files["ggml-q4_0"].read_bytes()
    p = tmp_path / "cut.bin"
    p.write_bytes(data[: len(data) - 100])
    assert main(["inspect", str(p)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "output.weight" in err and "Traceback" not in err
