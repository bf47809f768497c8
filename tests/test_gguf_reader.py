"""Issue 8 §4: the GGUF reader agrees with gguf.GGUFReader on good files and rejects each
kind of bad file with a one-line error naming the problem and its byte offset (exit 2
through the CLI).

Bad files are written byte by byte with `build_gguf` below, which is independent of the
reader and records where it put each field, so every test knows the offset to expect. A
test first checks that the good version of each file parses (in both readers), so each bad
file differs from a good one by exactly the thing under test.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT, GGUFValueType as VT

import llmconv
from llmconv.cli import main
from llmconv.errors import LlmconvError
from llmconv.testing.gguf_build import build_gguf, good, write_file, gguf_reader_view, assert_agrees_with_gguf_reader
from llmconv.formats.gguf_reader import MAX_ARRAY_ITEMS, MAX_STRING_BYTES, GGUFFormatError, read_gguf

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "fixtures" / "tiny-llama"

# ---- good files ---------------------------------------------------------------------------------


@pytest.mark.parametrize("outtype", ["f16", "q4_0", "q4_k"])
def test_agrees_with_gguf_reader_on_fixture(converted, outtype):
    g = assert_agrees_with_gguf_reader(converted(FIXTURE, outtype))
    assert len(g.tensors) == 21 and len(g.kvs["tokenizer.ggml.tokens"]) == 512


def test_agrees_with_gguf_reader_on_every_value_type(tmp_path):
    p = write_file(tmp_path, good().data)
    g = assert_agrees_with_gguf_reader(p)
    assert g.alignment == 64
    assert g.kvs["test.unicode"] == "naïve 東京 🙂" and g.kvs["test.bool"] is True
    assert g.kvs["test.u64"] == 2**64 - 1 and g.kvs["test.bools"] == [True, False, True]
    assert [t.shape for t in g.tensors] == [(7,), (5, 3), (3, 64), (2, 2, 32), (2, 1, 1, 256)]


def test_version_2_reads_like_version_3(tmp_path):
    p = write_file(tmp_path, good(version=2).data)
    assert assert_agrees_with_gguf_reader(p).version == 2


def test_tensor_data_is_mapped_lazily(tmp_path):
    b = good()
    g = read_gguf(write_file(tmp_path, b.data))
    assert g._memmap is None  # parsing did not map the data
    t = g.tensor("c.q4_0")
    assert t.offset == b.at["data"] + 128  # after a.f32 (28 bytes) and b.f16 (30 bytes), 64-aligned
    assert t.nbytes == 3 * 2 * 18 and bytes(t.data) == b.data[t.offset : t.offset + t.nbytes]
    assert isinstance(t.data, np.memmap) and t.data.dtype == np.uint8


def test_invalid_utf8_string_value_stays_bytes(tmp_path):
    b = build_gguf([("x.s", VT.STRING, b"\xff\xfeok"), ("x.a", VT.ARRAY, [b"ok", b"\xc3"], VT.STRING)])
    g = read_gguf(write_file(tmp_path, b.data))
    assert g.kvs["x.s"] == b"\xff\xfeok" and g.kvs["x.a"] == ["ok", b"\xc3"]


def test_candidate_and_quantize_sources_read_through_it(converted, tmp_path):
    from llmconv.verify.model_file import open_model_file, read_config

    r, kvs, _ = gguf_reader_view(converted(FIXTURE, "q4_0"))
    mf = open_model_file(converted(FIXTURE, "q4_0"))
    assert mf.tokens == kvs["tokenizer.ggml.tokens"][2]
    assert read_config(mf).n_vocab == 512
    out = tmp_path / "requant.gguf"
    llmconv.quantize(converted(FIXTURE, "f16"), out, outtype="q8_0")
    assert_agrees_with_gguf_reader(out)


def test_header_of_a_multi_gb_file_reads_fast(tmp_path):
    """4 GiB of (sparse) tensor data and a 128k-token vocabulary: only the header is read."""
    n_vocab = 128_000
    b = build_gguf(
        [
            ("general.architecture", VT.STRING, "llama"),
            ("tokenizer.ggml.tokens", VT.ARRAY, [f"tok{i}" for i in range(n_vocab)], VT.STRING),
            ("tokenizer.ggml.scores", VT.ARRAY, [0.0] * n_vocab, VT.FLOAT32),
        ],
        [("small", [32], QT.F32), ("big", [1 << 15, 1 << 15], QT.F32, 128)],
        with_data=False,
    )
    p = tmp_path / "big.gguf"
    with open(p, "wb") as f:
        f.write(b.data)
        f.truncate(b.at["data"] + 128 + (1 << 32))  # sparse: no disk space, no page cache
    t0, c0 = time.perf_counter(), time.process_time()
    g = read_gguf(p)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert g.tensor("big").nbytes == 1 << 32 and g.file_size > 4 << 30
    assert len(g.kvs["tokenizer.ggml.tokens"]) == n_vocab
    # CPU time: the machine running the tests may be shared; the wall-clock bound only catches a hang.
    assert cpu < 0.5 and dt < 5.0, f"header read took {cpu:.2f} s of CPU, {dt:.2f} s"


# ---- bad files: one test per rule -----------------------------------------------------------------

U64_MAX = 2**64 - 1


def _tensor(name="t", ne=(32,), ttype=QT.F32, *offset):
    return (name, list(ne), ttype, *offset)


def _case_bad_magic():
    b = good(magic=b"GGUX")
    return b.data, 0, "magic b'GGUX'"


def _case_truncated_header():
    return good().data[:13], 8, "file ends inside the tensor count"


def _case_empty_file():
    return b"", 0, "file ends inside the magic"


def _case_version_1():
    return good(version=1).data, 4, "version 1 is not supported"


def _case_version_4():
    return good(version=4).data, 4, "version 4 is not supported"


def _case_big_endian():
    return good(version=3 << 24).data, 4, "big-endian"


def _case_huge_kv_count():
    b = good(n_kv=U64_MAX)
    return b.data, b.at["n_kv"], "metadata count 18446744073709551615 cannot fit"


def _case_kv_count_past_file():
    b = good()
    n = len(b.data) // 14 + 1  # just more than the file could hold
    return good(n_kv=n).data, b.at["n_kv"], f"metadata count {n} cannot fit"


def _case_huge_tensor_count():
    b = good(n_tensors=2**62)
    return b.data, b.at["n_tensors"], "tensor count 4611686018427387904"


def _case_kv_count_one_too_many():
    # The next "key" is the zero padding after the header: an empty key.
    b = build_gguf([("a.b", VT.UINT32, 1)], [], n_kv=2)
    return b.data, b.at["value:a.b"] + 4, "metadata key is empty"


def _case_huge_key_length():
    b = build_gguf([("a.b", VT.UINT32, 1)])
    data = bytearray(b.data)
    data[b.at["kv:a.b"] : b.at["kv:a.b"] + 8] = struct.pack("<Q", U64_MAX)
    return bytes(data), b.at["kv:a.b"], f"a metadata key is {U64_MAX} bytes long; the limit is {MAX_STRING_BYTES}"


def _case_string_past_end():
    b = build_gguf([("a.s", VT.STRING, "hello")])
    data = bytearray(b.data)
    data[b.at["value:a.s"] : b.at["value:a.s"] + 8] = struct.pack("<Q", 1000)
    return bytes(data), b.at["value:a.s"] + 8, "file ends inside the value of a.s (1000 bytes)"


def _case_string_over_cap():
    b = build_gguf([("a.s", VT.STRING, "hello")])
    data = bytearray(b.data)
    data[b.at["value:a.s"] : b.at["value:a.s"] + 8] = struct.pack("<Q", MAX_STRING_BYTES + 1)
    return bytes(data), b.at["value:a.s"], "the value of a.s is 67108865 bytes long; the limit"


def _case_array_count_over_cap():
    b = build_gguf([("a.arr", VT.ARRAY, [1, 2], VT.UINT8)])
    data = bytearray(b.data)
    pos = b.at["value:a.arr"] + 4
    data[pos : pos + 8] = struct.pack("<Q", MAX_ARRAY_ITEMS + 1)
    return bytes(data), pos, f"a.arr: array of {MAX_ARRAY_ITEMS + 1} items; the limit"


def _case_array_count_past_end():
    b = build_gguf([("a.arr", VT.ARRAY, ["x", "y"], VT.STRING)])
    data = bytearray(b.data)
    pos = b.at["value:a.arr"] + 4
    data[pos : pos + 8] = struct.pack("<Q", 1000)
    return bytes(data), pos, "a.arr: array of 1000 STRING items needs at least 8000 bytes"


def _case_unknown_value_type():
    b = build_gguf([("a.b", 13, b"\0\0\0\0")])
    return b.data, b.at["value:a.b"] - 4, "a.b: unknown value type 13"


def _case_unknown_element_type():
    b = build_gguf([("a.arr", VT.ARRAY, struct.pack("<IQ", 99, 0))])
    return b.data, b.at["value:a.arr"], "a.arr: unknown array element type 99"


def _case_nested_array():
    b = build_gguf([("a.arr", VT.ARRAY, struct.pack("<IQ", int(VT.ARRAY), 0))])
    return b.data, b.at["value:a.arr"], "arrays of arrays"


def _case_bool_2():
    b = build_gguf([("a.flag", VT.BOOL, 2)])
    return b.data, b.at["value:a.flag"], "a.flag: bool value 2 (must be 0 or 1)"


def _case_bool_array_item():
    b = build_gguf([("a.flags", VT.ARRAY, [1, 0, 1, 7], VT.BOOL)])
    return b.data, b.at["value:a.flags"] + 12 + 3, "a.flags[3]: bool value 7"


def _case_empty_key():
    b = build_gguf([("a.b", VT.UINT32, 1), ("", VT.UINT32, 2)])
    return b.data, b.at["kv:"], "metadata key is empty"


def _case_duplicate_key():
    b = build_gguf([("a.b", VT.UINT32, 1), ("c", VT.UINT8, 1), ("a.b", VT.UINT32, 2)])
    return b.data, b.at["kv:a.b"], "duplicate metadata key 'a.b' (first at byte 24)"


def _case_key_not_utf8():
    b = build_gguf([(b"a\xff", VT.UINT32, 1)])
    return b.data, 24, "not UTF-8"


def _case_alignment_not_power_of_two():
    b = build_gguf([("general.alignment", VT.UINT32, 48)], [_tensor()])
    return b.data, b.at["value:general.alignment"], "general.alignment = 48 is not a power of two"


def _case_alignment_zero():
    b = build_gguf([("general.alignment", VT.UINT32, 0)], [_tensor()])
    return b.data, b.at["value:general.alignment"], "general.alignment = 0 is not a power of two"


def _case_alignment_wrong_type():
    b = build_gguf([("general.alignment", VT.UINT64, 32)], [_tensor()])
    return b.data, b.at["value:general.alignment"] - 4, "general.alignment must be a UINT32, not UINT64"


def _case_zero_dims():
    b = build_gguf([], [_tensor("w", [])])
    return b.data, b.at["ndims:w"], "tensor w: at byte {}: 0 dimensions (must be 1 to 4)"


def _case_five_dims():
    b = build_gguf([], [_tensor("w", [32, 1, 1, 1, 1])])
    return b.data, b.at["ndims:w"], "5 dimensions (must be 1 to 4)"


def _case_zero_dim():
    b = build_gguf([], [_tensor("w", [32, 0])])
    return b.data, b.at["dims:w"] + 8, "tensor w: at byte {}: dimension 1 is 0 (must be >= 1)"


def _case_element_count_overflow():
    b = build_gguf([], [_tensor("w", [2**32, 2**31])])
    return b.data, b.at["dims:w"], "hold more than 2^63 elements"


def _case_unknown_tensor_type():
    b = build_gguf([], [_tensor("w", [32], 4)])  # 4 was Q4_2, removed from ggml in 2023
    return b.data, b.at["type:w"], "tensor w: at byte {}: unknown tensor type 4"


def _case_huge_tensor_type():
    b = build_gguf([], [_tensor("w", [32], 2**32 - 1)])
    return b.data, b.at["type:w"], "unknown tensor type 4294967295"


def _case_row_not_multiple_of_block():
    b = build_gguf([], [_tensor("w", [48, 2], QT.Q4_0)])
    return b.data, b.at["dims:w"], "row length 48 is not a multiple of Q4_0's block size 32"


def _case_offset_unaligned():
    b = build_gguf([], [_tensor("a"), _tensor("w", [32], QT.F32, 144)])
    return b.data, b.at["offset:w"], "tensor w: at byte {}: data offset 144 is not a multiple of the alignment 32"


def _case_offset_past_end():
    b = build_gguf([], [_tensor("a"), _tensor("w", [32], QT.F32, 2**40)])
    start = 2**40 + b.at["data"]
    return (
        b.data,
        b.at["tensor:w"],
        f"data [{start}, {start + 128}) runs past the end of the file ({len(b.data)} bytes)",
    )


def _case_offset_near_u64_max():
    off = U64_MAX - 31  # aligned, and offset + size wraps in 64-bit arithmetic
    b = build_gguf([], [_tensor("w", [32], QT.F32, off)])
    return b.data, b.at["tensor:w"], "runs past the end of the file"


def _case_data_truncated():
    b = good()
    return b.data[:-1], b.at["tensor:e.q4_k"], "tensor e.q4_k: at byte {}: data"


def _case_overlap():
    b = build_gguf([], [_tensor("a", [64]), _tensor("b", [32], QT.F32, 384), _tensor("w", [32], QT.F32, 64)])
    d = b.at["data"]
    return b.data, b.at["tensor:w"], f"data [{d + 64}, {d + 192}) overlaps tensor a [{d}, {d + 256})"


def _case_empty_tensor_name():
    b = build_gguf([], [_tensor("")])
    return b.data, b.at["tensor:"], "tensor name is empty"


def _case_duplicate_tensor_name():
    b = build_gguf([], [_tensor("w"), _tensor("w", [32], QT.F32, 128)])
    return b.data, b.at["tensor:w"], f"tensor w: at byte {b.at['tensor:w']}: duplicate tensor name (first at byte 24)"


def _case_tensor_name_too_long():
    name = "x" * 64
    b = build_gguf([], [_tensor(name)])
    return b.data, b.at[f"tensor:{name}"], "a tensor name is 64 bytes long; the limit is 63"


def _case_tensor_name_not_utf8():
    b = build_gguf([], [_tensor(b"w\xff")])
    return b.data, 24, "tensor name b'w\\xff' is not UTF-8"


BAD = {name[6:]: f for name, f in dict(globals()).items() if name.startswith("_case_")}


def test_good_files_behind_the_bad_ones_parse(tmp_path):
    """The builder writes correct GGUF: fixed versions of a few bad cases parse in both readers."""
    for b in (
        build_gguf([("a.b", VT.UINT32, 1), ("c", VT.UINT8, 1)], [_tensor("w"), _tensor("v", [32], QT.F32, 128)]),
        build_gguf([("general.alignment", VT.UINT32, 16)], [_tensor("w", [32, 1, 1, 1])]),
        build_gguf([("a.flags", VT.ARRAY, [1, 0, 1, 1], VT.BOOL)], [_tensor("w", [64, 2], QT.Q4_0)]),
        build_gguf([], [_tensor("a", [64]), _tensor("b", [32], QT.F32, 384), _tensor("w", [32], QT.F32, 256)]),
    ):
        assert_agrees_with_gguf_reader(write_file(tmp_path, b.data))


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_file_gives_one_line_error_with_offset(tmp_path, capsys, case):
    data, offset, expect = BAD[case]()
    expect = expect.replace("{}", str(offset))
    p = write_file(tmp_path, data, f"{case}.gguf")
    with pytest.raises(GGUFFormatError) as ei:
        read_gguf(p)
    e = ei.value
    assert isinstance(e, LlmconvError)
    assert e.offset == offset, (e.offset, offset, str(e))
    assert expect in str(e), str(e)
    assert f"at byte {offset}:" in str(e) and str(p) in str(e)

    assert main(["inspect", str(p)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("llmconv: error: ") and expect in err
    assert "Traceback" not in err


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(LlmconvError, match="no such file"):
        read_gguf(tmp_path / "nope.gguf")
    with pytest.raises(LlmconvError):
        read_gguf(tmp_path)
