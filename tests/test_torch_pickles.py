"""The pickle allow-list (convert/guards.py) against what torch.save really writes.

llmconv scans a .pth/.bin's data.pkl before torch unpickles it and allows only what a state
dict of tensors needs. Real checkpoints must still load: a module's state_dict() (an
OrderedDict carrying `_metadata`), Parameters (`keep_vars=True`, and tagged with attributes as
Megatron does), bf16/f16/f32, pickle protocols 2 and 3, transposed views, tied weights saved
once, a big-endian file. Each is converted and must give the same GGUF as the plain file.
Everything else gets one line, exit 2, and the reason: a protocol torch's safe loader cannot
read, a dtype llmconv does not convert, a pickled module, a tensor subclass."""

from __future__ import annotations

import collections
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from llmconv.convert.torch_pickle import read_state_dict

from synth import meta_state_dict, write_meta_checkpoint
from hostile_util import refused, run


def state_dict_of_a_module(sd: dict) -> collections.OrderedDict:
    """What nn.Module.state_dict() returns: an OrderedDict with a `_metadata` attribute (pickled
    through BUILD), as in Meta's consolidated.*.pth files."""
    od = collections.OrderedDict(sd)
    od._metadata = collections.OrderedDict({"": {"version": 1}, "layers.0": {"version": 1}})
    return od


def parameters(sd: dict) -> dict:
    return {k: torch.nn.Parameter(v, requires_grad=False) for k, v in sd.items()}


def tagged_parameters(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        p = torch.nn.Parameter(v, requires_grad=False)
        p.tensor_model_parallel, p.partition_dim = True, 0  # Megatron tags its weights so
        out[k] = p
    return out


def transposed_views(sd: dict) -> dict:
    """2-D weights stored transposed and viewed back: a dense, non-contiguous view."""
    return {k: v.t().contiguous().t() if v.dim() == 2 else v for k, v in sd.items()}


def big_endian(path):
    """Rewrite a torch.save zip as a big-endian machine writes it: byteorder "big", storages
    byte-swapped."""
    sd = torch.load(path, weights_only=True)
    src = zipfile.ZipFile(path)
    data = {i.filename: src.read(i) for i in src.infolist()}
    src.close()
    prefix = next(n for n in data if n.endswith("/data.pkl"))[: -len("data.pkl")]
    storages = {}
    for t in sd.values():
        storages[t.untyped_storage().data_ptr()] = t
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, blob in data.items():
            if name == prefix + "byteorder":
                blob = b"big"
            elif name.startswith(prefix + "data/"):
                itemsize = next(iter(sd.values())).element_size()
                blob = bytes(b for i in range(0, len(blob), itemsize) for b in reversed(blob[i : i + itemsize]))
            z.writestr(name, blob)


same = dict


# variant -> (the values: bf16 as written, or cast), (how they are wrapped), torch.save's options
VARIANTS = {
    "module state_dict bf16": (same, state_dict_of_a_module, {}),
    "module state_dict f16": (lambda sd: {k: v.half() for k, v in sd.items()}, state_dict_of_a_module, {}),
    "module state_dict f32": (lambda sd: {k: v.float() for k, v in sd.items()}, state_dict_of_a_module, {}),
    "parameters (keep_vars)": (same, parameters, {}),
    "tagged parameters": (same, tagged_parameters, {}),
    "pickle protocol 3": (same, same, {"pickle_protocol": 3}),
    "transposed views": (same, transposed_views, {}),
}


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """A Meta checkpoint saved plainly (bf16)."""
    return write_meta_checkpoint(tmp_path_factory.mktemp("plain") / "m")


def resaved(plain_dir, dst, change, **save_kw):
    d = shutil.copytree(plain_dir, dst)
    sd = torch.load(d / "consolidated.00.pth", weights_only=True)
    torch.save(change(sd), d / "consolidated.00.pth", **save_kw)
    return d


def converted(d, capsys) -> bytes:
    out = d / "o.gguf"
    code, _, err = run(["convert", d, "-o", out, "--outtype", "f32", "-q"], capsys)
    assert code == 0, err
    return out.read_bytes()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_what_torch_save_writes_loads(plain, tmp_path, capsys, variant):
    """The variant converts to the same file as the same values saved as a plain dict."""
    values, form, save_kw = VARIANTS[variant]
    want = converted(resaved(plain, tmp_path / "a" / "m", values), capsys)
    assert converted(resaved(plain, tmp_path / "b" / "m", lambda sd: form(values(sd)), **save_kw), capsys) == want


def test_a_big_endian_file_loads(plain, tmp_path, capsys):
    want = converted(resaved(plain, tmp_path / "a" / "m", same), capsys)
    d = resaved(plain, tmp_path / "b" / "m", same)
    big_endian(d / "consolidated.00.pth")
    assert converted(d, capsys) == want


def test_tied_weights_saved_once_load(tmp_path, capsys):
    sd = meta_state_dict()
    sd["output.weight"] = sd["tok_embeddings.weight"]  # one storage, two names
    d = write_meta_checkpoint(tmp_path / "m", sd)
    code, _, err = run(["convert", d, "-o", tmp_path / "o.gguf", "-q"], capsys)
    assert code == 0, err


@pytest.mark.parametrize("protocol", [4, 5])
def test_a_protocol_torch_cannot_read_safely_is_one_line(plain, tmp_path, capsys, protocol):
    d = resaved(plain, tmp_path / "m", lambda sd: sd, pickle_protocol=protocol)
    refused(["convert", d, "--dry-run"], capsys, "consolidated.00.pth", "FRAME", "re-save")


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.uint16])
def test_a_dtype_without_a_typed_storage_is_one_line(plain, tmp_path, capsys, dtype):
    d = resaved(plain, tmp_path / "m", lambda sd: {k: v.to(dtype) for k, v in sd.items()})
    refused(["convert", d, "--dry-run"], capsys, "consolidated.00.pth", "bf16, f16 or f32")


def tensor_with_an_attribute(sd):
    t = next(iter(sd.values())).clone()
    t.note = "x"  # pickled through torch._tensor._rebuild_from_type_v2
    return {**sd, next(iter(sd)): t}


@pytest.mark.parametrize(
    "change, needle",
    [
        (lambda sd: torch.nn.Linear(2, 2), "torch.nn.modules.linear.Linear"),
        (tensor_with_an_attribute, "_rebuild_from_type_v2"),
    ],
    ids=["a whole module", "a tensor with a Python attribute"],
)
def test_anything_else_is_one_line(plain, tmp_path, capsys, change, needle):
    d = resaved(plain, tmp_path / "m", change)
    refused(["convert", d, "--dry-run"], capsys, "consolidated.00.pth", "refused", needle)


# Variants llmconv reads without torch (convert/torch_pickle.py); the others go through torch.
TORCH_FREE = {
    "module state_dict bf16",
    "module state_dict f16",
    "module state_dict f32",
    "parameters (keep_vars)",
    "tagged parameters",
    "pickle protocol 3",
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_plain_state_dicts_are_placed_without_torch(plain, tmp_path, variant):
    """torch_pickle's reader gives every tensor of a plain state dict at the bytes torch maps
    for it, with its dtype and shape; anything else (a non-contiguous view) is left to torch."""
    values, form, save_kw = VARIANTS[variant]
    d = resaved(plain, tmp_path / "m", lambda sd: form(values(sd)), **save_kw)
    raw = read_state_dict(d / "consolidated.00.pth")
    if variant not in TORCH_FREE:
        assert raw is None
        return
    sd = torch.load(d / "consolidated.00.pth", weights_only=True)
    assert raw is not None and list(raw) == list(sd)
    for name, t in sd.items():
        assert (
            raw[name].shape == tuple(t.shape)
            and raw[name].dtype == {torch.bfloat16: "bf16", torch.float16: "f16", torch.float32: "f32"}[t.dtype]
        )
        assert np.array_equal(raw[name].load(), t.float().numpy()), name


def test_a_big_endian_file_or_shared_storage_goes_through_torch(plain, tmp_path):
    d = resaved(plain, tmp_path / "b" / "m", same)
    big_endian(d / "consolidated.00.pth")
    assert read_state_dict(d / "consolidated.00.pth") is None
    sd = meta_state_dict()
    sd["output.weight"] = sd["tok_embeddings.weight"]
    tied = write_meta_checkpoint(tmp_path / "t" / "m", sd)
    assert read_state_dict(tied / "consolidated.00.pth") is None


NO_TORCH = """
import sys
from llmconv.cli import main
code = main(sys.argv[1:])
print("torch imported" if "torch" in sys.modules else "no torch")
sys.exit(code)
"""


def test_a_quantized_conversion_does_not_import_torch(plain, tmp_path):
    """Importing torch costs ~1.4 s of CPU, more than the rest of a 1B q4_0 run's start-up:
    a conversion from a plain bf16 .pth to a quantized type, to bf16 (its stored bytes are
    copied) or to f16 (transcoded from them), or from safetensors to a quantized type, must not do it; an f16 checkpoint to bf16 does,
    for torch's fast cast."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    half = resaved(plain, tmp_path / "half" / "m", lambda sd: {k: v.half() for k, v in sd.items()})
    for ckpt, outtype, want in (
        (plain, "q4_0", "no torch"),
        (plain, "bf16", "no torch"),
        (plain, "f16", "no torch"),
        (root / "fixtures" / "hf-tiny-llama", "q4_0", "no torch"),
        (half, "bf16", "torch imported"),
    ):
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                NO_TORCH,
                "convert",
                str(ckpt),
                "--outtype",
                outtype,
                "-o",
                str(tmp_path / f"{outtype}.gguf"),
                "-q",
                "-f",
                "-t",
                "2",
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip().splitlines()[-1] == want, (ckpt, outtype, proc.stdout)
