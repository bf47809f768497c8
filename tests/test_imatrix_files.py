"""imatrix files (GGUF and legacy .dat) and `quantize/convert --imatrix` against llama.cpp.

The whole-file oracle is `llama_model_quantize` with its `imatrix` parameter (an array of
llama_model_imatrix_data: name, float data, size), given the per-column importances that
llama-quantize derives from the file (in_sum2 / counts): for every mix and model the types,
the bytes of every tensor and general.file_type must equal `llmconv quantize --imatrix`'s.
"""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest

import llmconv
from llmconv.cli import main
from llmconv.errors import LlmconvError
from llmconv.imatrix import Imatrix, ImatrixEntry, read_imatrix, write_imatrix_gguf
from mix_util import FIXTURE, assert_same_file, llama_quantize_with_imatrix, read, synthetic_imatrix

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.llamacpp
@pytest.mark.parametrize(
    "model,mix",
    [
        ("fixture", "q4_k_m"),
        ("fixture", "q2_k"),
        ("fixture", "q6_k"),
        ("gqa2-ffn800", "q4_0"),
        ("gqa2-ffn800", "q5_k_s"),
        ("dim288", "q3_k_m"),
    ],
)
def test_quantize_with_imatrix_equals_llama_quantize(f32_mix_models, tmp_path, model, mix):
    src = f32_mix_models[model]
    im = synthetic_imatrix(src)
    im_path = tmp_path / "model.imatrix.gguf"
    write_imatrix_gguf(im_path, im)
    theirs = llama_quantize_with_imatrix(src, tmp_path / "theirs.gguf", mix, im)
    ours = tmp_path / "ours.gguf"
    llmconv.quantize(src, ours, outtype=mix, imatrix=im_path)
    assert_same_file(theirs, ours)
    if model == "fixture":
        plain = tmp_path / "plain.gguf"
        llmconv.quantize(src, plain, outtype=mix)
        assert read(plain)[1] != read(ours)[1]  # the imatrix was used
    if mix in ("q4_0", "q5_0"):  # the imatrix-only rule fired (12 layers: layer 0)
        assert read(ours)[1]["blk.0.ffn_down.weight"][0] == mix.upper().replace("_0", "_1")


@pytest.mark.llamacpp
def test_convert_with_imatrix_equals_quantize(f32_mix_models, tmp_path):
    im_path = tmp_path / "fixture.imatrix.gguf"
    write_imatrix_gguf(im_path, synthetic_imatrix(f32_mix_models["fixture"], seed=3))
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    llmconv.convert(FIXTURE, a, outtype="q4_K_M", imatrix=im_path)
    llmconv.quantize(f32_mix_models["fixture"], b, outtype="q4_K_M", imatrix=im_path)
    assert read(a)[1] == read(b)[1]


def test_gguf_roundtrip_and_layout(tmp_path):
    im = Imatrix(
        {
            "blk.1.ffn_up.weight": ImatrixEntry(np.arange(1, 9, dtype=np.float32).reshape(1, 8), np.array([4])),
            "blk.0.attn_q.weight": ImatrixEntry(np.ones((1, 4), np.float32), np.array([0])),
        },
        ["calib.txt"],
        3,
        512,
    )
    p = tmp_path / "x.imatrix.gguf"
    write_imatrix_gguf(p, im)
    # what llama.cpp's loader looks for, read with gguf-py (an independent reader)
    r = gguf.GGUFReader(str(p))
    assert r.get_field("general.type").contents() == "imatrix"
    assert r.get_field("imatrix.datasets").contents() == ["calib.txt"]
    assert r.get_field("imatrix.chunk_count").contents() == 3
    assert r.get_field("imatrix.chunk_size").contents() == 512
    assert r.get_field("imatrix.chunk_count").types == [gguf.GGUFValueType.UINT32]
    tensors = {t.name: t for t in r.tensors}
    assert [t.name for t in r.tensors] == [
        "blk.0.attn_q.weight.in_sum2",
        "blk.0.attn_q.weight.counts",
        "blk.1.ffn_up.weight.in_sum2",
        "blk.1.ffn_up.weight.counts",
    ]
    assert list(tensors["blk.1.ffn_up.weight.in_sum2"].shape) == [8, 1]
    assert list(tensors["blk.1.ffn_up.weight.counts"].shape) == [1, 1]
    assert float(tensors["blk.1.ffn_up.weight.counts"].data[0, 0]) == 4.0
    back = read_imatrix(p)
    assert back.datasets == ["calib.txt"] and back.chunk_count == 3 and back.chunk_size == 512
    assert np.array_equal(back.importance("blk.1.ffn_up.weight"), np.arange(1, 9, dtype=np.float32) / 4)
    assert np.array_equal(back.importance("blk.0.attn_q.weight"), np.ones(4, np.float32))  # count 0: ones
    assert back.importance("output.weight") is None


def write_legacy_dat(path: Path, entries: dict[str, tuple[int, np.ndarray]], trailer=None) -> None:
    """The legacy format as llama-imatrix's save_imatrix_legacy writes it."""
    with open(path, "wb") as f:
        f.write(struct.pack("<i", len(entries)))
        for name, (ncall, vals) in entries.items():
            b = name.encode()
            f.write(struct.pack("<i", len(b)) + b + struct.pack("<ii", ncall, len(vals)))
            f.write(np.asarray(vals, "<f4").tobytes())
        if trailer:
            chunks, dataset = trailer
            f.write(struct.pack("<ii", chunks, len(dataset.encode())) + dataset.encode())


def test_legacy_dat(tmp_path):
    p = tmp_path / "imatrix.dat"
    vals = np.array([2.0, 4.0, 6.0, 8.0], np.float32)
    write_legacy_dat(p, {"blk.0.attn_k.weight": (2, vals), "blk.0.ffn_down.weight": (0, vals)}, (10, "wiki.txt"))
    im = read_imatrix(p)
    assert im.legacy and im.chunk_count == 10 and im.datasets == ["wiki.txt"]
    assert np.array_equal(im.importance("blk.0.attn_k.weight"), vals / 2)  # sums / ncall
    assert np.array_equal(im.importance("blk.0.ffn_down.weight"), vals)  # ncall 0: as stored
    write_legacy_dat(p, {"blk.0.attn_k.weight": (2, vals)})  # no trailer: fine
    assert read_imatrix(p).chunk_count == 0


@pytest.mark.parametrize("damage", ["truncated", "garbage", "nan", "missing_counts", "no_keys"])
def test_bad_imatrix_files_are_one_line_errors(tmp_path, damage, capsys):
    p = tmp_path / "bad.imatrix"
    good = tmp_path / "good.gguf"
    im = Imatrix({"blk.0.attn_q.weight": ImatrixEntry(np.ones((1, 256), np.float32), np.array([5]))}, ["x"], 1, 8)
    write_imatrix_gguf(good, im)
    if damage == "truncated":
        p.write_bytes(good.read_bytes()[:200])
    elif damage == "garbage":
        p.write_bytes(b"\x05\x00\x00\x00" + b"\xff" * 40)
    elif damage == "nan":
        im.entries["blk.0.attn_q.weight"].sums[0, 3] = np.nan
        write_imatrix_gguf(p, im)
    elif damage == "missing_counts":
        w = gguf.GGUFWriter(str(p), "llama")
        for k, v in (("imatrix.chunk_count", 1), ("imatrix.chunk_size", 8)):
            w.add_uint32(k, v)
        w.add_array("imatrix.datasets", ["x"])
        w.add_tensor("blk.0.attn_q.weight.in_sum2", np.ones((1, 256), np.float32))
        w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    elif damage == "no_keys":
        w = gguf.GGUFWriter(str(p), "llama")
        w.add_tensor("blk.0.attn_q.weight.in_sum2", np.ones((1, 256), np.float32))
        w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(LlmconvError) as e:
        read_imatrix(p)
    assert str(p) in e.value.one_line() and "\n" not in e.value.one_line()
    # and through the CLI: exit 2, one line naming the file
    src = tmp_path / "m.gguf"
    from llmconv.testing.llama_gguf_util import write_f32_llama_gguf

    write_f32_llama_gguf(src, {"blk.0.attn_q.weight": np.zeros((256, 256), np.float32)})
    capsys.readouterr()
    assert main(["quantize", str(src), str(tmp_path / "o.gguf"), "--type", "q4_k", "--imatrix", str(p), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(p) in err


def test_imatrix_row_mismatch_names_the_tensor(tmp_path, capsys):
    from llmconv.testing.llama_gguf_util import write_f32_llama_gguf

    src = write_f32_llama_gguf(tmp_path / "m.gguf", {"blk.0.attn_q.weight": np.zeros((256, 256), np.float32)})
    im_path = tmp_path / "im.gguf"
    write_imatrix_gguf(
        im_path,
        Imatrix({"blk.0.attn_q.weight": ImatrixEntry(np.ones((1, 512), np.float32), np.array([1]))}, ["x"], 1, 8),
    )
    assert (
        main(["quantize", str(src), str(tmp_path / "o.gguf"), "--type", "q4_k", "--imatrix", str(im_path), "-q"]) == 2
    )
    err = capsys.readouterr().err
    assert "blk.0.attn_q.weight" in err and "512" in err
