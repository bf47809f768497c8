"""Command-line conventions a llama.cpp user expects (issue 19), each checked in a subprocess."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmconv", *args], capture_output=True, text=True, timeout=120)


def test_python_dash_m_llmconv_runs_the_cli():
    res = run("--help")
    assert res.returncode == 0, res.stderr
    for cmd in ("convert", "quantize", "verify", "inspect"):
        assert cmd in res.stdout


def test_version_names_the_libraries():
    from importlib.metadata import version

    import llmconv

    res = run("--version")
    assert res.returncode == 0, res.stderr
    line = res.stdout.strip()
    assert line.startswith(f"llmconv {llmconv.__version__} ")
    for lib in ("numpy", "torch", "gguf"):
        assert f"{lib} {version(lib)}" in line


def test_license_matches_pyproject():
    assert 'license = { text = "MIT" }' in (ROOT / "pyproject.toml").read_text()
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")


def _plan_for(n_layers: int, dim: int, ffn: int, outtype: str):
    import numpy as np

    from llmconv.convert import mixes
    from llmconv.convert.plan import SourceTensor, TypePolicy, make_plan

    def t(name, shape):
        return SourceTensor(name, shape, lambda: np.zeros(shape, np.float32), [])

    tensors = [t("token_embd.weight", (1000, dim)), t("output_norm.weight", (dim,)), t("output.weight", (1000, dim))]
    for i in range(n_layers):
        tensors += [
            t(f"blk.{i}.attn_q.weight", (dim, dim)),
            t(f"blk.{i}.attn_k.weight", (dim, dim)),
            t(f"blk.{i}.attn_v.weight", (dim, dim)),
            t(f"blk.{i}.attn_output.weight", (dim, dim)),
            t(f"blk.{i}.ffn_gate.weight", (ffn, dim)),
            t(f"blk.{i}.ffn_up.weight", (ffn, dim)),
            t(f"blk.{i}.ffn_down.weight", (dim, ffn)),
            t(f"blk.{i}.attn_norm.weight", (dim,)),
        ]
    return make_plan(tensors, TypePolicy(outtype, model=mixes.ModelShape(n_layers, 9, 3)))


def test_notes_are_aggregated_not_one_per_tensor():
    # SmolLM2-135M's shape: rows of 576 do not split into 256-blocks, so most tensors fall back
    plan = _plan_for(30, 576, 1536, "q4_k_m")
    fallbacks = [t for t in plan.tensors if t.why.name == "FALLBACK"]
    assert len(fallbacks) >= 150
    assert len(plan.notes) <= 6, plan.notes
    joined = "\n".join(plan.notes)
    assert "attn_q" in joined and "ffn_up" in joined and "all 30 layers" in joined
    assert sum(int(n.split()[0]) if n.split()[0].isdigit() else 1 for n in plan.notes) == len(
        [t for t in plan.tensors if t.why.name in ("FALLBACK", "OUTPUT", "OVERRIDE")]
    )


def test_quiet_means_no_notes(tmp_path):
    ckpt = ROOT / "fixtures" / "tiny-llama"
    res = run("convert", str(ckpt), "--outtype", "q4_0", "-o", str(tmp_path / "a.gguf"))
    assert res.returncode == 0, res.stderr
    assert "note:" in res.stderr  # output.weight -> q6_K is a note
    res = run("convert", str(ckpt), "--outtype", "q4_0", "-o", str(tmp_path / "b.gguf"), "-q")
    assert res.returncode == 0, res.stderr
    assert "note:" not in res.stderr and res.stderr.strip() == ""


def test_progress_bar_writes_no_frames_into_a_log(tmp_path):
    res = run("convert", str(ROOT / "fixtures" / "tiny-llama"), "--outtype", "f16", "-o", str(tmp_path / "a.gguf"))
    assert res.returncode == 0, res.stderr
    assert "\r" not in res.stderr and "it/s" not in res.stderr and "B/s" not in res.stderr


def test_usual_mistakes_get_a_line_that_says_what_to_do(tmp_path):
    gguf_file = tmp_path / "m.gguf"
    res = run("convert", str(ROOT / "fixtures" / "tiny-llama"), "--outtype", "f16", "-o", str(gguf_file), "-q")
    assert res.returncode == 0, res.stderr
    cases = [
        (tmp_path / "nowhere", "no such file or directory"),
        (gguf_file, "llmconv quantize"),
        (ROOT / "fixtures" / "tiny-llama" / "params.json", "pass the folder"),
    ]
    for path, needle in cases:
        res = run("convert", str(path), "-o", str(tmp_path / "x.gguf"))
        assert res.returncode == 2, res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
        assert needle in lines[0] and str(path) in lines[0], lines[0]


def test_quantize_refuses_to_overwrite_its_input_and_takes_outtype(tmp_path):
    f16 = tmp_path / "m-f16.gguf"
    res = run("convert", str(ROOT / "fixtures" / "tiny-llama"), "--outtype", "f16", "-o", str(f16), "-q")
    assert res.returncode == 0, res.stderr
    before = f16.read_bytes()
    for other in (f16, tmp_path / "." / "m-f16.gguf"):
        res = run("quantize", str(f16), str(other), "--type", "q4_0", "-f", "-q")
        assert res.returncode == 2 and "the output is the input file" in res.stderr, res.stderr
    assert f16.read_bytes() == before
    res = run("quantize", str(f16), str(tmp_path / "q.gguf"), "--outtype", "q8_0", "-q")
    assert res.returncode == 0, res.stderr


def test_a_type_typo_gets_a_suggestion(tmp_path):
    res = run("convert", str(ROOT / "fixtures" / "tiny-llama"), "--outtype", "q4_km", "-o", str(tmp_path / "x.gguf"))
    assert res.returncode == 2, res.stderr
    assert "did you mean q4_K_M?" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert "q3_K_M, " in res.stderr and ", auto)" in res.stderr  # the known types list the mixes and auto


@pytest.mark.parametrize("extra", [[], ["--dry-run"]])
def test_json_to_stdout_is_only_json(tmp_path, extra):
    import json

    res = run(
        "convert",
        str(ROOT / "fixtures" / "tiny-llama"),
        "--outtype",
        "q4_0",
        "-o",
        str(tmp_path / "a.gguf"),
        "--json",
        "-",
        *extra,
    )
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)  # nothing but the JSON document on stdout
    assert report["dry_run"] == bool(extra)
    assert ("wrote" in res.stderr) != bool(extra)


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_works_before_or_after_the_subcommand(tmp_path, where):
    args = ["convert", str(tmp_path / "nowhere")]
    res = run(*(["--debug", *args] if where == "before" else [*args, "--debug"]))
    assert res.returncode == 2
    assert "Traceback" in res.stderr and "no such file or directory" in res.stderr


def test_json_without_a_file_goes_to_stdout(tmp_path):
    import json

    out = tmp_path / "a.gguf"
    res = run("convert", str(ROOT / "fixtures" / "tiny-llama"), "--outtype", "q8_0", "-o", str(out), "-q", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["dry_run"] is False
    res = run("inspect", str(out), "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["tensors"]
    # the next word is still a FILE when one is given
    res = run("inspect", str(out), "--json", str(tmp_path / "r.json"))
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "r.json").read_text())["tensors"]


def test_every_command_has_help_with_examples():
    top = run("--help").stdout
    commands = re.findall(r"^  ([a-z][a-z-]+)\s", top.split("Commands:")[1], re.M)
    assert {"convert", "quantize", "verify", "inspect"} <= set(commands)
    for cmd in commands:
        res = run(cmd, "--help")
        assert res.returncode == 0, res.stderr
        assert "Examples:" in res.stdout and f"llmconv {cmd} " in res.stdout, cmd
        assert "--json [FILE]" in res.stdout, cmd  # the README: every command has --json


def main_run(capsys, *args) -> tuple[int, str, str]:
    """The CLI in this process (main() is the entry point's function): exit code, stdout, stderr."""
    from llmconv.cli import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(code: int, err: str) -> str:
    assert code == 2 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmconv: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def f16_gguf(tmp_path_factory):
    from llmconv.cli import main

    path = tmp_path_factory.mktemp("in") / "model-F16.gguf"
    assert main(["convert", str(ROOT / "fixtures" / "tiny-llama"), "--outtype", "f16", "-o", str(path), "-q"]) == 0
    return path


def _file_type(path: Path) -> int:
    from llmconv.formats.gguf_reader import read_gguf

    return int(read_gguf(path).kvs["general.file_type"])


def test_quantize_takes_the_type_after_the_file_names(tmp_path, capsys, monkeypatch, f16_gguf):
    import json

    from gguf import LlamaFileType

    code, out, err = main_run(capsys, "quantize", f16_gguf, tmp_path / "a.gguf", "q8_0", "--json")
    assert code == 0 and "wrote" in err, err
    assert json.loads(out)["output"] == str(tmp_path / "a.gguf")  # --json alone: only JSON on stdout
    assert _file_type(tmp_path / "a.gguf") == LlamaFileType.MOSTLY_Q8_0
    # IN TYPE: no OUT. The file goes next to IN (not the cwd), named as convert names this model
    code, _, err = main_run(
        capsys,
        "convert",
        ROOT / "fixtures" / "tiny-llama",
        "--outtype",
        "q4_K_M",
        "--dry-run",
        "--json",
        tmp_path / "plan.json",
    )
    assert code == 0, err
    convert_name = Path(json.loads((tmp_path / "plan.json").read_text())["output"]).name
    assert convert_name != "model-Q4_K_M.gguf"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    code, _, err = main_run(capsys, "quantize", f16_gguf, "q4_K_M", "-q")
    written = f16_gguf.parent / convert_name
    assert code == 0 and written.is_file() and not list(cwd.iterdir()), err
    assert _file_type(written) == LlamaFileType.MOSTLY_Q4_K_M
    written.unlink()


@pytest.mark.parametrize(
    "args, needle",
    [
        (["OUT", "q4_0", "--type", "q8_0"], "two different output types: TYPE q4_0 and --type q8_0; give one"),
        (["--type", "q4_0", "--outtype", "q8_0"], "two different output types: --type q4_0 and --outtype q8_0"),
        (["OUT"], "no output type: add it after the file names"),
        (["OUT", "q4_0", "extra"], "too many arguments after INFILE"),
        (["OUT", "q4_km"], "TYPE: unknown type 'q4_km'; did you mean q4_K_M?"),
        (["q4_km"], "TYPE: unknown type 'q4_km'; did you mean q4_K_M?"),
        (["OUT", "--type", "q4_km"], "--type: unknown type 'q4_km'; did you mean q4_K_M?"),
        (["OUT", "--outtype", "q4_km"], "--outtype: unknown type 'q4_km'; did you mean q4_K_M?"),
    ],
)
def test_quantize_type_mistakes_get_one_line(tmp_path, capsys, f16_gguf, args, needle):
    out = tmp_path / "o.gguf"
    code, _, err = main_run(capsys, "quantize", f16_gguf, *[out if a == "OUT" else a for a in args])
    assert needle in one_error_line(code, err)
    assert "auto" not in err  # quantize has no 'auto' type to offer
    assert list(tmp_path.iterdir()) == []


def test_requantized_name_from_metadata_or_file_name():
    from gguf import GGUFValueType as T

    from llmconv.convert.gguf_source import GGUFSource
    from llmconv.convert.pipeline import requantized_name
    from llmconv.formats.gguf_writer import KV

    def src(path, **general):
        return GGUFSource(Path(path), "llama", [KV(f"general.{k}", v, T.STRING) for k, v in general.items()], [], {})

    assert (
        requantized_name(src("d/Llama-7B-F16.gguf", name="Llama 2", size_label="7B"), "q4_k_m")
        == "Llama-2-7B-Q4_K_M.gguf"
    )
    assert requantized_name(src("d/model-F16.gguf"), "q4_k_m") == "model-Q4_K_M.gguf"  # no general.name
    assert requantized_name(src("d/model.gguf"), "q8_0") == "model-Q8_0.gguf"
    # a hostile general.name cannot point the output elsewhere
    assert requantized_name(src("m.gguf", name="../../etc/x\x00y"), "q8_0") == "..-..-etc-x-y-Q8_0.gguf"


def test_requantizing_warns_about_quality(tmp_path, capsys, f16_gguf):
    q4 = tmp_path / "q4.gguf"
    code, _, err = main_run(capsys, "quantize", f16_gguf, q4, "q4_0", "-q")
    assert code == 0 and "warning" not in err, err  # a float input: no warning
    code, _, err = main_run(capsys, "quantize", q4, tmp_path / "q8.gguf", "q8_0", "-q")
    assert "--allow-requantize" in one_error_line(code, err) and not (tmp_path / "q8.gguf").exists()
    code, _, err = main_run(capsys, "quantize", q4, tmp_path / "q8.gguf", "q8_0", "-q", "--allow-requantize")
    assert code == 0 and (tmp_path / "q8.gguf").is_file(), err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "Traceback" not in err, err
    assert "already quantized (Q4_0, Q6_K)" in warnings[0] and "severely reduce quality" in warnings[0], warnings


def _split_safetensors(tensors: dict, folder: Path, stem: str, index: bool) -> list[str]:
    """Two -0000k-of-00002 files (+ the index) as Hugging Face and Mistral write them."""
    import json

    from safetensors.torch import save_file

    names = sorted(tensors)
    files = [f"{stem}-0000{k}-of-00002.safetensors" for k in (1, 2)]
    halves = [names[: len(names) // 2], names[len(names) // 2 :]]
    for fname, part in zip(files, halves):
        save_file({n: tensors[n].contiguous() for n in part}, folder / fname, metadata={"format": "pt"})
    if index:
        wmap = {n: f for f, part in zip(files, halves) for n in part}
        (folder / f"{stem}.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    return files


def _checkpoint_missing_a_shard(layout: str, tmp: Path) -> Path:
    """A copy of a bundled fixture in `layout`, then one weight file deleted; the path of the deleted file."""
    import shutil

    import torch
    from safetensors.torch import load_file

    fx = ROOT / "fixtures"
    ckpt = tmp / layout
    if layout.startswith("meta"):  # tiny-llama-2shard: LLaMA 2 style; llama3-tiny: LLaMA 3 style
        shutil.copytree(fx / ("tiny-llama-2shard" if layout == "meta-last" else "llama3-tiny"), ckpt)
        gone = ckpt / ("consolidated.01.pth" if layout == "meta-last" else "consolidated.00.pth")
    elif layout.startswith("hf"):
        shutil.copytree(fx / "hf-tiny-llama", ckpt, ignore=shutil.ignore_patterns("model.safetensors"))
        files = _split_safetensors(
            load_file(fx / "hf-tiny-llama" / "model.safetensors"), ckpt, "model", index=layout == "hf-index"
        )
        gone = ckpt / files[1]
    else:  # Mistral's own layout: params.json + consolidated-0000k-of-0000N
        ckpt.mkdir()
        for f in ("params.json", "tokenizer.model"):
            shutil.copy(fx / "tiny-llama" / f, ckpt / f)
        sd = torch.load(fx / "tiny-llama" / "consolidated.00.pth", weights_only=True)
        gone = ckpt / _split_safetensors(sd, ckpt, "consolidated", index=False)[0]
    gone.unlink()
    return gone


@pytest.mark.parametrize("layout", ["meta-last", "meta-first", "hf-index", "hf-no-index", "mistral"])
def test_a_missing_shard_is_named(tmp_path, capsys, layout):
    gone = _checkpoint_missing_a_shard(layout, tmp_path)
    code, _, err = main_run(capsys, "convert", gone.parent, "-o", tmp_path / "x.gguf")
    line = one_error_line(code, err)
    assert f"{gone}: " in line and "missing" in line, line
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize(
    "args, needle",
    [
        (
            ["<ckpt>", "--reference", "<gguf>"],
            "the arguments are swapped: the model file comes first, the checkpoint "
            "folder after --reference: llmconv verify <gguf> --reference <ckpt>",
        ),
        (
            ["<ckpt>/params.json", "-r", "<gguf>"],
            "the arguments are swapped: the model file comes first, the checkpoint "
            "folder after --reference: llmconv verify <gguf> --reference <ckpt>",
        ),
        (["<gguf>", "--reference", "<gguf>"], "is a model file, not the checkpoint folder"),
        (
            ["<ckpt>", "-r", "<ckpt>"],
            "is a folder: verify checks a GGUF file against the checkpoint it was converted "
            "from: llmconv verify MODEL.gguf --reference <ckpt>",
        ),
        (["<ckpt>"], "llmconv verify MODEL.gguf --reference <ckpt>"),
        (
            ["<gguf>"],
            "no --reference: verify compares the file with the checkpoint it was converted from: "
            "llmconv verify <gguf> --reference CKPT_DIR",
        ),
        (["<ckpt>", "<gguf>"], "the checkpoint goes after --reference: llmconv verify <gguf> --reference <ckpt>"),
        (["<gguf>", "<ckpt>"], "the checkpoint goes after --reference: llmconv verify <gguf> --reference <ckpt>"),
    ],
)
def test_verify_arguments_in_the_wrong_places(capsys, f16_gguf, args, needle):
    def fill(text):
        return text.replace("<ckpt>", str(ROOT / "fixtures" / "tiny-llama")).replace("<gguf>", str(f16_gguf))

    code, out, err = main_run(capsys, "verify", *map(fill, args), "--tokens", "8")
    assert fill(needle) in one_error_line(code, err) and out == "", err


class _Terminal:
    """A stand-in for stderr on a terminal: tqdm draws into it (isatty) and we read the frames."""

    def __init__(self):
        import io

        self.buf = io.StringIO()
        self.encoding = "utf-8"

    def isatty(self):
        return True

    def write(self, s):
        return self.buf.write(s)

    def flush(self):
        pass


@pytest.mark.parametrize("columns", [70, 100])
def test_a_long_file_name_leaves_the_progress_bar_room(columns):
    from llmconv.progress import MIN_BAR, byte_bar

    name = "Meta-Llama-3.1-70B-Instruct-abliterated-uncensored-v2.1-experimental-Q4_K_M.gguf"
    term = _Terminal()
    bar = byte_bar(7 << 30, name, progress=True, file=term, columns=columns)
    bar.update(3 << 30)
    bar.refresh()
    frame = term.buf.getvalue().split("\r")[-1]
    bar.close()
    label, _, rest = frame.partition(": ")
    cells = rest.split("|")[1]
    assert len(frame) <= columns and len(cells) >= MIN_BAR, frame
    assert "\u2026" in label and label.endswith("-Q4_K_M.gguf"), label  # the type label stays readable
    # a name that fits is left alone; a control character in it cannot reach the terminal
    term = _Terminal()
    with byte_bar(100, "a\x1b[2J.gguf", progress=True, file=term, columns=columns) as bar:
        bar.update(50)
    assert "a\\x1b[2J.gguf: " in term.buf.getvalue() and "\x1b" not in term.buf.getvalue()


def test_imatrix_writes_no_progress_frames_into_a_log(tmp_path, capsys):
    import json

    out = tmp_path / "im.gguf"
    code, stdout, err = main_run(
        capsys, "imatrix", ROOT / "fixtures" / "tiny-llama", "--ctx", "32", "--chunks", "2", "-o", out, "--json"
    )
    assert code == 0 and out.is_file(), err
    assert json.loads(stdout)["chunks"] == 2 and "wrote" in err  # --json alone: only JSON on stdout
    assert "\r" not in err and "layer/s" not in err and "it/s" not in err, err


@pytest.mark.parametrize(
    "args, needle",
    [
        # a directory where a file is expected (was "no such file" or a three-line usage error)
        (
            ["quantize", "<dir>", "q8_0"],
            "<dir>: is a directory, expected a GGUF file (a checkpoint folder: llmconv convert)",
        ),
        (["inspect", "<dir>"], "<dir>: is a directory; inspect reads a GGUF or ggml file"),
        (
            ["convert", "<ckpt>", "--metadata", "<dir>", "--dry-run"],
            "<dir>: --metadata: is a directory, expected a JSON file",
        ),
        (["verify", "<gguf>", "-r", "<ckpt>", "--text", "<dir>"], "<dir>: is a directory, expected a text file"),
        (["imatrix", "<ckpt>", "--text", "<dir>"], "<dir>: is a directory, expected a text file"),
        (
            ["convert", "<ckpt>", "-o", "<dir>"],
            "<dir>: output exists and is not a regular file (a directory): to write the "
            "default-named file into it, add a slash (<dir>/)",
        ),
        (["quantize", "<gguf>", "<dir>", "q8_0", "-f"], "add a slash (<dir>/)"),
        # a path that does not exist
        (["quantize", "<nowhere>", "q8_0"], "<nowhere>: no such file"),
        (["inspect", "<nowhere>"], "<nowhere>: no such file"),
        (["verify", "<nowhere>", "-r", "<ckpt>"], "<nowhere>: no such file"),
        (["verify", "<gguf>", "-r", "<nowhere>"], "<nowhere>: no such file or directory"),
        (["convert-lora", "<nowhere>", "--base", "<ckpt>"], "<nowhere>: no such file or directory"),
        (["imatrix", "<nowhere>"], "<nowhere>: no such file or directory"),
        (["imatrix", "<dir>"], "<dir>: neither params.json (Meta, Mistral) nor config.json (Hugging Face) found"),
    ],
)
def test_a_directory_or_a_missing_path_where_a_file_is_expected(tmp_path, capsys, f16_gguf, args, needle):
    folder = tmp_path / "d"
    folder.mkdir()
    subs = {
        "<dir>": str(folder),
        "<ckpt>": str(ROOT / "fixtures" / "tiny-llama"),
        "<gguf>": str(f16_gguf),
        "<nowhere>": str(tmp_path / "nowhere"),
    }

    def fill(text):
        for k, v in subs.items():
            text = text.replace(k, v)
        return text

    code, _, err = main_run(capsys, *map(fill, args))
    assert fill(needle) in one_error_line(code, err)
    assert list(folder.iterdir()) == []


def test_fallback_notes_are_aggregated_on_the_command_line(tmp_path, capsys):
    from synth import write_meta_checkpoint

    # SmolLM2's width: rows of 576 do not split into q4_K's 256-blocks, so most tensors fall back
    ckpt = write_meta_checkpoint(tmp_path / "w576", dim=576, n_layers=2, n_heads=9, n_kv_heads=3, ffn=768)
    code, out, err = main_run(capsys, "convert", ckpt, "--outtype", "q4_K_M", "-o", tmp_path / "a.gguf")
    assert code == 0 and out.startswith("wrote "), err
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert 1 <= len(notes) <= 3 and "Traceback" not in err, err
    assert any("in all 2 layers" in n and "attn_q" in n and "ffn_up" in n for n in notes), notes
    code, out, err = main_run(capsys, "convert", ckpt, "--outtype", "q4_K_M", "-o", tmp_path / "b.gguf", "-q")
    assert code == 0 and "note:" not in err and out.startswith("wrote "), err
