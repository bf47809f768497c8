"""Issue 21, GGUF side: quantize, verify --checksums and inspect read only through the hardened
reader; wrongly typed metadata is one line; reader memory stays near the file size; checksum
sidecars name only the files of their split set. Hostile files are the fixture's real
conversion with one thing changed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFValueType as V

from llmconv.errors import LlmconvError
from llmconv.formats.checksums import check_sidecar
from llmconv.formats.gguf_reader import read_gguf
from llmconv.formats.gguf_writer import KV, TensorEntry, plan_layout
from llmconv.testing.procstat import run_peak_rss_anon
from hostile_util import refused, run

ROOT = Path(__file__).resolve().parents[1]
HF = ROOT / "fixtures" / "hf-tiny-llama"


def rewrite(src: Path, dst: Path, change=None, extra=()) -> Path:
    """`src` with its metadata passed through `change(list[KV]) -> list[KV]`, tensors as they were."""
    g = read_gguf(src, check_types=False)
    kvs = [
        KV(k, v, g.kv_types[k].type, g.kv_types[k].element) for k, v in g.kvs.items() if k != "general.alignment"
    ] + list(extra)
    if change:
        kvs = change(kvs)
    entries = [TensorEntry(t.name, t.shape, t.ggml_type, t.nbytes) for t in g.tensors]
    layout = plan_layout(kvs, entries)
    with open(dst, "wb") as f:
        f.write(layout.header)
        for t, e in zip(g.tensors, layout.tensors):
            f.seek(layout.data_start + e.offset)
            f.write(bytes(t.data))
    return dst


def replace(key: str, value, vtype, sub=None):
    def change(kvs):
        return [KV(key, value, vtype, sub) if kv.key == key else kv for kv in kvs]

    return change


BAD_METADATA = {
    "arch-u32": (replace("general.architecture", 7, V.UINT32), "general.architecture"),
    "block-count-string": (replace("llama.block_count", "2", V.STRING), "llama.block_count"),
    "block-count-billion": (replace("llama.block_count", 10**9, V.UINT32), "llama.block_count"),
    "eps-zero": (replace("llama.attention.layer_norm_rms_epsilon", 0.0, V.FLOAT32), "layer_norm_rms_epsilon"),
    "theta-nan": (replace("llama.rope.freq_base", float("nan"), V.FLOAT32), "llama.rope.freq_base"),
    "tokens-u32": (replace("tokenizer.ggml.tokens", [4, 5, 6], V.ARRAY, V.UINT32), "tokenizer.ggml.tokens"),
    "bos-past-vocab": (replace("tokenizer.ggml.bos_token_id", 10**6, V.UINT32), "bos_token_id"),
}


@pytest.mark.parametrize("case", list(BAD_METADATA))
def test_wrongly_typed_metadata_is_one_line_in_quantize(base, tmp_path, capsys, case):
    change, key = BAD_METADATA[case]
    bad = rewrite(base, tmp_path / "bad.gguf", change)
    refused(["quantize", bad, tmp_path / "out.gguf", "--type", "q8_0"], capsys, "bad.gguf", key)
    assert not (tmp_path / "out.gguf").exists()


def test_rope_scale_factor_zero_is_one_line_in_verify(base, tmp_path, capsys):
    bad = rewrite(
        base,
        tmp_path / "bad.gguf",
        extra=[KV("llama.rope.scaling.type", "linear", V.STRING), KV("llama.rope.scaling.factor", 0.0, V.FLOAT32)],
    )
    refused(["verify", bad, "-r", HF], capsys, "llama.rope.scaling.factor")


@pytest.mark.parametrize("case", ["tokens-u32", "block-count-billion"])
def test_wrongly_typed_metadata_is_one_line_in_verify(base, tmp_path, capsys, case):
    change, key = BAD_METADATA[case]
    refused(["verify", rewrite(base, tmp_path / "bad.gguf", change), "-r", HF], capsys, key)


def test_inspect_still_shows_odd_types(base, tmp_path, capsys):
    bad = rewrite(base, tmp_path / "bad.gguf", BAD_METADATA["arch-u32"][0])
    code, out, err = run(["inspect", bad], capsys)
    assert code == 0, err
    assert "general.architecture" in out


def test_quantize_keeps_keys_named_gguf_dot(base, tmp_path, capsys):
    src = rewrite(base, tmp_path / "src.gguf", extra=[KV("GGUF.note", "kept", V.STRING)])
    code, _, err = run(["quantize", src, tmp_path / "out.gguf", "--type", "q8_0", "-q"], capsys)
    assert code == 0, err
    assert read_gguf(tmp_path / "out.gguf").kvs["GGUF.note"] == "kept"


# ---- checksum sidecars ---------------------------------------------------------------------------


def _sidecar(base: Path, tmp_path: Path, change) -> Path:
    model = tmp_path / "m.gguf"
    model.write_bytes(base.read_bytes())
    doc = json.loads(Path(str(base) + ".sha256.json").read_text())
    doc["files"] = ["m.gguf"]
    change(doc)
    side = tmp_path / "m.gguf.sha256.json"
    side.write_text(json.dumps(doc))
    return model


def test_sidecar_naming_another_file_is_one_line_in_verify(base, tmp_path, capsys):
    model = _sidecar(base, tmp_path, lambda d: d["files"].append("/etc/passwd"))
    refused(["verify", model, "-r", HF, "--checksums"], capsys, "sha256.json", "/etc/passwd", "split set")


@pytest.mark.parametrize("name", ["../base.gguf", "other.gguf", "m-00002-of-00001.gguf", "m-00001-of-00002.gguf\n"])
def test_sidecar_may_name_only_its_split_set(base, tmp_path, name):
    (tmp_path / "other.gguf").write_bytes(base.read_bytes())
    model = _sidecar(base, tmp_path, lambda d: d["files"].append(name))
    with pytest.raises(LlmconvError, match="split set"):
        check_sidecar(model)


def test_sidecar_of_a_split_set_is_accepted(base, tmp_path, capsys):
    code, _, err = run(
        ["quantize", base, tmp_path / "s.gguf", "--type", "f32", "--split-max-tensors", "8", "--checksum", "-q"], capsys
    )
    assert code == 0, err
    assert check_sidecar(tmp_path / "s.gguf") == []
    assert check_sidecar(tmp_path / "s-00001-of-00003.gguf", tmp_path / "s.gguf.sha256.json") == []


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d.update(files="m.gguf"),
        lambda d: d.update(files=[3]),
        lambda d: d["tensors"].update({"token_embd.weight": "abc"}),
        lambda d: d["tensors"]["token_embd.weight"].update(sha256=None),
        lambda d: d.update(tensors=[]),
    ],
    ids=["files-string", "files-int", "entry-string", "sha-null", "tensors-list"],
)
def test_malformed_sidecar_is_an_llmconv_error(base, tmp_path, change):
    model = _sidecar(base, tmp_path, change)
    with pytest.raises(LlmconvError, match="sha256.json"):
        check_sidecar(model)


def test_deeply_nested_sidecar_is_an_llmconv_error(base, tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(base.read_bytes())
    (tmp_path / "m.gguf.sha256.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(LlmconvError, match="nested too deeply"):
        check_sidecar(model)


# ---- reader memory -------------------------------------------------------------------------------


def _array_file(path: Path, n: int, element) -> Path:
    value = np.zeros(n, np.uint8) if element == V.UINT8 else [""] * n
    kvs = [KV("general.architecture", "llama", V.STRING), KV("test.big", value, V.ARRAY, element)]
    layout = plan_layout(kvs, [TensorEntry("t", (32,), GGMLQuantizationType.F32, 128)])
    path.write_bytes(layout.header + bytes(128))
    return path


def test_reader_memory_stays_near_the_file_size(tmp_path):
    """16 MiB of metadata array (u8 items; empty strings, 8 bytes each) read by inspect: peak
    RssAnon within the tiny file's + 2x the file + 16 MiB (was 9-57x the file)."""
    tiny = _array_file(tmp_path / "tiny.gguf", 10, V.UINT8)
    cmd = [sys.executable, "-m", "llmconv.cli", "inspect"]
    _, base_peak, code, err = run_peak_rss_anon(cmd + [str(tiny)])
    assert code == 0, err
    for name, n, element in (("u8", 16 << 20, V.UINT8), ("str", 2 << 20, V.STRING)):
        f = _array_file(tmp_path / f"{name}.gguf", n, element)
        size = f.stat().st_size
        _, peak, code, err = run_peak_rss_anon(cmd + [str(f)])
        assert code == 0, err
        assert peak - base_peak < 2 * size + (16 << 20), (name, (peak - base_peak) / size)
