"""`llmconv verify` (issue 13): fidelity is gated and holds for every correct conversion of every
type and mix; quality is reported, gated only when asked; each planted defect fails with exit 1
and the verdict names its cause.

The defective files are made by rewriting a good conversion through gguf-py (GGUFReader ->
GGUFWriter), changing one thing: a metadata value, the vocabulary, the rows of a tensor, or one
block's bytes. Nothing is copied from a run: the expectations are the defect itself (its key,
tensor, token id, block) and, for the gates, figures read back from the same run's report.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader

from llmconv import quantize as q
import llmconv
from llmconv.cli import main
from llmconv.convert.mixes import ALL as MIXES, outtype_needs_imatrix
from llmconv.verify import calibrate, report as verify_report
from llmconv.verify.bounds import FIDELITY_BOUNDS

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "fixtures" / "tiny-llama"
PARAMS = json.loads((CKPT / "params.json").read_text())
TOKENS = "32"  # enough positions for attention and RoPE to matter, cheap enough for CI
from verify_util import failures, rewrite_gguf, run_verify_cli, run_verify_json, tensor_raw, verdict


def verify(capsys, path: Path, *extra: str) -> tuple[int, str, str]:
    return run_verify_cli(capsys, path, CKPT, "--tokens", TOKENS, *extra)


def verify_json(capsys, path: Path, tmp_path: Path, *extra: str) -> tuple[int, dict, str]:
    return run_verify_json(capsys, path, CKPT, tmp_path, "--tokens", TOKENS, *extra)


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


# ---- correct files pass the fidelity gate, whatever their quality ---------------------------------

ALL_TYPES = list(dict.fromkeys(list(q.TYPES) + list(MIXES)))


@pytest.fixture(scope="module")
def fixture_imatrix(converted, tmp_path_factory) -> Path:
    """A synthetic imatrix for the fixture's matrices, for the types that need one."""
    from llmconv.imatrix import write_imatrix_gguf
    from mix_util import synthetic_imatrix

    path = tmp_path_factory.mktemp("verify-imatrix") / "fixture.imatrix.gguf"
    write_imatrix_gguf(path, synthetic_imatrix(converted(CKPT, "f32")))
    return path


@pytest.mark.parametrize("outtype", ALL_TYPES)
def test_correct_conversion_passes(capsys, converted, tmp_path, outtype, fixture_imatrix):
    # a type llama-quantize refuses without an imatrix is converted, and verified, with one
    needs = outtype_needs_imatrix(outtype)
    im = ("--imatrix", str(fixture_imatrix)) if needs else ()
    path = converted(CKPT, outtype, imatrix=fixture_imatrix) if needs else converted(CKPT, outtype)
    code, rep, out = verify_json(capsys, path, tmp_path, *im)
    assert code == 0, out
    assert out.rstrip().endswith("PASS")
    assert rep["fidelity"]["passed"] and rep["quality"]["passed"] and rep["verdict"] == "PASS"
    assert rep["fidelity"]["tensors_differ"] == 0 and rep["fidelity"]["tensors_identical"] == len(rep["tensors"])
    assert all(t["bytes"] == "identical" for t in rep["tensors"])
    assert not any(d["failure"] for d in rep["metadata"]) and rep["tokens_match"]
    fid = rep["fidelity"]["metrics"]
    assert fid["max_rel_dlogit"] <= FIDELITY_BOUNDS.max_rel_dlogit and fid["kld_mean"] <= FIDELITY_BOUNDS.max_kld
    assert "position 0" not in out  # the position hint does not fire on a correct file
    assert rep["quality"]["metrics"]["kld_mean"] >= 0 and "quality (informational)" in out


# Two float32 evaluations of the same weights differ only in summation order: logits agree to
# ~1e-6 of their scale and KLD ~ dlogit^2 / 2 ~ 1e-10. For f32 files both engines sit at that
# noise, and a 10 % relative comparison would compare noise with noise, so KLDs within this
# floor count as equal. It is 100x below the smallest KLD any other type shows here.
KLD_NOISE_FLOOR = 1e-9


@pytest.mark.llamacpp
@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0", "q4_0", "q4_k_m", "q2_k"])
def test_candidate_agrees_with_llama_cpp(capsys, converted, tmp_path, outtype):
    import llama_cpp  # noqa: F401  (the engine; CI installs it)

    code, rep, out = verify_json(
        capsys, converted(CKPT, outtype), tmp_path, "--engine", "llama.cpp", "--threads", "1", "--tokens", "64"
    )
    assert code == 0, out
    assert "error" not in rep["engine"], rep["engine"]
    cand, eng = rep["quality"]["metrics"], rep["quality"]["engine"]
    assert set(eng) == set(cand)
    assert abs(cand["kld_mean"] - eng["kld_mean"]) <= max(0.10 * eng["kld_mean"], KLD_NOISE_FLOOR), (cand, eng)
    assert abs(cand["top1"] - eng["top1"]) <= 0.10 * eng["top1"], (cand, eng)
    assert rep["fidelity"]["engine"] is not None and "llama.cpp" in out


# ---- planted defects fail, and the verdict names the cause ------------------------------------------


def expect_failure(capsys, path: Path, *extra: str) -> tuple[str, str]:
    """(the verdict, the whole output) of a run that must fail."""
    code, out, err = verify(capsys, path, *extra)
    assert code == 1, out + err
    return verdict(out), out


def test_swapped_attn_q_between_layers(capsys, converted, tmp_path):
    good = converted(CKPT, "q8_0")
    q0, q1 = tensor_raw(good, "blk.0.attn_q.weight"), tensor_raw(good, "blk.1.attn_q.weight")
    bad = rewrite_gguf(
        good,
        tmp_path / "swap.gguf",
        tensors={"blk.0.attn_q.weight": lambda raw, r: q1, "blk.1.attn_q.weight": lambda raw, r: q0},
    )
    cause, out = expect_failure(capsys, bad)
    assert re.match(r"tensor blk\.[01]\.attn_q\.weight", cause) and "swapped" in cause, out
    for a, b in ((0, 1), (1, 0)):
        assert any(
            f.startswith(f"FAIL: tensor blk.{a}.attn_q.weight") and f"source's blk.{b}.attn_q.weight" in f
            for f in failures(out)
        ), out
    assert any("vs the expected pass" in f for f in failures(out)), out  # and the logits show it


@pytest.mark.parametrize(
    "direction, named",
    [
        ("meta_to_hf", "Hugging Face's Q/K permutation"),  # HF's own export permutation
        ("hf_to_gguf", "HF->GGUF Q/K permutation"),  # a GGUF converter treating Meta weights as HF ones
    ],
)
def test_hf_qk_permutation_applied(capsys, converted, tmp_path, direction, named):
    good = converted(CKPT, "q4_0")
    n_head, n_kv = PARAMS["n_heads"], PARAMS["n_kv_heads"]

    def permute(heads):
        def edit(raw, r):  # rows hold whole blocks, so quantized rows move as they are
            order = meta_rotate_half(raw.shape[0], heads)
            return raw[order] if direction == "meta_to_hf" else raw[np.argsort(order)]

        return edit

    edits = {}
    for i in range(PARAMS["n_layers"]):
        edits[f"blk.{i}.attn_q.weight"] = permute(n_head)
        edits[f"blk.{i}.attn_k.weight"] = permute(n_kv)
    bad = rewrite_gguf(good, tmp_path / "perm.gguf", tensors=edits)
    cause, out = expect_failure(capsys, bad)
    assert cause.startswith("tensor blk.") and named in cause, out
    for name in list(edits)[:4]:  # the causes of the first few are searched
        assert any(f.startswith(f"FAIL: tensor {name}") and named in f for f in failures(out)), out


@pytest.mark.parametrize(
    "key, value, outtype",
    [
        ("llama.rope.freq_base", PARAMS["rope_theta"] * 50, "f16"),
        ("llama.attention.layer_norm_rms_epsilon", PARAMS["norm_eps"] * 1e4, "f16"),
        ("llama.context_length", None, "q8_0"),  # halved
        ("tokenizer.ggml.bos_token_id", None, "q4_0"),  # set to the EOS id
        ("tokenizer.ggml.eos_token_id", None, "q4_0"),  # set to the BOS id
    ],
)
def test_wrong_metadata_value(capsys, converted, tmp_path, key, value, outtype):
    good = converted(CKPT, outtype)
    r = GGUFReader(good)
    field = lambda k: r.get_field(k).contents()  # noqa: E731
    value = {
        "llama.context_length": lambda: field(key) // 2,
        "tokenizer.ggml.bos_token_id": lambda: field("tokenizer.ggml.eos_token_id"),
        "tokenizer.ggml.eos_token_id": lambda: field("tokenizer.ggml.bos_token_id"),
    }.get(key, lambda: value)()
    assert value != field(key)
    bad = rewrite_gguf(good, tmp_path / "meta.gguf", kvs={key: value})
    cause, out = expect_failure(capsys, bad)
    assert cause.startswith(f"metadata {key} = ") and "the checkpoint has" in cause, out


def test_wrong_head_count_kv(capsys, converted, tmp_path):
    good = converted(CKPT, "q8_0")
    bad = rewrite_gguf(good, tmp_path / "gqa.gguf", kvs={"llama.attention.head_count_kv": PARAMS["n_heads"]})
    cause, out = expect_failure(capsys, bad)
    assert cause.startswith("metadata llama.attention.head_count_kv") and f"{PARAMS['n_heads']}" in cause, out
    # the tensors' shapes contradict it, so the file cannot be run as a model at all
    assert any("not a consistent LLaMA model" in f and "attn_k" in f for f in failures(out)), out


def test_vocabulary_with_two_tokens_swapped(capsys, converted, tmp_path):
    good = converted(CKPT, "f16")
    tokens = GGUFReader(good).get_field("tokenizer.ggml.tokens").contents()
    i, j = 300, 301  # two ordinary pieces (ids 0-2 are specials, 3-258 byte fallbacks)
    assert tokens[i] != tokens[j]
    swapped = list(tokens)
    swapped[i], swapped[j] = swapped[j], swapped[i]
    bad = rewrite_gguf(good, tmp_path / "vocab.gguf", kvs={"tokenizer.ggml.tokens": swapped})
    code, rep, out = verify_json(capsys, bad, tmp_path)
    assert code == 1, out
    assert "vocabulary: DIFFERS" in out and verdict(out).startswith(f"vocabulary differs at id {i}")
    assert rep["tokens_match"] is False and rep["first_token_diff"] == i


Q4_0_BLOCK = GGML_QUANT_SIZES[GGMLQuantizationType.Q4_0][1]  # an fp16 scale d, then 16 bytes of 4-bit values


@pytest.mark.parametrize("factor", [4, 64])  # 4: the tensor's RMSE stays in bounds; 64: the block is far off
def test_q4_0_block_with_corrupted_scale(capsys, converted, tmp_path, factor):
    good = converted(CKPT, "q4_0")
    name = "blk.1.ffn_down.weight"
    raw = tensor_raw(good, name)
    row, block = raw.shape[0] // 2, 3

    def corrupt(raw, r):
        at = slice(block * Q4_0_BLOCK, block * Q4_0_BLOCK + 2)
        raw[row, at] = (raw[row, at].view(np.float16) * np.float16(factor)).view(np.uint8)
        return raw

    bad = rewrite_gguf(good, tmp_path / "scale.gguf", tensors={name: corrupt})
    cause, out = expect_failure(capsys, bad)
    assert cause.startswith(f"tensor {name} (q4_0): 1 of ") and f"row {row} block {block}" in cause, out
    if factor == 64:
        assert "corrupted block scale" in cause, out


def test_single_flipped_bit(capsys, converted, tmp_path):
    good = converted(CKPT, "q4_0")
    name = "blk.0.ffn_up.weight"
    row, block = 5, 2

    def flip(raw, r):  # bit 3 of a 4-bit value: that weight moves by 8 quantization steps
        raw[row, block * Q4_0_BLOCK + 2 + 7] ^= 0x08
        return raw

    bad = rewrite_gguf(good, tmp_path / "bit.gguf", tensors={name: flip})
    code, rep, out = verify_json(capsys, bad, tmp_path)
    assert code == 1, out
    assert verdict(out).startswith(f"tensor {name} (q4_0): 1 of ") and f"row {row} block {block}" in verdict(out)
    t = next(t for t in rep["tensors"] if t["name"] == name)
    assert t["blocks_differ"] == 1 and t["blocks_damaged"] == 1 and t["bytes"] == f"1 of {t['blocks']} blocks differ"


def test_tensor_quantized_at_another_type_than_declared(capsys, converted, tmp_path):
    """A q8_0 tensor whose values went through q4_0 first (requantized from a q4_0 file)."""
    good, lossy = converted(CKPT, "q8_0"), converted(CKPT, "q4_0")
    name = "blk.1.ffn_gate.weight"
    via_q4 = q.quantize_tensor(q.dequantize_tensor(tensor_raw(lossy, name), "q4_0"), "q8_0")
    bad = rewrite_gguf(good, tmp_path / "requant.gguf", tensors={name: lambda raw, r: via_q4})
    cause, out = expect_failure(capsys, bad)
    assert cause.startswith(f"tensor {name} (q8_0)") and "quantized at q4_0 and then stored as q8_0" in cause, out


def test_f16_data_declared_bf16(capsys, converted, tmp_path):
    good = converted(CKPT, "f16")
    name = "blk.0.attn_v.weight"
    bad = rewrite_gguf(
        good,
        tmp_path / "dtype.gguf",
        types={name: GGMLQuantizationType.BF16},
        tensors={name: lambda raw, r: raw.view(np.uint8)},
    )
    cause, out = expect_failure(capsys, bad)
    assert cause.startswith(f"tensor {name} (bf16)") and "its bytes are f16 data" in cause, out


def test_another_models_reference_is_refused(capsys, converted):
    code, out, err = run_verify_cli(
        capsys, converted(CKPT, "q8_0"), ROOT / "fixtures" / "llama3-tiny", "--tokens", TOKENS
    )
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "this reference is not the model of this file" in err


def test_engine_without_llama_cpp_is_refused_before_the_passes(capsys, converted, monkeypatch):
    import llmconv.verify.reference as reference

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import now raises ImportError
    monkeypatch.setattr(reference, "reference_logits", lambda *a, **k: pytest.fail("a pass ran"))
    code, out, err = verify(capsys, converted(CKPT, "q8_0"), "--engine", "llama.cpp")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "llama-cpp-python" in err, err


# ---- split files, checksums ---------------------------------------------------------------------


def test_split_file_and_its_checksum_sidecar(capsys, tmp_path):
    out = tmp_path / "split.gguf"
    llmconv.convert(CKPT, out, outtype="q8_0", split_max_tensors=8, checksum=True)
    parts = sorted(tmp_path.glob("split-*-of-*.gguf"))
    assert len(parts) == 3 and (tmp_path / "split.gguf.sha256.json").is_file()
    code, rep, text = run_verify_json(capsys, parts[0], CKPT, tmp_path, "--tokens", TOKENS, "--checksums")
    assert code == 0, text
    assert len(rep["tensors"]) == 21 and rep["checksums"]["problems"] == []
    with open(parts[2], "r+b") as f:  # one byte of the last part's data
        f.seek(-100, 2)
        b = f.read(1)
        f.seek(-100, 2)
        f.write(bytes([b[0] ^ 0xFF]))
    code, rep, text = run_verify_json(capsys, parts[0], CKPT, tmp_path, "--tokens", TOKENS, "--checksums")
    assert code == 1 and any(f.startswith("checksum: ") for f in rep["failures"]), text
    code, out, err = verify(capsys, parts[1])
    assert code == 2 and "give the first part" in err


# ---- the JSON report, the quality gates, bad input --------------------------------------------------

JSON_TYPES = {
    "str": str,
    "int": int,
    "float": float,
    "bool": bool,
    "list": list,
    "dict": dict,
    "None": type(None),
    "list[str]": list,
}


def documented_schema() -> tuple[dict, dict, list[str]]:
    """From report.py's docstring: the top-level keys and types, each part's keys, and the logit keys."""
    doc, logit_doc = verify_report.__doc__.split("Report schema")[1].split("Logit keys")
    top, parts, part = {}, {}, None
    for line in doc.splitlines():
        m = re.match(r"^(    |        )(\w[\w, ]*?)\s{2,}([\w\[\]|]+)(\s|$)", line)
        if m and m.group(1) == "    ":
            top[m.group(2)] = m.group(3)
            part = m.group(2)
        elif m:
            parts.setdefault(part, {}).update({k.strip(): m.group(3) for k in m.group(2).split(",")})
    logit_keys = [
        k.strip()
        for line in logit_doc.splitlines()[1:]
        if line.strip()
        for k in re.split(r"\s{2,}", line.strip())[0].split(",")
    ]
    return top, parts, logit_keys


def check_type(value, doc_type: str, key: str) -> None:
    allowed = tuple(JSON_TYPES[t] for t in doc_type.split("|"))
    assert isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed), (key, value)


def test_json_report_follows_documented_schema(capsys, converted, tmp_path):
    top, parts, logit_keys = documented_schema()
    assert {"file", "fidelity", "quality", "passed", "failures", "tensors", "verdict"} <= set(top)
    assert set(parts) == {"fidelity", "quality"}
    assert {"kld_mean", "top1", "ppl_ratio", "max_rel_dlogit"} <= set(logit_keys)
    code, rep, _ = verify_json(capsys, converted(CKPT, "q4_0"), tmp_path)
    assert code == 0
    assert set(rep) == set(top)
    for key, doc_type in top.items():
        if key != "engine":
            check_type(rep[key], doc_type, key)
    for part, keys in parts.items():
        assert set(rep[part]) == set(keys), part
        for key, doc_type in keys.items():
            if rep[part][key] is not None:
                check_type(rep[part][key], doc_type, f"{part}.{key}")
    for m in (rep["fidelity"]["metrics"], rep["quality"]["metrics"]):
        assert set(m) == set(logit_keys) and all(isinstance(v, float) for v in m.values())
    assert rep["fidelity"]["engine"] is None and rep["quality"]["engine"] is None and rep["engine"] is None
    assert rep["quality"]["published"] == {
        "model": "LLaMA-3-8B",
        "file_type": "MOSTLY_Q4_0",
        "kld": 0.072,
        "top1": None,
    }
    assert rep["n_tokens"] == int(TOKENS) and rep["passed"] is True and rep["failures"] == []
    names = {t.name for t in GGUFReader(converted(CKPT, "q4_0")).tensors}
    assert {t["name"] for t in rep["tensors"]} == names
    rmse = [t["rel_rmse"] for t in rep["tensors"]]
    assert rmse == sorted(rmse, reverse=True)  # worst first


def test_json_to_stdout_is_pure_json(capsys, converted):
    code, out, err = verify(capsys, converted(CKPT, "q8_0"), "--json", "-")
    assert code == 0
    rep = json.loads(out)  # the table goes to stderr then
    assert rep["passed"] is True and "PASS" in err


def test_quality_gates_fail_a_faithful_file_only_when_asked(capsys, converted, tmp_path):
    path = converted(CKPT, "q2_k")
    code, rep, _ = verify_json(capsys, path, tmp_path)
    assert code == 0 and all(v is None for v in rep["quality"]["gates"].values())
    m = rep["quality"]["metrics"]
    assert m["kld_mean"] > 0 and m["top1"] < 1 and m["ppl_ratio"] > 0
    for gate, bound in (
        ("--max-kld", m["kld_mean"] * 0.5),
        ("--min-top1", min(1.0, m["top1"] + 0.01)),
        ("--max-ppl-ratio", m["ppl_ratio"] * 0.999),
    ):
        code, rep2, out = verify_json(capsys, path, tmp_path, gate, repr(bound))
        assert code == 1, out
        assert rep2["fidelity"]["passed"] is True and rep2["quality"]["passed"] is False
        assert rep2["failures"] and all(gate in f for f in rep2["failures"]), rep2["failures"]  # nothing else


def test_bad_input_exits_2(capsys, converted, tmp_path):
    code, out, err = verify(capsys, tmp_path / "missing.gguf")
    assert code == 2 and err.startswith("llmconv: error:") and len(err.strip().splitlines()) == 1
    capsys.readouterr()
    code = main(["verify", str(converted(CKPT, "q8_0")), "--reference", str(tmp_path)])  # not a checkpoint
    _, err = capsys.readouterr()
    assert code == 2 and err.startswith("llmconv: error:"), err
    code, out, err = verify(capsys, converted(CKPT, "q8_0"), "--tokens", "1")
    assert code == 2 and "tokens" in err


def test_text_option(capsys, converted, tmp_path):
    import sentencepiece as spm

    text = "The river turned green past the mill."
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    sp = spm.SentencePieceProcessor(model_file=str(CKPT / "tokenizer.model"))
    want = 1 + len(sp.encode(text))  # BOS + the text, shorter than --tokens
    code, rep, out = verify_json(capsys, converted(CKPT, "f16"), tmp_path, "--text", str(tmp_path / "t.txt"))
    assert code == 0, out
    assert rep["n_tokens"] == want and want < int(TOKENS)
    assert any(f"only {want} tokens" in n for n in rep["notes"])
    code, _, err = verify(capsys, converted(CKPT, "f16"), "--text", str(tmp_path / "missing.txt"))
    assert code == 2 and "missing.txt" in err


def test_documented_fidelity_bounds_are_the_bounds_in_code():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    b = FIDELITY_BOUNDS
    assert f"max rel Δlogit ≤ {b.max_rel_dlogit:g}" in readme and f"KLD ≤ {b.max_kld:g}" in readme


def test_calibrate_measures_the_fidelity_margin(capsys):
    assert calibrate.main(["--types", "q8_0,q4_k_m", "--tokens", "16"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] in (["q8_0"], ["q4_k_m"])}
    assert set(rows) == {"q8_0", "q4_k_m"}
    for cells in rows.values():
        assert float(cells[1]) <= FIDELITY_BOUNDS.max_rel_dlogit and cells[4] == "identical"
