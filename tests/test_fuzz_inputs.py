"""Structure-aware fuzzing of a checkpoint's JSON files: config.json, tokenizer_config.json
(HF fixture), params.json (Meta fixture) and tokenizer.json (LLaMA 3's real byte-level BPE file).

Each input is the real file with a few changes drawn by hypothesis: a value replaced by a
hostile one (huge, negative, NaN/inf, the wrong type, a lone surrogate, control characters,
deep nesting), a key deleted or added, a token id or merge made inconsistent, or the JSON text
truncated. The consumer (open_source, or the BPE loader for tokenizer.json) must either
accept the input or raise an LlmconvError whose text is one line naming the file, within
TIMEOUT_S and without the process growing by MAX_GROWTH. Anything else is a failure.

CI runs EXAMPLES[file] inputs per file; `python bench/fuzz_inputs.py --examples N` runs more and counts.
"""
from __future__ import annotations

import json
import resource
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import llmconv.convert.hf  # noqa: F401  (imported here, not inside the time limit: torch takes seconds)
from llmconv.convert.bpe import load_tokenizer_json
from llmconv.convert.sources import open_source
from llmconv.errors import LlmconvError
from fuzz_util import Hang, time_limit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HF = ROOT / "fixtures" / "hf-tiny-llama"
META = ROOT / "fixtures" / "tiny-llama"
BPE = ROOT / "fixtures" / "llama3-bpe"

# inputs per file in CI (~35 ms each, tokenizer.json ~100 ms); bench/fuzz_inputs.py runs thousands per file
EXAMPLES = {"config.json": 250, "tokenizer_config.json": 250, "params.json": 250, "tokenizer.json": 100}
TIMEOUT_S = 10.0
MAX_GROWTH = 300 << 20    # growth of the process's peak RSS over the whole run

# file -> (fixture dir it lives in, the keys the schema knows, which the mutator also adds)
TARGETS = {
    "config.json": HF, "tokenizer_config.json": HF, "params.json": META, "tokenizer.json": BPE,
}
KNOWN_KEYS = {
    "config.json": ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                    "intermediate_size", "vocab_size", "max_position_embeddings", "rms_norm_eps", "rope_theta",
                    "rope_scaling", "rope_parameters", "tie_word_embeddings", "head_dim", "sliding_window",
                    "architectures", "hidden_act", "auto_map", "attention_bias"],
    "tokenizer_config.json": ["bos_token", "eos_token", "unk_token", "pad_token", "add_bos_token", "add_eos_token",
                              "chat_template", "added_tokens_decoder"],
    "params.json": ["dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
                    "norm_eps", "rope_theta", "use_scaled_rope", "rope_scaling_factor", "head_dim"],
    "tokenizer.json": ["model", "added_tokens", "normalizer", "pre_tokenizer", "decoder", "post_processor"],
}

# ---- hostile values ---------------------------------------------------------------------------------

_ints = st.sampled_from([0, 1, -1, 2, 3, 7, 8, 64, 255, 256, 511, 512, 513, 2**16, 2**31 - 1, 2**31, 2**32,
                         2**32 - 1, 2**53 + 1, 2**63, 2**64, 10**9, 10**100, -(2**63)]) | st.integers()
_floats = st.sampled_from([0.0, -0.0, 1e-6, 1e-5, 0.5, 1.0, 1e4, 5e5, 1e6, 3.5e38, 1e39, 1e308, 5e-324,
                           float("nan"), float("inf"), float("-inf"), -1.0]) | st.floats()
_texts = st.sampled_from(["", "x", "8", "1e5", "silu", "llama3", "linear", "<s>", "</s>", "<unk>", "\ud800",
                          "a\udfffb", "\x00", "\n\x1b[2J", "\u202e", "Ġ", "ĠĠ", "{{ x }}", "a" * 10_000]) | st.text(max_size=20)
_leaf = st.none() | st.booleans() | _ints | _floats | _texts
_values = st.recursive(_leaf, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_texts, inner, max_size=4),
                       max_leaves=8)


_DEEP = "@@deep@@"        # a marker the serializer replaces by nesting that deep (as text: the
_hostile = _values | st.sampled_from([50, 500, 5000, 50_000]).map(lambda n: f"{_DEEP}{n}")   # fuzzer stays flat


def _to_text(doc) -> str:
    text = json.dumps(doc, ensure_ascii=True, allow_nan=True)   # a lone surrogate as \\udXXX, as JSON allows
    while _DEEP in text:
        at = text.index('"' + _DEEP)
        end = text.index('"', at + 1)
        n = int(text[at + 1 + len(_DEEP):end])
        text = text[:at] + "[" * n + "1" + "]" * n + text[end + 1:]
    return text


# ---- structure-aware mutation ------------------------------------------------------------------------

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


@st.composite
def mutated(draw, name: str, base: dict):
    doc = json.loads(json.dumps(base))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["token", "token", "token", "replace", "replace", "delete", "add-known", "truncate"]
                                  if name == "tokenizer.json" else ["replace", "replace", "delete", "add-known", "truncate"]))
        if op == "truncate":
            text = _to_text(doc)
            return text[:draw(st.integers(0, max(0, len(text) - 1)))]
        if op == "add-known":
            doc[draw(st.sampled_from(KNOWN_KEYS[name]))] = draw(_hostile)
            continue
        if op == "token" and name == "tokenizer.json":
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
    kind = draw(st.sampled_from(["dup-id", "huge-id", "merge", "added", "odd-text"]))
    if kind == "odd-text":     # a new token whose text no UTF-8 file can hold, or that controls a terminal
        ids = [i for i in vocab.values() if isinstance(i, int)]
        ids += [t.get("id") for t in tj.get("added_tokens") or [] if isinstance(t, dict) and isinstance(t.get("id"), int)]
        vocab[draw(st.sampled_from(["\ud800", "a\udfffb", "\x00", "\n\x1b[2J", "\u202e"]))] = max(ids, default=0) + 1
    elif kind == "dup-id":
        vocab[draw(_texts)] = vocab[token]
    elif kind == "huge-id":
        vocab[token] = draw(st.sampled_from([10**8, 2**31, 2**22, len(vocab) * 3, -5]))
    elif kind == "merge" and isinstance(model.get("merges"), list):
        model["merges"].append(draw(st.sampled_from([f"{token} zzz", f"{token} {token}", "a b c", ""])))
    elif isinstance(tj.get("added_tokens"), list):
        tj["added_tokens"].append({"id": draw(_ints), "content": draw(_texts), "special": draw(st.booleans())})


# ---- the check ----------------------------------------------------------------------------------------

def consume(name: str, d: Path) -> None:
    if name == "tokenizer.json":
        load_tokenizer_json(d / name)
    else:
        open_source(d)


def check_input(name: str, text: str, d: Path) -> str:
    """Write `text` as `name` in the checkpoint copy `d` and run its consumer: "accepted" or
    "error: <first words>"; anything else raises AssertionError (or the unexpected exception)."""
    (d / name).write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        with time_limit(TIMEOUT_S):
            consume(name, d)
    except Hang:
        raise AssertionError(f"{name}: no result within {TIMEOUT_S} s") from None
    except LlmconvError as e:
        line = str(e)
        assert "\n" not in line and "\r" not in line and "\x1b" not in line, line
        assert str(d) in line, line
        return "error: " + line.split(": ", 2)[-1][:40]
    return "accepted"


def checkpoint_copy(tmp: Path, name: str) -> Path:
    d = tmp / name.replace(".", "-")
    shutil.copytree(TARGETS[name], d)
    return d


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---- the tests -----------------------------------------------------------------------------------------

def _base(name: str) -> dict:
    return json.loads((TARGETS[name] / name).read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def rss_at_start():
    start = peak_rss()
    yield
    assert peak_rss() - start < MAX_GROWTH, f"peak RSS grew by {(peak_rss() - start) >> 20} MiB"


@pytest.mark.parametrize("name", list(TARGETS))
def test_unmutated_files_are_accepted(tmp_path, name):
    d = checkpoint_copy(tmp_path, name)
    assert check_input(name, (TARGETS[name] / name).read_text(encoding="utf-8"), d) == "accepted"


def _fuzz_test(name: str):
    base = _base(name)

    @settings(max_examples=EXAMPLES[name], derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(text=mutated(name, base))
    def run(tmp_path_factory, rss_at_start, text):
        d = _dirs.get(name) or _dirs.setdefault(name, checkpoint_copy(tmp_path_factory.mktemp("fz"), name))
        check_input(name, text, d)
    return run


_dirs: dict[str, Path] = {}
test_fuzz_config_json = _fuzz_test("config.json")
test_fuzz_tokenizer_config_json = _fuzz_test("tokenizer_config.json")
test_fuzz_params_json = _fuzz_test("params.json")
test_fuzz_tokenizer_json = _fuzz_test("tokenizer.json")
