"""--checksum sidecar: written from the bytes as written, and it catches a changed tensor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from gguf import GGUFReader

import llmconv
from llmconv.cli import main
from llmconv.formats.checksums import check_sidecar, sidecar_path, tensor_sha256

FIXTURE = Path(__file__).parent.parent / "fixtures" / "tiny-llama"


def _convert(tmp_path: Path, **options) -> Path:
    out = tmp_path / "m.gguf"
    llmconv.convert(FIXTURE, out, outtype="q8_0", checksum=True, **options)
    return out


def test_sidecar_lists_every_tensor_with_its_hash(tmp_path):
    out = _convert(tmp_path)
    doc = json.loads(sidecar_path(out).read_text())
    r = GGUFReader(out)
    assert set(doc["tensors"]) == {t.name for t in r.tensors}
    for t in r.tensors:
        e = doc["tensors"][t.name]
        # an independent hash of the bytes as the file holds them
        assert e["sha256"] == tensor_sha256(np.asarray(t.data).view(np.uint8))
        assert e["bytes"] == int(t.n_bytes)
    assert check_sidecar(out) == []


def test_flipped_byte_is_named(tmp_path):
    out = _convert(tmp_path)
    r = GGUFReader(out)
    victim = next(t for t in r.tensors if t.name == "blk.1.ffn_down.weight")
    off = int(victim.data_offset) + 100
    del r
    with open(out, "r+b") as f:
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 0x10]))
    problems = check_sidecar(out)
    assert len(problems) == 1 and problems[0].startswith("blk.1.ffn_down.weight")


def test_split_output_sidecar_covers_all_parts(tmp_path):
    out = _convert(tmp_path, split_max_tensors=8)
    parts = sorted(tmp_path.glob("m-0000*-of-*.gguf"))
    assert len(parts) > 1 and not out.exists()
    doc = json.loads(sidecar_path(out).read_text())
    assert doc["files"] == [p.name for p in parts]
    assert check_sidecar(out) == []
    # removing a part is reported, not crashed on
    moved = tmp_path / "elsewhere.gguf"
    shutil.move(parts[-1], moved)
    assert any("missing" in p for p in check_sidecar(out))


def test_check_written_catches_a_damaged_header_and_size(tmp_path):
    """The post-write check re-reads the file; damage to the header or size is an error."""
    import pytest

    from llmconv.convert.execute import check_written
    from llmconv.errors import LlmconvError
    from llmconv.formats.gguf_writer import GGUFFileWriter, KV, TensorEntry, plan_layout
    from gguf import GGMLQuantizationType, GGUFValueType

    lay = plan_layout(
        [KV("general.architecture", "llama", GGUFValueType.STRING)],
        [
            TensorEntry("a", (2, 32), GGMLQuantizationType.F32, 256),
            TensorEntry("b", (4,), GGMLQuantizationType.F32, 16),
        ],
    )
    path = tmp_path / "x.gguf"
    with GGUFFileWriter(path, lay) as w:
        w.write_tensor("a", np.zeros((2, 32), np.float32))
        w.write_tensor("b", np.zeros(4, np.float32))
    check_written(path, lay, path)  # intact: no error
    raw = bytearray(path.read_bytes())
    raw[lay.infos_start + 8] ^= 1  # a byte of the first tensor's name
    path.write_bytes(raw)
    with pytest.raises(LlmconvError, match="header differs"):
        check_written(path, lay, path)
    raw[lay.infos_start + 8] ^= 1
    path.write_bytes(raw[:-4])
    with pytest.raises(LlmconvError, match="written size"):
        check_written(path, lay, path)
    path.write_bytes(raw)
    lay.tensors[0].nbytes = 264  # a plan whose table its own header does not encode
    with pytest.raises(LlmconvError, match="tensor table disagrees"):
        check_written(path, lay, path)


def test_verify_checksums_flag(tmp_path, capsys):
    out = _convert(tmp_path)
    args = ["verify", str(out), "--reference", str(FIXTURE), "--tokens", "16", "--checksums"]
    assert main(args) == 0
    r = GGUFReader(out)
    off = int(next(t for t in r.tensors if t.name == "output.weight").data_offset) + 3
    del r
    with open(out, "r+b") as f:
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 0x01]))  # one bit: far below what the logit bounds can see
    capsys.readouterr()
    assert main(args) == 1
    assert "checksum: output.weight" in capsys.readouterr().out
