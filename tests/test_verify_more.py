"""`llmconv verify` on Hugging Face checkpoints and Meta LLaMA 3 (tiktoken) checkpoints.

Good conversions pass; planted defects fail with exit 1. The HF reference runs HF's own layout
(rotate-half RoPE on q_proj/k_proj as stored), so it is checked against the Meta reference on the
same weights (fixtures/hf-tiny-llama holds fixtures/tiny-llama's weights in HF layout), and it
must catch a conversion that skips the Q/K un-permutation even when the tensor-by-tensor check
is blinded by the same slip. Expectations come from the defects themselves and from the source
tokenizers' own libraries, never from a previous run.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

import llmconv
from llmconv.cli import main
from llmconv.convert import hf
from llmconv.verify import report as verify_report
from llmconv.verify import run as verify_run
from llmconv.verify.reference import meta_reference_logits, reference_logits
from verify_util import failures, rewrite_gguf, run_verify_cli, run_verify_json, tensor_raw, verdict

ROOT = Path(__file__).resolve().parents[1]
HF_DIR = ROOT / "fixtures" / "hf-tiny-llama"  # tiny-llama's weights in HF layout, SentencePiece
META_DIR = ROOT / "fixtures" / "tiny-llama"
L3_DIR = ROOT / "fixtures" / "llama3-tiny"  # Meta LLaMA 3.1 style: tiktoken, use_scaled_rope, 2 shards
BPE_DIR = ROOT / "fixtures" / "llama3-bpe"  # the same vocabulary as tokenizer.json
TOKENS = "32"
SOURCES = {"hf": HF_DIR, "llama3": L3_DIR}
CHAT_TEMPLATE = (
    "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
)


def _load_generator():
    spec = importlib.util.spec_from_file_location("make_hf_fixtures", ROOT / "fixtures" / "make_hf_fixtures.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("make_hf_fixtures", mod)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def hf31(tmp_path_factory) -> Path:
    """llama3-tiny's weights as an HF LLaMA 3.1 checkpoint: 2 safetensors shards + index,
    rope_scaling llama3, byte-level BPE tokenizer.json, tied embeddings (no lm_head)."""
    from llmconv.convert.meta import open_meta_checkpoint

    mk = _load_generator()
    ck = open_meta_checkpoint(L3_DIR)
    sd = {n: ck.load(n).clone() for n in ck.names}
    p = ck.params
    d = tmp_path_factory.mktemp("hf31")
    mk.write_weights(d, mk.hf_state_dict(sd, p["n_heads"], p["n_kv_heads"], tied=True), shards=2)
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    cfg = mk.hf_config(
        p, sd["layers.0.feed_forward.w1.weight"].shape[0], tied=True, max_positions=131072, rope_scaling=scaling
    )
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "tokenizer.json").write_bytes((BPE_DIR / "tokenizer.json").read_bytes())
    tok_config = json.loads((BPE_DIR / "tokenizer_config.json").read_text())
    tok_config["chat_template"] = CHAT_TEMPLATE
    (d / "tokenizer_config.json").write_text(json.dumps(tok_config))
    return d


@pytest.fixture(scope="module")
def conv(converted, hf31):
    """`conv(source, outtype)`: the shared `converted` fixture, by source name."""
    dirs = {**SOURCES, "hf31": hf31}
    return lambda source, outtype: converted(dirs[source], outtype)


def verify(capsys, path: Path, ref: Path, *extra: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["verify", str(path), "--reference", str(ref), "--tokens", TOKENS, *extra])
    out, err = capsys.readouterr()
    return code, out, err


def verify_json(capsys, path: Path, ref: Path, tmp_path: Path, *extra: str) -> tuple[int, dict, str]:
    report = tmp_path / f"{path.stem}-report.json"
    code, out, _ = verify(capsys, path, ref, "--json", str(report), "--force", *extra)
    return code, strict_json(report.read_text()), out


def strict_json(text: str):
    """json.loads that refuses Infinity/NaN, as strict JSON parsers do."""

    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def default_text() -> str:
    return verify_run.DEFAULT_TEXT.read_text(encoding="utf-8")


# ---- the HF reference -------------------------------------------------------------------------------


def test_hf_reference_equals_meta_reference_on_the_same_weights():
    """Two independent forward passes, HF layout (rotate-half on permuted rows) and Meta layout
    (adjacent pairs), over the same weights give the same logits to float32 rounding."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(HF_DIR / "tokenizer.model"))
    ids = ([sp.bos_id()] + sp.encode(default_text()))[:64]
    a, b = reference_logits(HF_DIR, ids), meta_reference_logits(META_DIR, ids)
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()


def test_hf31_reference_equals_meta_llama3_reference(hf31, monkeypatch, tmp_path):
    """HF rope_scaling llama3 + tied embeddings vs Meta use_scaled_rope on the same weights. The
    Meta fixture has an output matrix and the HF twin ties it, so the Meta reference is run with
    the embedding as its output here."""
    import tiktoken
    from llmconv.convert import bpe, tiktoken_bpe
    import llmconv.verify.reference as meta_ref

    ranks = tiktoken_bpe.read_tiktoken_ranks(L3_DIR / "tokenizer.model")
    enc = tiktoken.Encoding(name="t", pat_str=bpe.LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens={})
    ids = ([len(ranks)] + enc.encode(default_text()))[:200]
    hf_logits = reference_logits(hf31, ids)
    orig = meta_ref.load_f32
    monkeypatch.setattr(
        meta_ref,
        "load_f32",
        lambda ckpt, name: orig(ckpt, "tok_embeddings.weight" if name == "output.weight" else name),
    )
    meta_logits = meta_reference_logits(L3_DIR, ids)
    scale = np.abs(meta_logits).max()
    err = np.abs(hf_logits - meta_logits).max() / scale
    assert err <= 1e-5, err
    # the scaling matters at these positions, so the agreement above covers it
    unscaled = tmp_path / "unscaled"
    unscaled.mkdir()
    for f in hf31.iterdir():
        if f.name != "config.json":
            (unscaled / f.name).symlink_to(f)
    cfg = json.loads((hf31 / "config.json").read_text())
    del cfg["rope_scaling"]
    (unscaled / "config.json").write_text(json.dumps(cfg))
    assert np.abs(reference_logits(unscaled, ids) - meta_logits).max() / scale > 100 * err + 1e-4


# ---- correct files pass -----------------------------------------------------------------------------


@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
@pytest.mark.parametrize("source", ["hf", "llama3", "hf31"])
def test_correct_conversion_passes(capsys, conv, hf31, tmp_path, source, outtype):
    ref = hf31 if source == "hf31" else SOURCES[source]
    code, rep, out = verify_json(capsys, conv(source, outtype), ref, tmp_path)
    assert code == 0, out
    assert out.rstrip().endswith("PASS") and "vocabulary: matches" in out
    assert rep["tokens_match"] is True and rep["n_tokens"] == int(TOKENS)
    assert rep["fidelity"]["tensors_differ"] == 0 and not any(d["failure"] for d in rep["metadata"])
    if source != "hf":  # llama3-tiny has random weights, and verify says what that means for quality
        assert any("untrained" in n for n in rep["notes"]), rep["notes"]


def test_tokens_come_from_the_source_tokenizers(conv, hf31):
    """verify's ids are the source libraries' own: tiktoken from the Meta file's ranks, and
    `tokenizers` on tokenizer.json with its post-processor's BOS; the same vocabulary gives
    the same ids both ways."""
    import tiktoken
    from tokenizers import Tokenizer
    from llmconv.convert import bpe, tiktoken_bpe

    text = default_text()
    ranks = tiktoken_bpe.read_tiktoken_ranks(L3_DIR / "tokenizer.model")
    enc = tiktoken.Encoding(name="t", pat_str=bpe.LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens={})
    want = ([len(ranks)] + enc.encode(text))[:100]
    assert verify_run.tokenize(verify_run.load_source_tokenizer(L3_DIR), text, 100) == want
    hf_ids = Tokenizer.from_file(str(hf31 / "tokenizer.json")).encode(text).ids[:100]
    assert verify_run.tokenize(verify_run.load_source_tokenizer(hf31), text, 100) == hf_ids == want


@pytest.mark.llamacpp
@pytest.mark.parametrize("source", ["hf", "llama3"])
def test_passes_with_llama_cpp_engine(capsys, conv, tmp_path, source):
    import llama_cpp  # noqa: F401

    code, rep, out = verify_json(
        capsys, conv(source, "q8_0"), SOURCES[source], tmp_path, "--engine", "llama.cpp", "--threads", "1"
    )
    assert code == 0, out
    assert "error" not in rep["engine"], rep["engine"]
    cand, eng = rep["quality"]["metrics"], rep["quality"]["engine"]
    assert abs(cand["kld_mean"] - eng["kld_mean"]) <= 0.10 * eng["kld_mean"], (cand, eng)
    assert abs(cand["top1"] - eng["top1"]) <= 0.10 * eng["top1"], (cand, eng)


# ---- planted defects fail ---------------------------------------------------------------------------


def _convert_without_unpermute(monkeypatch, out: Path) -> Path:
    monkeypatch.setattr(hf, "unpermute_rows", lambda w, n_heads: w)  # Q/K stay in rotate-half order
    # the streaming engine's row reader (the same slip when reading rows in place)
    monkeypatch.setattr(hf, "read_rows_unpermuted", lambda raw, n_heads, a, b, out: raw.read_rows(a, b, out))
    llmconv.convert(HF_DIR, out, outtype="f16")
    return out


def test_hf_qk_not_unpermuted_fails(capsys, monkeypatch, tmp_path):
    bad = _convert_without_unpermute(monkeypatch, tmp_path / "noperm.gguf")
    monkeypatch.undo()
    code, out, _ = verify(capsys, bad, HF_DIR)
    assert code == 1, out
    fails = failures(out)
    n_layers = json.loads((HF_DIR / "config.json").read_text())["num_hidden_layers"]
    for i in range(n_layers):
        for kind in ("attn_q", "attn_k"):
            assert any(f.startswith(f"FAIL: tensor blk.{i}.{kind}.weight") and "Q/K permutation" in f for f in fails), (
                out
            )
    assert any("vs the expected pass" in f for f in fails), out


def test_hf_reference_alone_catches_missing_unpermute(capsys, monkeypatch, tmp_path):
    """The converter's source tensors carry the same slip (the monkeypatch stays on during verify,
    so every tensor matches its 'source' in GGUF layout): the expected pass, which reads q_proj and
    k_proj in HF's own layout and orders their rows itself, still finds every one of them."""
    bad = _convert_without_unpermute(monkeypatch, tmp_path / "noperm.gguf")
    code, out, _ = verify(capsys, bad, HF_DIR)
    assert code == 1, out
    fails = failures(out)
    n_layers = json.loads((HF_DIR / "config.json").read_text())["num_hidden_layers"]
    for i in range(n_layers):
        for kind in ("attn_q", "attn_k"):
            assert any(f.startswith(f"FAIL: tensor blk.{i}.{kind}.weight") and "blocks differ" in f for f in fails), out
    assert any("vs the expected pass" in f for f in fails), out


def test_hf_attn_q_rewritten_in_rotate_half_order_fails(capsys, conv, tmp_path):
    good = conv("hf", "f16")
    n_head = json.loads((HF_DIR / "config.json").read_text())["num_attention_heads"]

    def to_rotate_half(raw, r):  # per head: even rows, then odd rows
        hd = raw.shape[0] // n_head
        order = np.concatenate([np.r_[h * hd : (h + 1) * hd : 2, h * hd + 1 : (h + 1) * hd : 2] for h in range(n_head)])
        return raw[order]

    bad = rewrite_gguf(good, tmp_path / "q-rot.gguf", tensors={"blk.0.attn_q.weight": to_rotate_half})
    code, out, _ = verify(capsys, bad, HF_DIR)
    assert code == 1, out
    assert verdict(out).startswith("tensor blk.0.attn_q.weight"), out
    assert any("vs the expected pass" in f for f in failures(out)), out


def _without_tensor(src: Path, dst: Path, drop: str) -> Path:
    r = GGUFReader(src)
    w = GGUFWriter(str(dst), r.get_field("general.architecture").contents())
    for name, field in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        sub = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
        w.add_key_value(name, field.contents(), field.types[0], sub_type=sub)
    for t in r.tensors:
        if t.name != drop:
            w.add_tensor(t.name, np.array(t.data), raw_dtype=GGMLQuantizationType(int(t.tensor_type)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_llama3_without_rope_freqs_fails(capsys, conv, tmp_path):
    bad = _without_tensor(conv("llama3", "f16"), tmp_path / "norf.gguf", "rope_freqs.weight")
    assert "rope_freqs.weight" not in {t.name for t in GGUFReader(bad).tensors}
    # over 256 positions the unscaled RoPE shows in the logits by itself (32 are too few for the
    # long wavelengths LLaMA 3.1 rescales to turn far enough)
    code, out, _ = verify(capsys, bad, L3_DIR, "--tokens", "256")
    assert code == 1, out
    assert verdict(out).startswith("tensor rope_freqs.weight") and "not in the file" in verdict(out), out
    assert any("vs the expected pass" in f for f in failures(out)), out


def test_llama3_altered_rope_freqs_fails(capsys, conv, tmp_path):
    good = conv("llama3", "q8_0")
    assert (tensor_raw(good, "rope_freqs.weight") > 1).any()  # LLaMA 3.1 scaling is in the file
    bad = rewrite_gguf(good, tmp_path / "rf1.gguf", tensors={"rope_freqs.weight": lambda raw, r: np.ones_like(raw)})
    code, out, _ = verify(capsys, bad, L3_DIR)
    assert code == 1, out
    assert verdict(out).startswith("tensor rope_freqs.weight"), out


def test_llama3_wrong_rope_freq_base_fails(capsys, conv, tmp_path):
    theta = json.loads((L3_DIR / "params.json").read_text())["rope_theta"]
    bad = rewrite_gguf(conv("llama3", "f16"), tmp_path / "base.gguf", kvs={"llama.rope.freq_base": theta / 50})
    code, out, _ = verify(capsys, bad, L3_DIR)
    assert code == 1, out
    assert verdict(out).startswith("metadata llama.rope.freq_base"), out
    assert any("vs the expected pass" in f for f in failures(out)), out


def test_gpt2_vocabulary_difference_is_reported(capsys, conv, tmp_path):
    good = conv("llama3", "f16")
    tokens = GGUFReader(good).get_field("tokenizer.ggml.tokens").contents()
    # a word with GPT-2's space character in front ("Ġthe" is the bytes b" the")
    i = next(
        k
        for k in range(300, len(tokens))
        if tokens[k][:1] == "Ġ" and tokens[k][1:].isascii() and tokens[k][1:].isalpha()
    )
    swapped = list(tokens)
    swapped[i], swapped[i + 1] = swapped[i + 1], swapped[i]
    bad = rewrite_gguf(good, tmp_path / "vocab.gguf", kvs={"tokenizer.ggml.tokens": swapped})
    code, rep, out = verify_json(capsys, bad, L3_DIR, tmp_path)
    assert code == 1 and rep["tokens_match"] is False and rep["first_token_diff"] == i, out
    msg = next(f for f in failures(out) if f"id {i}" in f)
    assert repr(tokens[i + 1].encode()) in msg and repr(tokens[i].encode()) in msg
    assert repr(b" " + tokens[i][1:].encode()) in msg  # the source token's bytes, space shown


def test_unknown_pre_tokenizer_fails(capsys, conv, hf31, tmp_path):
    good = conv("hf31", "q8_0")
    assert GGUFReader(good).get_field("tokenizer.ggml.pre").contents() == "llama-bpe"
    bad = rewrite_gguf(good, tmp_path / "pre.gguf", kvs={"tokenizer.ggml.pre": "foo"})
    code, out, _ = verify(capsys, bad, hf31)
    assert code == 1, out
    assert verdict(out).startswith("metadata tokenizer.ggml.pre = 'foo'"), out
    assert any("not a pre-tokenizer llama.cpp knows" in f for f in failures(out)), out


def test_changed_chat_template_fails(capsys, conv, hf31, tmp_path):
    good = conv("hf31", "q8_0")
    assert GGUFReader(good).get_field("tokenizer.chat_template").contents() == CHAT_TEMPLATE
    bad = rewrite_gguf(
        good, tmp_path / "tmpl.gguf", kvs={"tokenizer.chat_template": CHAT_TEMPLATE.replace("<|eot_id|>", "")}
    )
    code, out, _ = verify(capsys, bad, hf31)
    assert code == 1, out
    assert verdict(out).startswith("metadata tokenizer.chat_template = "), out


# ---- JSON and missing optional libraries ------------------------------------------------------------


def test_json_report_writes_null_for_inf(capsys, conv, tmp_path):
    good = conv("hf", "f16")

    def poison(raw, r):
        raw = raw.copy()
        raw[3] = np.inf
        return raw

    bad = rewrite_gguf(good, tmp_path / "inf.gguf", tensors={"blk.0.ffn_norm.weight": poison})
    code, rep, out = verify_json(capsys, bad, HF_DIR, tmp_path)  # strict_json refuses Infinity
    assert code == 1, out
    row = next(t for t in rep["tensors"] if t["name"] == "blk.0.ffn_norm.weight")
    assert row["rel_rmse"] is None and row["rel_max_err"] is None
    assert any("blk.0.ffn_norm.weight" in f for f in rep["failures"])
    assert "null" in verify_report.__doc__.split("Report schema")[1]


@pytest.mark.parametrize("module, source", [("tiktoken", "llama3"), ("tokenizers", "hf31")])
def test_missing_bpe_library_is_a_one_line_error(capsys, monkeypatch, conv, hf31, module, source):
    path = conv(source, "f16")
    monkeypatch.setitem(sys.modules, module, None)  # import now raises ImportError
    capsys.readouterr()
    code = main(["verify", str(path), "--reference", str(hf31 if source == "hf31" else SOURCES[source])])
    _, err = capsys.readouterr()
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"pip install {module}" in err


# ---- head_dim != dim / n_heads (Mistral Nemo's attention shape) ------------------------------------


@pytest.fixture(scope="module")
def nemo_like(tmp_path_factory):
    """Meta and HF checkpoints of the same weights with dim 80 and 4 heads of 32 (not 20), and
    their f16 conversions: {"meta"/"hf": (checkpoint, gguf)}."""
    import torch
    from synth import meta_state_dict, write_meta_checkpoint

    mk = _load_generator()
    tmp = tmp_path_factory.mktemp("nemo-like")
    sd = meta_state_dict(dim=80, n_heads=4, n_kv_heads=2, head_dim=32, ffn=96, seed=5, dtype=torch.float32)
    meta = write_meta_checkpoint(
        tmp / "meta", sd, params={"n_heads": 4, "n_kv_heads": 2, "head_dim": 32, "vocab_size": 512}
    )
    params = json.loads((meta / "params.json").read_text())
    hf_dir = mk.write_hf_checkpoint(tmp / "hf", sd, params, config={"head_dim": 32, "max_position_embeddings": 4096})
    out = {}
    for name, ckpt in (("meta", meta), ("hf", hf_dir)):
        gguf = tmp / f"{name}.gguf"
        llmconv.convert(ckpt, gguf, outtype="f16")
        out[name] = (ckpt, gguf)
    return out


@pytest.mark.parametrize("layout", ["meta", "hf"])
def test_head_dim_other_than_dim_over_heads(capsys, nemo_like, tmp_path, layout):
    ckpt, good = nemo_like[layout]
    assert GGUFReader(good).get_field("llama.attention.key_length").contents() == 32
    code, rep, out = run_verify_json(capsys, good, ckpt, tmp_path, "--tokens", "32")
    assert code == 0, out
    assert rep["fidelity"]["metrics"]["max_rel_dlogit"] <= 1e-4 and rep["fidelity"]["tensors_differ"] == 0
    # the candidate reads the head size from key_length: the quotient (20) cannot even split the tensors
    bad = rewrite_gguf(
        good, tmp_path / "kl.gguf", kvs={"llama.attention.key_length": 16, "llama.attention.value_length": 16}
    )
    code, out, _ = run_verify_cli(capsys, bad, ckpt, "--tokens", "32")
    assert code == 1 and verdict(out).startswith("metadata llama.attention.key_length = 16"), out
