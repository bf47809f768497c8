"""Issue 21: hostile and unlucky checkpoint inputs. Each attack is built on a real layout (the
fixtures) and must end in one line, exit 2, no traceback; the ones that used to cost gigabytes
or hang run in a subprocess whose time and peak anonymous memory are bounded."""

from __future__ import annotations

import json
import os
import pickle
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from hostile_util import HF, META, assert_one_line_error, copy_of, edit_json, refused, run, with_tokenizer_json
from llmconv.testing.procstat import run_peak_rss_anon

ROOT = Path(__file__).resolve().parents[1]

# A hostile input under 1 MB may cost this much on top of the interpreter with torch loaded.
MAX_RSS_ANON = 300 << 20
MAX_SECONDS = 60  # generous: the machine is shared; the point is "not hours", never a timing test


_DRIVER = """
import contextlib, io, json, sys
from llmconv.cli import main
cases = json.load(open(sys.argv[1]))
results = {}
for name, argv in cases.items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    results[name] = [code, err.getvalue()]
json.dump(results, open(sys.argv[2], "w"))
"""


def run_batch(cases: dict[str, list], tmp: Path) -> tuple[dict, int]:
    """Run every case's CLI argv one after another in one fresh interpreter (one torch import
    for all), sampling its peak RssAnon; the peak bounds every case's. A case that hangs makes
    the whole batch time out."""
    (tmp / "cases.json").write_text(json.dumps({k: [str(a) for a in v] for k, v in cases.items()}))
    try:
        _, peak, code, err = run_peak_rss_anon(
            [sys.executable, "-c", _DRIVER, str(tmp / "cases.json"), str(tmp / "results.json")], timeout=MAX_SECONDS * 3
        )
    except TimeoutError:
        pytest.fail("hostile inputs did not finish: something hangs")
    assert code == 0, err
    return json.loads((tmp / "results.json").read_text()), peak


def files_in(d: Path) -> set[str]:
    return {p.name for p in d.iterdir()}


# ---- attacks that used to cost gigabytes or hang: all run in one bounded subprocess --------------


class _BigBytearray:
    def __reduce__(self):
        return (bytearray, (2**31,))


def write_torch_zip(path: Path, pickle_bytes: bytes) -> None:
    """A zip laid out as torch.save writes one, around the given data.pkl."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pickle_bytes)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")


def _meta_state(d: Path) -> dict:
    return torch.load(d / "consolidated.00.pth", weights_only=True)


def _billion_layers(tmp):
    d = copy_of(HF, tmp / "layers")
    edit_json(d / "config.json", lambda c: c.update(num_hidden_layers=10**9))
    return d


def _token_id(where):
    def build(tmp):
        def change(tj):
            if where == "vocab":
                tj["model"]["vocab"]["Ġhostile"] = 10**8
            else:
                tj["added_tokens"].append({"id": 10**8 - 1, "content": "<x>", "special": True})

        return with_tokenizer_json(tmp / f"tok-{where}", change)

    return build


def _bytearray_pickle(tmp):
    d = copy_of(META, tmp / "bytearray")
    write_torch_zip(d / "consolidated.00.pth", pickle.dumps({"x": _BigBytearray()}, protocol=2))
    assert (d / "consolidated.00.pth").stat().st_size < 1024
    return d


def _stride0_pth(tmp):
    d = copy_of(META, tmp / "stride0")
    sd = _meta_state(d)
    row = sd["tok_embeddings.weight"][0]
    sd["tok_embeddings.weight"] = row.expand(1_000_000, row.shape[0])  # one row on disk, 1 GB as f32
    torch.save(sd, d / "consolidated.00.pth")
    return d


def _stride0_bin(tmp):
    from safetensors.torch import load_file

    d = copy_of(HF, tmp / "stride0-bin")
    sd = load_file(d / "model.safetensors")
    emb = sd["model.embed_tokens.weight"]
    sd["model.embed_tokens.weight"] = emb[0].expand(*emb.shape)
    (d / "model.safetensors").unlink()
    torch.save(sd, d / "pytorch_model.bin")
    return d


def _fifo(name):
    def build(tmp):
        d = copy_of(META, tmp / f"fifo-{name}")
        if (d / name).exists():
            (d / name).unlink()
        os.mkfifo(d / name)
        return d

    return build


# case -> (builder, needles in the error line)
BOUNDED = {
    "billion-layers": (_billion_layers, ["num_hidden_layers is 1000000000", "2 layers"]),
    "token-id-vocab": (_token_id("vocab"), ["tokenizer.json", "token id"]),
    "token-id-added": (_token_id("added"), ["tokenizer.json", "token id"]),
    "bytearray-pickle": (_bytearray_pickle, ["consolidated.00.pth", "bytearray"]),
    "stride0-pth": (_stride0_pth, ["tok_embeddings.weight", "strides [0, 1]"]),
    "stride0-bin": (_stride0_bin, ["pytorch_model.bin", "model.embed_tokens.weight", "strides [0, 1]"]),
    "fifo-tokenizer": (_fifo("tokenizer.model"), ["tokenizer.model", "not a regular file"]),
    "fifo-shard": (_fifo("consolidated.01.pth"), ["consolidated.01.pth", "not a regular file"]),
    "fifo-params": (_fifo("params.json"), ["params.json", "not a regular file"]),
}


@pytest.fixture(scope="module")
def bounded(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bounded")
    cases = {
        name: ["convert", build(tmp), "--dry-run", "-o", tmp / "never.gguf"] for name, (build, _) in BOUNDED.items()
    }
    results, peak = run_batch(cases, tmp)
    assert not (tmp / "never.gguf").exists()
    return results, peak


@pytest.mark.parametrize("case", list(BOUNDED))
def test_hostile_input_is_one_line_exit_2(bounded, case):
    results, _ = bounded
    code, err = results[case]
    assert code == 2, err
    assert_one_line_error(err, *BOUNDED[case][1])


def test_hostile_inputs_stay_within_memory_bound(bounded):
    _, peak = bounded
    assert peak < MAX_RSS_ANON, f"peak RssAnon {peak / 2**20:.0f} MiB"


def test_gappy_vocabulary_is_refused(tmp_path, capsys):
    d = with_tokenizer_json(
        tmp_path, lambda tj: tj["added_tokens"].append({"id": 3_000_000, "content": "<x>", "special": True})
    )
    refused(["convert", d, "--dry-run"], capsys, "tokenizer.json", "mostly gaps")


def test_huge_added_tokens_decoder_id_is_refused(tmp_path, capsys):
    d = copy_of(HF, tmp_path / "hf")
    edit_json(
        d / "tokenizer_config.json",
        lambda c: c["added_tokens_decoder"].update({"1000000000": {"content": "<x>", "special": True}}),
    )
    refused(["convert", d, "--dry-run"], capsys, "tokenizer_config.json", "added_tokens_decoder.1000000000")


@pytest.mark.parametrize("opcode", [b"\x96", b"\x81", b"i"], ids=["BYTEARRAY8", "NEWOBJ", "INST"])
def test_pickle_opcodes_a_state_dict_never_uses_are_refused(tmp_path, capsys, opcode):
    d = copy_of(META, tmp_path / "m")
    write_torch_zip(d / "consolidated.00.pth", b"\x80\x02}" + opcode + b"\x00\x00\x00\x00.")
    refused(["convert", d, "--dry-run"], capsys, "consolidated.00.pth")


def test_tensors_sharing_storage_bytes_are_refused(tmp_path, capsys):
    d = copy_of(META, tmp_path / "m")
    sd = _meta_state(d)
    base = sd["layers.0.feed_forward.w1.weight"]
    sd["layers.0.feed_forward.w3.weight"] = base[1:]  # overlaps w1 (shape check comes later)
    torch.save(sd, d / "consolidated.00.pth")
    refused(["convert", d, "--dry-run"], capsys, "shares storage bytes")


def test_tied_weights_saved_once_by_torch_are_accepted(tmp_path, capsys):
    """torch.save writes tied tensors as one storage: an exact duplicate view is not an attack."""
    d = copy_of(META, tmp_path / "m")
    sd = _meta_state(d)
    sd["output.weight"] = sd["tok_embeddings.weight"]
    torch.save(sd, d / "consolidated.00.pth")
    code, _, err = run(["convert", d, "--dry-run"], capsys)
    assert code == 0, err


# ---- names that alias or exceed the layer count ----------------------------------------------------


def test_hf_names_that_alias_one_gguf_tensor_are_refused(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    d = copy_of(HF, tmp_path / "hf")
    sd = load_file(d / "model.safetensors")
    sd["model.layers.00.mlp.up_proj.weight"] = torch.zeros_like(sd["model.layers.0.mlp.up_proj.weight"])
    save_file(sd, d / "model.safetensors")
    refused(["convert", d, "--dry-run"], capsys, "model.layers.0", "blk.0.ffn_up.weight")


def test_meta_alias_and_stray_layer_are_refused(tmp_path, capsys):
    d = copy_of(META, tmp_path / "m")
    sd = _meta_state(d)
    sd["layers.00.feed_forward.w3.weight"] = sd["layers.0.feed_forward.w3.weight"].clone()
    torch.save(sd, d / "consolidated.00.pth")
    refused(["convert", d, "--dry-run"], capsys, "map to blk.0.ffn_up.weight")
    del sd["layers.00.feed_forward.w3.weight"]
    sd["layers.5.feed_forward.w3.weight"] = sd["layers.0.feed_forward.w3.weight"].clone()
    torch.save(sd, d / "consolidated.00.pth")
    refused(["convert", d, "--dry-run"], capsys, "layers.5.feed_forward.w3.weight", "layer 5", "2 layers")
