"""The checkpoint-JSON fuzzer that tests/test_fuzz_inputs.py runs in CI and
bench/fuzz_inputs.py at length: the target files and the checkpoints they are fuzzed in,
hostile and plausible values, structure-aware mutations of config.json, params.json,
tokenizer.json and tokenizer_config.json, and the check of one input (in process, and through
`llmconv convert --dry-run`). tests/test_fuzz_inputs.py says what each input must give.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import resource
import shutil
import sys
from pathlib import Path

from hypothesis import HealthCheck, given, settings

from llmconv.cli import main as cli_main
from llmconv.convert.pipeline import describe_plan, plan_conversion, plan_json
from llmconv.errors import LlmconvError
from llmconv.formats.gguf_writer import encode_kv

from . import FIXTURES
from .fuzz_util import Hang, time_limit
from .json_mutations import mutated

TIMEOUT_S = 10.0
MAX_GROWTH = 300 << 20  # growth of the process's peak RSS over the whole run

# target file -> the checkpoint it is fuzzed in (built by CHECKPOINTS)
TARGETS = {
    "config.json": "hf-llama3",
    "params.json": "meta-llama3",
    "tokenizer.json": "hf-llama3",
    "tokenizer_config.json": "hf-sentencepiece",
}


# ---- the checkpoints -----------------------------------------------------------------------------


def _hf_generator():
    spec = importlib.util.spec_from_file_location("make_hf_fixtures", FIXTURES / "make_hf_fixtures.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("make_hf_fixtures", mod)
    spec.loader.exec_module(mod)
    return mod


def _hf_llama3(dst: Path) -> Path:
    """LLaMA 3.1 as Hugging Face ships it: the llama3-tiny weights as safetensors, config.json
    with rope_scaling llama3, and the real byte-level BPE tokenizer.json + tokenizer_config.json."""
    from llmconv.convert.meta import open_meta_checkpoint

    mk = _hf_generator()
    ck = open_meta_checkpoint(FIXTURES / "llama3-tiny")
    sd = {n: ck.load(n).clone() for n in ck.names}
    p = ck.params
    dst.mkdir(parents=True)
    mk.write_weights(dst, mk.hf_state_dict(sd, p["n_heads"], p["n_kv_heads"]))
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    cfg = mk.hf_config(
        p,
        sd["layers.0.feed_forward.w1.weight"].shape[0],
        max_positions=131072,
        rope_scaling=scaling,
        bos_token_id=1000,
        eos_token_id=1001,
    )
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(FIXTURES / "llama3-bpe" / name, dst / name)
    return dst


CHECKPOINTS = {
    "hf-llama3": _hf_llama3,
    "meta-llama3": lambda dst: Path(shutil.copytree(FIXTURES / "llama3-tiny", dst)),
    "hf-sentencepiece": lambda dst: Path(shutil.copytree(FIXTURES / "hf-tiny-llama", dst)),
}


def checkpoint_copy(tmp: Path, target: str) -> Path:
    """A fresh copy of the checkpoint `target` is fuzzed in."""
    return CHECKPOINTS[TARGETS[target]](tmp / target.replace(".", "-"))


# ---- the check ---------------------------------------------------------------------------------------


def consume(d: Path) -> None:
    """What `convert --dry-run` does with the inputs, and the metadata the writer would encode."""
    conv = plan_conversion(d, outfile=d / "out.gguf")
    for kv in conv.kvs:
        encode_kv(kv)
    describe_plan(conv).encode("utf-8")
    json.dumps(plan_json(conv), ensure_ascii=False).encode("utf-8")


def check_input(name: str, text: str, d: Path) -> str:
    """Write `text` as `name` in the checkpoint copy `d` and run the consumer: "accepted" or
    "error: <first words>"; anything else raises AssertionError (or the unexpected exception)."""
    (d / name).write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        with time_limit(TIMEOUT_S):
            consume(d)
    except Hang:
        raise AssertionError(f"{name}: no result within {TIMEOUT_S} s") from None
    except LlmconvError as e:
        line = str(e)
        assert "\n" not in line and "\r" not in line and "\x1b" not in line, line
        assert str(d) in line, line
        return "error: " + line.split(": ", 2)[-1][:40]
    return "accepted"


def check_cli_input(name: str, text: str, d: Path) -> str:
    """The same input through the CLI: exit 0, or exit 2 with one `llmconv: error:` line."""
    (d / name).write_text(text, encoding="utf-8", errors="surrogatepass")
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = cli_main(["convert", str(d), "--dry-run", "-o", str(d / "out.gguf")])
    lines = err.getvalue().splitlines()
    if code == 0:
        return "accepted"
    assert code == 2 and len(lines) == 1 and lines[0].startswith("llmconv: error: "), (code, err.getvalue())
    assert not (d / "out.gguf").exists()
    return "error"


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def fuzz(name: str, d: Path, n: int, check=check_input, seed: int | None = None, record=None) -> None:
    """Run `n` mutations of `name` (its text in `d` when called) through `check`, in `d`.
    `record(text, outcome)` sees each; without it an unexpected outcome fails the run."""
    base = json.loads((d / name).read_text(encoding="utf-8"))

    @settings(
        max_examples=n, derandomize=seed is None, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(text=mutated(name, base))
    def run(text):
        if record is None:
            check(name, text, d)
            return
        try:
            outcome = check(name, text, d)
        except BaseException as e:  # noqa: BLE001 - the bench counts every other outcome as a finding
            outcome = e
        record(text, outcome)

    if seed is not None:
        from hypothesis import seed as hypothesis_seed

        run = hypothesis_seed(seed)(run)
    run()
