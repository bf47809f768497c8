"""Issue 21, the findings the other hostile-input tests did not yet reproduce end to end:
inspect showing a file's control characters raw, quantize and verify --checksums parsing a
file a second time with gguf-py's GGUFReader (which has none of the hardened reader's
limits), and verify reading a tokenizer_config.json that names token id 10**9.
(The rest: tests/test_hostile*.py, test_race.py, test_safety.py, test_os_errors.py,
test_torch_pickles.py, test_fuzz*.py; the README's Safety section lists them.)"""

from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFValueType as V

from llmconv.formats.gguf_writer import KV, TensorEntry, plan_layout
from hostile_util import HF, refused, run

SCREEN = "\n\x1b[2J\x1b]0;pwned\x07\u202e"  # a newline, clear screen, set the title, right-to-left


def test_inspect_escapes_control_characters_in_keys_values_and_tensor_names(tmp_path, capsys):
    kvs = [KV("general.architecture", "llama", V.STRING), KV(f"evil{SCREEN}.key", f"value{SCREEN}", V.STRING)]
    data = np.arange(4, dtype=np.float32)
    layout = plan_layout(kvs, [TensorEntry(f"t{SCREEN}", (4,), GGMLQuantizationType.F32, data.nbytes)])
    path = tmp_path / "x.gguf"
    with open(path, "wb") as f:
        f.write(layout.header)
        f.write(data.tobytes())
    code, out, err = run(["inspect", path], capsys)
    assert code == 0, err
    for raw in ("\x1b", "\x07", "\u202e"):
        assert raw not in out + err
    assert out.count("\\x1b[2J") == 3 and out.count("\\u202e") == 3, out  # key, value, tensor name
    assert "\nllmconv" not in out and all(line.strip() for line in out.splitlines() if "evil" in line)


@pytest.fixture
def no_gguf_py_reader(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("gguf-py's GGUFReader parsed the file")

    monkeypatch.setattr(gguf.GGUFReader, "__init__", refuse)


def test_quantize_reads_only_through_the_hardened_reader(base, tmp_path, capsys, no_gguf_py_reader):  # noqa: F811
    code, _, err = run(["quantize", base, tmp_path / "q.gguf", "--type", "q8_0", "-q", "--checksum"], capsys)
    assert code == 0, err


def test_verify_checksums_reads_only_through_the_hardened_reader(base, tmp_path, capsys, no_gguf_py_reader):  # noqa: F811
    code, _, err = run(["verify", base, "-r", HF, "--checksums", "--tokens", "16"], capsys)
    assert code == 0, err


def test_verify_refuses_a_huge_added_token_id_in_tokenizer_config(base, tmp_path, capsys):  # noqa: F811
    """61 bytes that used to make verify build 10**9 placeholder tokens."""
    ref = shutil.copytree(HF, tmp_path / "ref")
    (ref / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {"1000000000": {"content": "x"}}}))
    refused(["verify", base, "-r", ref], capsys, "tokenizer_config.json", "1000000000")
