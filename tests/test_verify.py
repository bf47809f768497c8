"""Issue 4: `llmconv verify` passes correct conversions of every type, agrees with llama.cpp on
them, and fails (exit 1, pointing at the cause) on files with planted defects.

The defective files are made by rewriting a good conversion through gguf-py (GGUFReader ->
GGUFWriter), changing one thing: a metadata value, the vocabulary, the rows of a tensor, or one
block's bytes. Nothing is copied from a run: the expectations are the defect itself (its key,
tensor, token id) and, for the bounds, figures read back from the same run's report.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

from llmconv import quantize as q
from llmconv.cli import main
from llmconv.verify import calibrate
from llmconv.verify import run as verify_run

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "fixtures" / "tiny-llama"
PARAMS = json.loads((CKPT / "params.json").read_text())
TOKENS = "64"          # enough positions for attention and RoPE to matter, cheap enough for CI


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Converts the fixture once per type (llmconv's default per-tensor choices); {type: path}."""
    out = tmp_path_factory.mktemp("verify-conv")
    cache: dict[str, Path] = {}

    def get(outtype: str) -> Path:
        if outtype not in cache:
            p = out / f"tiny-{outtype}.gguf"
            assert main(["convert", str(CKPT), "--outtype", outtype, "-o", str(p), "-q"]) == 0
            cache[outtype] = p
        return cache[outtype]
    return get


def verify(capsys, path: Path, *extra: str) -> tuple[int, str, str]:
    """Runs `llmconv verify` in-process; (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = main(["verify", str(path), "--reference", str(CKPT), "--tokens", TOKENS, *extra])
    out, err = capsys.readouterr()
    return code, out, err


def verify_json(capsys, path: Path, tmp_path: Path, *extra: str) -> tuple[int, dict, str]:
    report = tmp_path / f"{path.stem}-report.json"
    code, out, _ = verify(capsys, path, "--json", str(report), *extra)
    return code, json.loads(report.read_text()), out


# ---- rewriting a GGUF file with one defect -------------------------------------------------------

def rewrite_gguf(src: Path, dst: Path, *, kvs: dict | None = None, tensors: dict | None = None) -> Path:
    """Copy `src` to `dst` through gguf-py. `kvs` replaces metadata values (same GGUF type);
    `tensors` maps a tensor name to a function (raw, reader) -> new raw, where raw is the tensor's
    data as the reader holds it (uint8 rows of blocks for quantized types)."""
    kvs, tensors = kvs or {}, tensors or {}
    r = GGUFReader(src)
    w = GGUFWriter(str(dst), r.get_field("general.architecture").contents())   # writes general.architecture
    for name, field in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        sub = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
        w.add_key_value(name, kvs.pop(name, field.contents()), field.types[0], sub_type=sub)
    assert not kvs, f"keys not in the file: {list(kvs)}"
    for t in r.tensors:
        data = np.array(t.data)                                  # a copy: the reader's view is read-only
        if t.name in tensors:
            data = np.ascontiguousarray(tensors.pop(t.name)(data, r))
        w.add_tensor(t.name, data, raw_dtype=GGMLQuantizationType(int(t.tensor_type)))
    assert not tensors, f"tensors not in the file: {list(tensors)}"
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def tensor_raw(path: Path, name: str) -> np.ndarray:
    return np.array(next(t for t in GGUFReader(path).tensors if t.name == name).data)


def meta_rotate_half(n_rows: int, n_head: int) -> np.ndarray:
    """The row order Hugging Face's convert gives Meta's Q/K weights (and llama.cpp's HF
    converter undoes): within each head, rows (0, 1, 2, 3, ...) of adjacent pairs become
    the evens then the odds. Written out per head here, independently of llmconv's helper."""
    hd = n_rows // n_head
    order = []
    for h in range(n_head):
        base = h * hd
        order += [base + 2 * i for i in range(hd // 2)] + [base + 2 * i + 1 for i in range(hd // 2)]
    return np.array(order)


# ---- correct files pass ---------------------------------------------------------------------------

ALL_TYPES = list(q.TYPES)


@pytest.mark.parametrize("outtype", ALL_TYPES)
def test_correct_conversion_passes(capsys, converted, outtype):
    code, out, err = verify(capsys, converted(outtype))
    assert code == 0, out + err
    assert out.rstrip().endswith("PASS")
    assert "vocabulary: matches" in out


# Two float32 evaluations of the same weights differ only in summation order: logits agree to
# ~1e-6 of their scale (|logit| <~ 20 here, so dlogit ~ 2e-5) and KLD ~ dlogit^2 / 2 ~ 1e-10.
# For f32 files both engines sit at that noise (KLD ~1e-12, differing by 2x between them), and a
# 10 % relative comparison would compare noise with noise, so KLDs within this floor count as
# equal. It is 100x below the smallest KLD any other type shows here (f16, ~1e-7, where the
# activations are rounded to f16), so for every lossy type the 10 % rule is what applies.
KLD_NOISE_FLOOR = 1e-9


@pytest.mark.llamacpp
@pytest.mark.parametrize("outtype", ALL_TYPES)
def test_candidate_agrees_with_llama_cpp(capsys, converted, tmp_path, outtype):
    import llama_cpp  # noqa: F401  (the engine; CI installs it)

    code, rep, out = verify_json(capsys, converted(outtype), tmp_path, "--engine", "llama.cpp", "--threads", "1")
    assert code == 0, out
    assert "error" not in rep["engine"], rep["engine"]
    assert set(rep["engine"]) == {"name", "version", "metrics", "vs_candidate"}
    cand, eng = rep["metrics"], rep["engine"]["metrics"]
    assert set(eng) == set(cand)
    assert abs(cand["kld_mean"] - eng["kld_mean"]) <= max(0.10 * eng["kld_mean"], KLD_NOISE_FLOOR), (cand, eng)
    assert abs(cand["top1"] - eng["top1"]) <= 0.10 * eng["top1"], (cand, eng)
    assert "llama.cpp" in out


# ---- planted defects fail, pointing at the cause ---------------------------------------------------

def expect_failure(capsys, path: Path, *extra: str) -> str:
    code, out, err = verify(capsys, path, *extra)
    assert code == 1, out + err
    assert "FAILED" in out
    return out


def failures(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("FAIL: ")]


def test_swapped_attn_q_between_layers(capsys, converted, tmp_path):
    good = converted("q8_0")
    q0, q1 = tensor_raw(good, "blk.0.attn_q.weight"), tensor_raw(good, "blk.1.attn_q.weight")
    bad = rewrite_gguf(good, tmp_path / "swap.gguf",
                       tensors={"blk.0.attn_q.weight": lambda raw, r: q1, "blk.1.attn_q.weight": lambda raw, r: q0})
    out = expect_failure(capsys, bad)
    fails = failures(out)
    for a, b in ((0, 1), (1, 0)):
        assert any(f.startswith(f"FAIL: tensor blk.{a}.attn_q.weight") and f"source's blk.{b}.attn_q.weight" in f
                   and "swapped" in f for f in fails), out
    assert any(f.startswith("FAIL: candidate:") for f in fails), out     # and the logits show it


@pytest.mark.parametrize("direction, named", [
    ("meta_to_hf", "Hugging Face's Q/K permutation"),      # HF's own export permutation
    ("hf_to_gguf", "HF->GGUF Q/K permutation"),            # a GGUF converter treating Meta weights as HF ones
])
def test_hf_qk_permutation_applied(capsys, converted, tmp_path, direction, named):
    good = converted("q4_0")
    n_head, n_kv = PARAMS["n_heads"], PARAMS["n_kv_heads"]

    def permute(heads):
        def edit(raw, r):          # rows hold whole blocks, so quantized rows move as they are
            order = meta_rotate_half(raw.shape[0], heads)
            return raw[order] if direction == "meta_to_hf" else raw[np.argsort(order)]
        return edit
    edits = {}
    for i in range(PARAMS["n_layers"]):
        edits[f"blk.{i}.attn_q.weight"] = permute(n_head)
        edits[f"blk.{i}.attn_k.weight"] = permute(n_kv)
    bad = rewrite_gguf(good, tmp_path / "perm.gguf", tensors=edits)
    out = expect_failure(capsys, bad)
    fails = failures(out)
    for name in edits:
        assert any(f.startswith(f"FAIL: tensor {name}") and named in f for f in fails), out
    # the forward pass sees it too, and places it: position 0 (no rotation) is still right
    assert any(f.startswith("FAIL: candidate:") and "RoPE" in f for f in fails), out


def test_wrong_rope_freq_base(capsys, converted, tmp_path):
    good = converted("f16")
    bad = rewrite_gguf(good, tmp_path / "rope.gguf", kvs={"llama.rope.freq_base": PARAMS["rope_theta"] * 50})
    out = expect_failure(capsys, bad)
    assert any("llama.rope.freq_base" in f for f in failures(out)), out
    assert any(f.startswith("FAIL: candidate:") and "rope.freq_base" in f for f in failures(out)), out


def test_wrong_rms_eps(capsys, converted, tmp_path):
    good = converted("f16")
    bad = rewrite_gguf(good, tmp_path / "eps.gguf",
                       kvs={"llama.attention.layer_norm_rms_epsilon": PARAMS["norm_eps"] * 1e4})
    out = expect_failure(capsys, bad)
    assert any("llama.attention.layer_norm_rms_epsilon" in f for f in failures(out)), out
    assert any(f.startswith("FAIL: candidate:") for f in failures(out)), out


def test_wrong_head_count_kv(capsys, converted, tmp_path):
    good = converted("q8_0")
    bad = rewrite_gguf(good, tmp_path / "gqa.gguf", kvs={"llama.attention.head_count_kv": PARAMS["n_heads"]})
    out = expect_failure(capsys, bad)
    assert any("llama.attention.head_count_kv" in f and f"{PARAMS['n_heads']}" in f for f in failures(out)), out
    # the tensors' shapes contradict it, so the file cannot be run as a model at all
    assert any("not a consistent LLaMA model" in f and "attn_k" in f for f in failures(out)), out


def test_vocabulary_with_two_tokens_swapped(capsys, converted, tmp_path):
    good = converted("f16")
    tokens = GGUFReader(good).get_field("tokenizer.ggml.tokens").contents()
    i, j = 300, 301          # two ordinary pieces (ids 0-2 are specials, 3-258 byte fallbacks)
    assert tokens[i] != tokens[j]
    swapped = list(tokens)
    swapped[i], swapped[j] = swapped[j], swapped[i]
    bad = rewrite_gguf(good, tmp_path / "vocab.gguf", kvs={"tokenizer.ggml.tokens": swapped})
    code, rep, out = verify_json(capsys, bad, tmp_path)
    assert code == 1, out
    assert "vocabulary: DIFFERS" in out
    assert any("vocabulary" in f and f"id {i}" in f for f in failures(out)), out
    assert rep["tokens_match"] is False and rep["first_token_diff"] == i


@pytest.mark.parametrize("factor", [4, 64])   # 4: the tensor's RMSE stays in bounds, its max error does not
def test_q4_0_block_with_corrupted_scale(capsys, converted, tmp_path, factor):
    good = converted("q4_0")
    name = "blk.1.ffn_down.weight"
    raw = tensor_raw(good, name)
    row, block = raw.shape[0] // 2, 3
    block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType.Q4_0][1]
    d_at = row, block * block_bytes     # a q4_0 block is an fp16 scale d, then 16 bytes of 4-bit values

    def corrupt(raw, r):
        d = raw[d_at[0], d_at[1]:d_at[1] + 2].view(np.float16)
        raw[d_at[0], d_at[1]:d_at[1] + 2] = (d * np.float16(factor)).view(np.uint8)
        return raw
    bad = rewrite_gguf(good, tmp_path / "scale.gguf", tensors={name: corrupt})
    assert not np.array_equal(tensor_raw(bad, name), raw)
    out = expect_failure(capsys, bad)
    assert any(name in f and "corrupted block scale" in f and f"row {row} block {block}" in f
               for f in failures(out)), out


# ---- the JSON report and the bounds ---------------------------------------------------------------

JSON_TYPES = {"str": str, "int": int, "float": float, "bool": bool, "list": list, "dict": dict,
              "None": type(None), "list[str]": list}


def documented_schema() -> tuple[dict, list[str]]:
    """The report keys and types from run.py's docstring ("Report schema"), and the metric keys
    listed under `metrics`."""
    doc = verify_run.__doc__.split("Report schema")[1]
    top, metric_keys = {}, []
    for line in doc.splitlines():
        m = re.match(r"^    (\w+)\s+([\w\[\]|]+)\s", line)
        if m:
            top[m.group(1)] = m.group(2)
        m = re.match(r"^        ([\w, ]+?)\s{2,}(float|int)\s", line)
        if m:
            metric_keys += [k.strip() for k in m.group(1).split(",")]
    return top, metric_keys


def test_json_report_follows_documented_schema(capsys, converted, tmp_path):
    top, metric_keys = documented_schema()
    assert {"file", "metrics", "passed", "failures", "tensors", "bounds"} <= set(top)   # the parse found the table
    assert {"kld_mean", "top1", "ppl_ratio", "max_rel_dlogit"} <= set(metric_keys)
    code, rep, _ = verify_json(capsys, converted("q4_0"), tmp_path)
    assert code == 0
    assert set(rep) == set(top)
    for key, doc_type in top.items():
        allowed = tuple(JSON_TYPES[t] for t in doc_type.split("|"))
        value = rep[key]
        if key == "engine":
            assert value is None                     # no --engine
            continue
        assert isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed), (key, value)
    assert set(rep["metrics"]) == set(metric_keys)
    assert all(isinstance(v, float) for v in rep["metrics"].values())
    assert set(rep["bounds"]) == {"type", "max_rel_dlogit", "max_kld", "min_top1"}
    assert rep["dominant_type"] == "q4_0" and rep["bounds"]["type"] == "q4_0"
    assert rep["n_tokens"] == int(TOKENS) and rep["passed"] is True and rep["failures"] == []
    names = {t.name for t in GGUFReader(converted("q4_0")).tensors}
    assert {t["name"] for t in rep["tensors"]} == names
    rmse = [t["rel_rmse"] for t in rep["tensors"]]
    assert rmse == sorted(rmse, reverse=True)        # worst first
    for t in rep["tensors"]:
        assert set(t) == {"name", "type", "rel_rmse", "rel_max_err", "bound_rel_rmse", "bound_rel_max_err", "note"}


def test_json_to_stdout_is_pure_json(capsys, converted):
    code, out, err = verify(capsys, converted("q8_0"), "--json", "-")
    assert code == 0
    rep = json.loads(out)                            # the table goes to stderr then
    assert rep["passed"] is True and "PASS" in err


def test_tighter_max_kld_fails_a_passing_file(capsys, converted, tmp_path):
    path = converted("q4_0")
    code, rep, _ = verify_json(capsys, path, tmp_path)
    assert code == 0
    kld = rep["metrics"]["kld_mean"]
    assert kld > 0
    code, rep2, out = verify_json(capsys, path, tmp_path, "--max-kld", repr(kld / 2))
    assert code == 1
    assert rep2["bounds"]["max_kld"] == kld / 2
    assert rep2["failures"] and all("KL divergence" in f for f in rep2["failures"])   # nothing else changed
    assert "mean KL divergence" in out


def test_bad_input_exits_2(capsys, converted, tmp_path):
    code, out, err = verify(capsys, tmp_path / "missing.gguf")
    assert code == 2 and err.startswith("llmconv: error:") and len(err.strip().splitlines()) == 1
    capsys.readouterr()
    code = main(["verify", str(converted("q8_0")), "--reference", str(tmp_path)])     # not a checkpoint
    _, err = capsys.readouterr()
    assert code == 2 and err.startswith("llmconv: error:"), err
    code, out, err = verify(capsys, converted("q8_0"), "--tokens", "1")
    assert code == 2 and "tokens" in err


def test_text_option(capsys, converted, tmp_path):
    import sentencepiece as spm

    text = "The river turned green past the mill, and the baker sang."
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    sp = spm.SentencePieceProcessor(model_file=str(CKPT / "tokenizer.model"))
    want = 1 + len(sp.encode(text))                      # BOS + the text, shorter than --tokens
    code, rep, out = verify_json(capsys, converted("f16"), tmp_path, "--text", str(tmp_path / "t.txt"))
    assert code == 0, out
    assert rep["n_tokens"] == want and want < int(TOKENS)
    assert any(f"only {want} tokens" in n for n in rep["notes"])
    code, _, err = verify(capsys, converted("f16"), "--text", str(tmp_path / "missing.txt"))
    assert code == 2 and "missing.txt" in err


def table_rows(section: str) -> dict[str, list[str]]:
    """Rows of a table in run.py's docstring, from its header line (prefix) to the first blank line."""
    lines = verify_run.__doc__.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(section))
    rows = {}
    for line in lines[start + 1:]:
        if not line.strip():
            break
        cells = line.replace("|", " ").split()
        rows[cells[0]] = cells[1:]
    return rows


def test_documented_bounds_are_the_bounds_in_code():
    logit = table_rows("type   measured:")
    assert set(logit) == set(verify_run.LOGIT_BOUNDS) == set(q.TYPES)
    for t, cells in logit.items():
        b = verify_run.LOGIT_BOUNDS[t]
        assert [float(c) for c in cells[3:6]] == [b.max_rel_dlogit, b.max_kld, b.min_top1], t
        assert float(cells[0]) <= b.max_rel_dlogit and float(cells[1]) <= b.max_kld and float(cells[2]) >= b.min_top1, t
    tensor = table_rows("tensor type")
    assert set(tensor) == set(verify_run.TENSOR_BOUNDS)
    for t, cells in tensor.items():
        assert tuple(float(c) for c in cells[2:4]) == verify_run.TENSOR_BOUNDS[t], t
        assert float(cells[0]) <= verify_run.TENSOR_BOUNDS[t][0] and float(cells[1]) <= verify_run.TENSOR_BOUNDS[t][1], t


def test_calibrate_prints_the_documented_table_layout(capsys):
    assert calibrate.main(["--types", "q8_0", "--tokens", "32"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.split()[:1] == ["q8_0"])
    cells = row.replace("|", " ").split()
    b = verify_run.LOGIT_BOUNDS["q8_0"]
    assert [float(c) for c in cells[4:7]] == [b.max_rel_dlogit, b.max_kld, b.min_top1]
    tensor_part = out.split("tensor type")[1].splitlines()
    assert {"f32", "q8_0"} <= {line.split()[0] for line in tensor_part if line.strip()}   # norms and weights
