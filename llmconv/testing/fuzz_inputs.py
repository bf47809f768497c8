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
import math
import resource
import shutil
import sys
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmconv.cli import main as cli_main
from llmconv.convert.pipeline import describe_plan, plan_conversion, plan_json
from llmconv.errors import LlmconvError
from llmconv.formats.gguf_writer import encode_kv

from . import FIXTURES
from .fuzz_util import Hang, time_limit

TIMEOUT_S = 10.0
MAX_GROWTH = 300 << 20     # growth of the process's peak RSS over the whole run

# target file -> the checkpoint it is fuzzed in (built by CHECKPOINTS) and the keys the schema
# knows, which the mutator also adds.
TARGETS = {"config.json": "hf-llama3", "params.json": "meta-llama3", "tokenizer.json": "hf-llama3",
           "tokenizer_config.json": "hf-sentencepiece"}
KNOWN_KEYS = {
    "config.json": ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                    "intermediate_size", "vocab_size", "max_position_embeddings", "rms_norm_eps", "rope_theta",
                    "rope_scaling", "rope_parameters", "tie_word_embeddings", "head_dim", "sliding_window",
                    "architectures", "hidden_act", "auto_map", "attention_bias", "bos_token_id", "eos_token_id",
                    "num_local_experts", "num_experts_per_tok", "torch_dtype", "model_type"],
    "tokenizer_config.json": ["bos_token", "eos_token", "unk_token", "pad_token", "add_bos_token", "add_eos_token",
                              "chat_template", "added_tokens_decoder", "model_max_length"],
    "params.json": ["dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
                    "norm_eps", "rope_theta", "use_scaled_rope", "rope_scaling_factor", "head_dim", "max_seq_len",
                    "moe"],
    "tokenizer.json": ["model", "added_tokens", "normalizer", "pre_tokenizer", "decoder", "post_processor"],
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
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    cfg = mk.hf_config(p, sd["layers.0.feed_forward.w1.weight"].shape[0], max_positions=131072,
                       rope_scaling=scaling, bos_token_id=1000, eos_token_id=1001)
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


# ---- hostile and plausible values ----------------------------------------------------------------

_ints = st.sampled_from([0, 1, -1, 2, 3, 7, 8, 64, 255, 256, 511, 512, 513, 2**16, 2**31 - 1, 2**31, 2**32,
                         2**32 - 1, 2**53 + 1, 2**63, 2**64, 10**9, 10**100, -(2**63)]) | st.integers()
_floats = st.sampled_from([0.0, -0.0, 1e-6, 1e-5, 0.5, 1.0, 1e4, 5e5, 1e6, 3.5e38, 1e39, 1e308, 5e-324,
                           float("nan"), float("inf"), float("-inf"), -1.0]) | st.floats()
_texts = st.sampled_from(["", "x", "8", "1e5", "silu", "llama3", "linear", "dynamic", "yarn", "<s>", "</s>", "<unk>",
                          "<|begin_of_text|>", "<|eot_id|>", "\ud800", "a\udfffb", "\x00", "\n\x1b[2J", "\u202e",
                          "Ġ", "ĠĠ", "{{ x }}", "{% for %}", "a" * 10_000]) | st.text(max_size=20)
_leaf = st.none() | st.booleans() | _ints | _floats | _texts
_values = st.recursive(_leaf, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_texts, inner, max_size=4),
                       max_leaves=8)

_DEEP = "@@deep@@"        # a marker the serializer replaces by nesting that deep (as text: the
_hostile = _values | st.sampled_from([50, 500, 5000, 50_000]).map(lambda n: f"{_DEEP}{n}")   # fuzzer stays flat


def _neighbours(v) -> list:
    """Replacements for a real value of its own type: near it, or at the edge of what its GGUF
    field holds (u32/i32, float32)."""
    if isinstance(v, bool):
        return [not v]
    if isinstance(v, int):
        return [v + 1, v - 1, v * 2, v // 2, v * 3 // 2, 0, 1, -1, 2**31, 2**32, 2**63]
    if isinstance(v, float):
        near = [v * 2, v / 2, v * 10, -v, 0.0, float(int(v) + 1)] if math.isfinite(v) else [1.0]
        return near + [3.5e38, 1e39, float("inf"), float("nan"), 5e-324]
    if isinstance(v, str) and not v.startswith(_DEEP):
        return [v + "x", v[:-1], v.upper(), "", "<|end_of_text|>", "</s>", "<s>"]
    return [None, 0, ""]


def _to_text(doc) -> str:
    text = json.dumps(doc, ensure_ascii=True, allow_nan=True)   # a lone surrogate as \\udXXX, as JSON allows
    while _DEEP in text:
        at = text.index('"' + _DEEP)
        end = text.index('"', at + 1)
        n = int(text[at + 1 + len(_DEEP):end])
        text = text[:at] + "[" * n + "1" + "]" * n + text[end + 1:]
    return text


# ---- structure-aware mutation ---------------------------------------------------------------------

def _containers(doc, path=(), out=None, limit=2000):
    """(path, container) for the document's dicts and lists (at most `limit`, for big files)."""
    out = [] if out is None else out
    if len(out) >= limit:
        return out
    if isinstance(doc, (dict, list)) and (not isinstance(doc, list) or doc):
        out.append((path, doc))
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for k, v in items:
        if isinstance(v, (dict, list)) and not (isinstance(v, dict) and len(v) > 5000):
            _containers(v, path + (k,), out, limit)
    return out


_OPS = ["replace", "tweak", "tweak", "delete", "add-known", "truncate"]
_TOKENIZER_OPS = ["token", "token", "token", "replace", "tweak", "delete", "add-known", "truncate"]


@st.composite
def mutated(draw, name: str, base: dict):
    doc = json.loads(json.dumps(base))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(_TOKENIZER_OPS if name == "tokenizer.json" else _OPS))
        if op == "truncate":
            text = _to_text(doc)
            return text[:draw(st.integers(0, max(0, len(text) - 1)))]
        if op == "add-known":
            doc[draw(st.sampled_from(KNOWN_KEYS[name]))] = draw(_hostile)
            continue
        if op == "token":
            _token_mutation(draw, doc)
            continue
        conts = _containers(doc)
        path, cont = draw(st.sampled_from(conts))
        keys = list(cont) if isinstance(cont, dict) else list(range(len(cont)))
        if not keys:
            continue
        k = draw(st.sampled_from(keys[:500]))
        if op == "delete":
            del cont[k]
        elif op == "tweak":
            cont[k] = draw(st.sampled_from(_neighbours(cont[k])))
        else:
            cont[k] = draw(_hostile)
    return _to_text(doc)


def _token_mutation(draw, tj: dict) -> None:
    """The inconsistencies a BPE vocabulary can have: duplicate or huge ids, merges naming
    unknown tokens, added tokens clashing with the vocabulary."""
    model = tj.get("model") if isinstance(tj.get("model"), dict) else None
    vocab = model.get("vocab") if model and isinstance(model.get("vocab"), dict) else None
    if not vocab:
        return
    token = draw(st.sampled_from(sorted(vocab)[:1000]))
    kind = draw(st.sampled_from(["dup-id", "huge-id", "merge", "added", "odd-text", "swap"]))
    if kind == "odd-text":     # a new token whose text no UTF-8 file can hold, or that controls a terminal
        ids = [i for i in vocab.values() if isinstance(i, int)]
        ids += [t.get("id") for t in tj.get("added_tokens") or [] if isinstance(t, dict) and isinstance(t.get("id"), int)]
        vocab[draw(st.sampled_from(["\ud800", "a\udfffb", "\x00", "\n\x1b[2J", "\u202e"]))] = max(ids, default=0) + 1
    elif kind == "dup-id":
        vocab[draw(_texts)] = vocab[token]
    elif kind == "huge-id":
        vocab[token] = draw(st.sampled_from([10**8, 2**31, 2**22, len(vocab) * 3, len(vocab), -5]))
    elif kind == "swap":       # two tokens trade ids: a consistent vocabulary, a different tokenizer
        other = draw(st.sampled_from(sorted(vocab)[:1000]))
        vocab[token], vocab[other] = vocab[other], vocab[token]
    elif kind == "merge" and isinstance(model.get("merges"), list):
        model["merges"].append(draw(st.sampled_from([f"{token} zzz", f"{token} {token}", "a b c", "", [token, token],
                                                     [token], 7])))
    elif isinstance(tj.get("added_tokens"), list):
        tj["added_tokens"].append({"id": draw(_ints), "content": draw(_texts), "special": draw(st.booleans())})


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

    @settings(max_examples=n, derandomize=seed is None, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(text=mutated(name, base))
    def run(text):
        if record is None:
            check(name, text, d)
            return
        try:
            outcome = check(name, text, d)
        except BaseException as e:          # noqa: BLE001 - the bench counts every other outcome as a finding
            outcome = e
        record(text, outcome)

    if seed is not None:
        from hypothesis import seed as hypothesis_seed
        run = hypothesis_seed(seed)(run)
    run()
