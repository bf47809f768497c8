"""Issue 21: wrongly typed JSON values, values that overflow their GGUF field, odd JSON
structure, ordinary OS errors, bad options and a last-resort handler: each one line, exit 2
(the last resort: exit 70 and a pointer to --debug), no traceback, nothing left behind."""

from __future__ import annotations

import json
import os

import pytest

from hostile_util import BPE, HF, META, copy_of, edit_json, refused, run, with_tokenizer_json

# file, key path, value -> the error line names the file and the key
CONFIG_VALUES = [
    ("config.json", "rms_norm_eps", "x"),
    ("config.json", "rope_scaling", []),
    ("config.json", "num_key_value_heads", "8"),
    ("config.json", "max_position_embeddings", 2**32),
    ("config.json", "max_position_embeddings", True),
    ("config.json", "rope_theta", float("nan")),
    ("config.json", "rope_theta", float("inf")),
    ("config.json", "rope_theta", -1.0),
    ("config.json", "rope_theta", 1e39),
    ("config.json", "rms_norm_eps", 3.5e38),
    ("config.json", "num_hidden_layers", 2.0),
    ("config.json", "tie_word_embeddings", "no"),
    ("config.json", "architectures", "LlamaForCausalLM"),
    ("tokenizer_config.json", "add_bos_token", 1),
    ("tokenizer_config.json", "bos_token", 5),
    ("tokenizer_config.json", "chat_template", {"x": 1}),
    ("tokenizer_config.json", "added_tokens_decoder", []),
    ("generation_config.json", "eos_token_id", "2"),
    ("generation_config.json", "eos_token_id", [2, -1]),
]


@pytest.mark.parametrize("fname,key,value", CONFIG_VALUES, ids=[f"{f}:{k}={v!r}" for f, k, v in CONFIG_VALUES])
def test_wrongly_typed_hf_values_name_file_and_key(tmp_path, capsys, fname, key, value):
    d = copy_of(HF, tmp_path / "hf")
    if not (d / fname).exists():
        (d / fname).write_text("{}")
    edit_json(d / fname, lambda c: c.update({key: value}))
    refused(["convert", d, "--dry-run"], capsys, fname, key)


PARAMS_VALUES = [
    ("n_kv_heads", "8"),
    ("ffn_dim_multiplier", float("inf")),
    ("norm_eps", 0),
    ("rope_theta", float("nan")),
    ("dim", True),
    ("use_scaled_rope", "yes"),
]


@pytest.mark.parametrize("key,value", PARAMS_VALUES, ids=[f"{k}={v!r}" for k, v in PARAMS_VALUES])
def test_wrongly_typed_params_values_name_the_key(tmp_path, capsys, key, value):
    d = copy_of(META, tmp_path / "m")
    edit_json(d / "params.json", lambda p: p.update({key: value}))
    refused(["convert", d, "--dry-run"], capsys, "params.json", key)


@pytest.mark.parametrize("doc", [[], {"<x>": "1"}, {"<x>": -1}], ids=["list", "string-id", "negative-id"])
def test_malformed_added_tokens_json(tmp_path, capsys, doc):
    d = copy_of(META, tmp_path / "m")
    (d / "added_tokens.json").write_text(json.dumps(doc))
    refused(["convert", d, "--dry-run"], capsys, "added_tokens.json")


def test_deeply_nested_json_is_one_line(tmp_path, capsys):
    d = copy_of(HF, tmp_path / "hf")
    (d / "config.json").write_text('{"x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    refused(["convert", d, "--dry-run"], capsys, "config.json", "nested too deeply")


@pytest.mark.parametrize("where", ["chat_template", "bos_token"])
def test_lone_surrogate_is_one_line(tmp_path, capsys, where):
    d = copy_of(HF, tmp_path / "hf")
    text = (d / "tokenizer_config.json").read_text()
    doc = json.loads(text)
    doc[where] = "PLACEHOLDER"
    (d / "tokenizer_config.json").write_text(json.dumps(doc).replace("PLACEHOLDER", "ab\\ud800cd"))
    refused(["convert", d, "--dry-run"], capsys, "tokenizer_config.json", "surrogate")


@pytest.mark.parametrize(
    "change,needle",
    [
        (lambda tj: tj["model"]["vocab"].update({"Ġzzz": tj["model"]["vocab"]["Ġthe"]}), "is also the id of"),
        (lambda tj: tj["model"]["merges"].append("Ġqqq Ġzzz"), "not in model.vocab"),
        (lambda tj: tj.update(pre_tokenizer=[]), "pre_tokenizer"),
        (lambda tj: tj.update(model=[]), "model"),
        (lambda tj: tj["added_tokens"].append({"id": "x", "content": "<y>"}), "added_tokens"),
        # found by bench/fuzz_inputs.py: the tokenizers library panics (a BaseException, with a Rust
        # backtrace on stderr) encoding with a template whose special token is not defined
        (lambda tj: tj["post_processor"].update(special_tokens={}), "not in post_processor.special_tokens"),
        (
            lambda tj: tj["post_processor"]["special_tokens"]["<|begin_of_text|>"].update(ids=[1000, 1001]),
            "2 ids but 1",
        ),
    ],
    ids=[
        "duplicate-id",
        "merge-unknown-token",
        "pre-tokenizer-list",
        "model-list",
        "added-id-string",
        "template-names-a-missing-special",
        "template-special-ids-and-tokens-differ",
    ],
)
def test_inconsistent_tokenizer_json_is_one_line(tmp_path, capsys, change, needle):
    d = with_tokenizer_json(tmp_path, change)
    refused(["convert", d, "--dry-run"], capsys, "tokenizer.json", needle)


def test_scaled_rope_errors_name_the_file():
    """Found by bench/fuzz_inputs.py: scaled RoPE's own checks raised without naming config.json."""
    from llmconv.convert.rope import llama3_rope_factors_from_config
    from llmconv.errors import LlmconvError

    with pytest.raises(LlmconvError, match="x/config.json: scaled RoPE needs an even head dimension"):
        llama3_rope_factors_from_config({"rope_type": "llama3"}, 33, 10000.0, file="x/config.json")


def test_real_tokenizer_json_passes_the_schema():
    from llmconv.errors import load_json

    assert load_json(BPE / "tokenizer.json")["model"]["type"] == "BPE"


# ---- control characters in names -----------------------------------------------------------------


def test_control_characters_in_a_tensor_name_are_escaped(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    d = copy_of(HF, tmp_path / "hf")
    sd = load_file(d / "model.safetensors")
    sd["model.evil\nllmconv: error: forged\x1b[2J.weight"] = sd["model.norm.weight"].clone()
    save_file(sd, d / "model.safetensors")
    err = refused(["convert", d, "--dry-run"], capsys, "\\n", "\\x1b")
    assert "\x1b" not in err


# ---- options and the output side ---------------------------------------------------------------------


@pytest.mark.parametrize("size", ["nan", "inf", "-inf", "1e30G"])
def test_split_max_size_must_be_finite(tmp_path, capsys, size):
    refused(["convert", META, "-o", tmp_path / "o.gguf", "--split-max-size", size], capsys, "--split-max-size")
    assert list(tmp_path.iterdir()) == []


def test_verify_max_kld_nan_is_refused(tmp_path, capsys):
    code, _, err = run(["verify", tmp_path / "x.gguf", "-r", META, "--max-kld", "nan"], capsys)
    assert code == 2 and "not a finite number" in err and "Traceback" not in err


def test_json_report_never_overwrites_without_force(tmp_path, capsys):
    out = tmp_path / "o.gguf"
    report = tmp_path / "r.json"
    report.write_text("precious")
    refused(["convert", META, "-o", out, "-q", "--json", report], capsys, "r.json", "--force")
    assert report.read_text() == "precious"
    assert not out.exists()  # refused before converting, not after writing the model
    assert run(["convert", META, "-o", out, "-q"], capsys)[0] == 0
    refused(["inspect", out, "--json", out], capsys, "o.gguf", "--force")  # the model just written
    assert out.stat().st_size > 10**6
    code, _, err = run(["inspect", out, "--json", report, "--force"], capsys)
    assert code == 0, err
    assert json.loads(report.read_text())["format"] == "gguf"


def test_json_report_to_a_missing_directory_is_one_line(tmp_path, capsys):
    refused(["inspect", META.parent / "tiny-llama" / "params.json", "--json", tmp_path / "no" / "r.json"], capsys)


def test_output_name_too_long_is_one_line(tmp_path, capsys):
    refused(["convert", META, "-o", tmp_path / ("x" * 300 + ".gguf"), "-q"], capsys)
    assert list(tmp_path.iterdir()) == []


def test_output_that_is_a_directory_is_one_line(tmp_path, capsys):
    (tmp_path / "o.gguf").mkdir()
    refused(["convert", META, "-o", tmp_path / "o.gguf", "-q", "--force"], capsys, "o.gguf")
    assert (tmp_path / "o.gguf").is_dir() and list(tmp_path.iterdir()) == [tmp_path / "o.gguf"]


def test_last_resort_handler_is_one_line_pointing_at_debug(tmp_path, capsys, monkeypatch):
    import llmconv.formats.inspect_cmd as ic

    def boom(*a, **k):
        raise ZeroDivisionError("planted\nbug")

    monkeypatch.setattr(ic, "summarize", boom)
    code, _, err = run(["inspect", tmp_path / "x.gguf"], capsys)
    lines = err.strip().splitlines()
    assert code == 70 and len(lines) == 1, err
    assert "ZeroDivisionError" in lines[0] and "--debug" in lines[0] and "Traceback" not in err


def test_huge_chat_template_is_refused_before_writing(tmp_path, capsys):
    d = copy_of(HF, tmp_path / "hf")
    (d / "chat_template.jinja").write_text("{{ x }}" * (10 << 20))  # 70 MiB > the reader's 64 MiB cap
    edit_json(d / "tokenizer_config.json", lambda c: c.pop("chat_template", None))
    refused(["convert", d, "-o", tmp_path / "o.gguf", "-q"], capsys, "chat_template", "at most")
    assert not (tmp_path / "o.gguf").exists()


@pytest.mark.parametrize(
    "exc",
    [OSError(28, "No space left on device", "out.gguf.sha256.json"), MemoryError(), RecursionError()],
    ids=["ENOSPC", "MemoryError", "RecursionError"],
)
def test_environment_errors_anywhere_are_one_line(tmp_path, capsys, monkeypatch, exc):
    import llmconv.formats.inspect_cmd as ic

    def fail(*a, **k):
        raise exc

    monkeypatch.setattr(ic, "summarize", fail)
    refused(["inspect", tmp_path / "x.gguf"], capsys)


def test_engine_without_llama_cpp_is_one_line(tmp_path, capsys, monkeypatch):
    import sys

    from hostile_util import HF as HF_DIR

    out = tmp_path / "o.gguf"
    assert run(["convert", HF_DIR, "--outtype", "f32", "-o", out, "-q"], capsys)[0] == 0
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp -> ImportError
    refused(["verify", out, "-r", HF_DIR, "--engine", "llama.cpp", "--tokens", "8"], capsys, "llama-cpp-python")


def test_fifo_as_checkpoint_dir_is_refused_not_waited_on(tmp_path):
    import subprocess
    import sys

    os.mkfifo(tmp_path / "ckpt")
    proc = subprocess.run(
        [sys.executable, "-m", "llmconv.cli", "convert", str(tmp_path / "ckpt")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "not a regular file" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
