"""Issue 5: legacy ggml (ggjt v3) output, checked in a real ggjt loader (ctransformers 0.2.27),
and the validating ggml reader.

The fixture has grouped-query attention and eps 1e-5, which ggjt cannot hold, so it is the
refusal test. The positive tests use the same trained weights made multi-head: each of the 2
K/V heads is repeated for the 4 query heads that read it (the same function, exactly), with
the RMS epsilon and RoPE base that ggjt loaders assume (5e-6, 10000).

Oracles: SentencePiece for the vocabulary and tokenization, llmconv's GGUF conversion for
tensor bytes, the PyTorch reference forward pass for logits (bounds from verify's per-type
table), and ctransformers as the outside reader.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader, LlamaFileType
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import llmconv
from llmconv.cli import main
from llmconv.convert.ggml_out import plan_ggml_conversion
from llmconv.errors import LlmconvError
from llmconv.formats.ggml_reader import ASSUMED_NORM_EPS, ASSUMED_ROPE_THETA, read_ggml
from llmconv.verify import metrics as M
from llmconv.verify.candidate import candidate_logits
from llmconv.verify.model_file import legacy_gguf_name, open_model_file
from llmconv.verify.reference import reference_logits
from llmconv.verify.run import DEFAULT_TEXT, LOGIT_BOUNDS

from synth import SENTENCES, meta_state_dict, write_meta_checkpoint

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "fixtures" / "tiny-llama"
TYPES = ["f16", "q4_0", "q8_0"]
N_TOKENS = 64
FILE_TYPE = {
    "f32": LlamaFileType.ALL_F32,
    "f16": LlamaFileType.MOSTLY_F16,
    "q4_0": LlamaFileType.MOSTLY_Q4_0,
    "q8_0": LlamaFileType.MOSTLY_Q8_0,
}
MAGIC = {"ggml": 0x67676D6C, "ggmf": 0x67676D66, "ggjt": 0x67676A74}


def one_line_error(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


# ---- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """The fixture's weights as a multi-head model with the loaders' eps and RoPE base."""
    sd = torch.load(FIXTURE / "consolidated.00.pth", weights_only=True)
    params = json.loads((FIXTURE / "params.json").read_text())
    group = params["n_heads"] // params["n_kv_heads"]
    for k in list(sd):
        if k.endswith(("attention.wk.weight", "attention.wv.weight")):
            w = sd[k]
            heads = w.reshape(params["n_kv_heads"], -1, w.shape[1])
            sd[k] = heads.repeat_interleave(group, dim=0).reshape(-1, w.shape[1]).clone()
    return write_meta_checkpoint(
        tmp_path_factory.mktemp("mha") / "tiny-mha",
        sd,
        n_heads=params["n_heads"],
        params={"norm_eps": ASSUMED_NORM_EPS, "rope_theta": ASSUMED_ROPE_THETA, "multiple_of": params["multiple_of"]},
    )


@pytest.fixture(scope="module")
def ggjt(ckpt, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("ggjt")
    paths = {}
    for t in TYPES:
        paths[t] = out / f"tiny-{t}.bin"
        llmconv.convert(ckpt, paths[t], format="ggml", outtype=t)
    return paths


@pytest.fixture(scope="module")
def sp():
    return spm.SentencePieceProcessor(model_file=str(FIXTURE / "tokenizer.model"))


@pytest.fixture(scope="module")
def text() -> str:
    return DEFAULT_TEXT.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def ids(sp, text) -> list[int]:
    return ([sp.bos_id()] + sp.encode(text))[:N_TOKENS]


@pytest.fixture(scope="module")
def ref(ckpt, ids) -> np.ndarray:
    return reference_logits(ckpt, ids)


def load_ct(path: Path):
    from ctransformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(path), model_type="llama", context_length=512, threads=1, batch_size=1, gpu_layers=0
    )


def ct_logits(path: Path, ids: list[int]) -> np.ndarray:
    """All positions' logits: ctransformers' eval keeps only the last position's, so feed one token at a time."""
    llm = load_ct(path)
    out = []
    for tok in ids:
        llm.eval([tok])
        out.append(np.array(llm.logits, dtype=np.float32))
    return np.stack(out)


# ---- refusals ---------------------------------------------------------------------------------


def test_gqa_fixture_refused(tmp_path, capsys):
    out = tmp_path / "x.bin"
    assert main(["convert", str(FIXTURE), "--format", "ggml", "--outtype", "q4_0", "-o", str(out), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "grouped-query attention" in err[0] and "--format gguf" in err[0]
    assert not out.exists() and not list(tmp_path.iterdir())


def test_ffn_no_n_mult_can_express_refused(tmp_path, capsys):
    # dim 64: the loaders' n_ff = ceil(floor(8*64/3) / n_mult) * n_mult >= 170 for every n_mult
    src = write_meta_checkpoint(
        tmp_path / "narrow",
        meta_state_dict(dim=64, n_heads=4, n_kv_heads=4, ffn=128, dtype=torch.float32),
        n_heads=4,
        params={"norm_eps": ASSUMED_NORM_EPS},
    )
    out = tmp_path / "x.bin"
    assert main(["convert", str(src), "--format", "ggml", "-o", str(out), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "feed-forward size 128" in err[0] and "n_mult" in err[0]
    assert not out.exists()


def test_n_mult_search_found_by_loader(tmp_path, sp):
    """ffn 180 with multiple_of 32 needs another n_mult (12); ctransformers derives n_ff from it
    and refuses the file if its tensors do not have that size."""
    ffn = 180
    src = write_meta_checkpoint(
        tmp_path / "odd",
        meta_state_dict(dim=64, n_heads=4, n_kv_heads=4, ffn=ffn, dtype=torch.float32),
        n_heads=4,
        params={"norm_eps": ASSUMED_NORM_EPS, "multiple_of": 32},
    )
    out = tmp_path / "odd.bin"
    llmconv.convert(src, out, format="ggml", outtype="f32")
    g = read_ggml(out)
    n_mult = g.hparams.n_mult
    assert n_mult != 32 and -(-(8 * 64 // 3) // n_mult) * n_mult == ffn  # the C loader's expression
    ids = [sp.bos_id()] + sp.encode("The fox")
    got = ct_logits(out, ids)
    want = reference_logits(src, ids)
    assert M.logit_metrics(want, got, np.asarray(ids))["max_rel_dlogit"] <= LOGIT_BOUNDS["f16"].max_rel_dlogit


def test_unholdable_hparams(tmp_path):
    """RoPE base is refused; an epsilon other than the loaders' is a warning that says what they assume."""
    sd = meta_state_dict(dim=64, n_heads=4, n_kv_heads=4, ffn=192, dtype=torch.float32)
    rope = write_meta_checkpoint(tmp_path / "rope", sd, n_heads=4, params={"rope_theta": 500000.0})
    with pytest.raises(LlmconvError) as e:
        plan_ggml_conversion(rope, outfile=tmp_path / "r.bin")
    assert "RoPE base 500000" in one_line_error(e)
    eps = write_meta_checkpoint(tmp_path / "eps", sd, n_heads=4, params={"norm_eps": 1e-5})
    conv = plan_ggml_conversion(eps, outfile=tmp_path / "e.bin")
    assert any("1e-05" in w and f"{ASSUMED_NORM_EPS:g}" in w for w in conv.warnings)
    with pytest.raises(LlmconvError) as e:
        plan_ggml_conversion(eps, outtype="q5_0", outfile=tmp_path / "e.bin")
    assert "q5_0" in one_line_error(e)


# ---- what the file holds ----------------------------------------------------------------------


def expected_token_bytes(sp, i: int) -> bytes:
    """How ggjt loaders want SentencePiece tokens: text with U+2581 as space, byte tokens as the
    byte, control tokens empty, the unknown token as ' \u2047 '."""
    if sp.is_unknown(i):
        return " \u2047 ".encode()
    if sp.is_control(i):
        return b""
    piece = sp.id_to_piece(i)
    if sp.is_byte(i):
        return bytes([int(piece[3:5], 16)])
    return piece.replace("\u2581", " ").encode()


@pytest.mark.parametrize("qtype", TYPES)
def test_reader_roundtrip(qtype, ggjt, ckpt, sp, tmp_path):
    g = read_ggml(ggjt[qtype])
    params = json.loads((ckpt / "params.json").read_text())
    assert (g.magic, g.version, g.alignment) == ("ggjt", 3, 32)
    h = g.hparams
    assert (h.n_vocab, h.n_embd, h.n_head, h.n_layer, h.n_rot) == (
        sp.get_piece_size(),
        params["dim"],
        params["n_heads"],
        params["n_layers"],
        params["dim"] // params["n_heads"],
    )
    assert h.ftype == FILE_TYPE[qtype]
    w1 = torch.load(ckpt / "consolidated.00.pth", weights_only=True)["layers.0.feed_forward.w1.weight"]
    assert h.n_ff == w1.shape[0]

    assert g.vocab.tokens == [expected_token_bytes(sp, i) for i in range(sp.get_piece_size())]
    assert np.array_equal(np.float32(g.vocab.scores), np.float32([sp.get_score(i) for i in range(sp.get_piece_size())]))

    # tensor bytes: those of a --pure GGUF conversion of the same checkpoint
    gguf_path = tmp_path / "pure.gguf"
    llmconv.convert(ckpt, gguf_path, outtype=qtype, pure=True)
    ref = {t.name: t for t in GGUFReader(gguf_path).tensors}
    assert sorted(legacy_gguf_name(t.name) for t in g.tensors) == sorted(ref)
    for t in g.tensors:
        r = ref[legacy_gguf_name(t.name)]
        assert t.shape == tuple(int(d) for d in reversed(r.shape.tolist())), t.name
        assert t.ggml_type == int(r.tensor_type) and t.gguf_layout, t.name
        assert t.offset % 32 == 0 and t.nbytes == int(r.n_bytes), t.name
        assert np.array_equal(np.asarray(t.data), np.asarray(r.data).view(np.uint8).reshape(-1)), t.name
    last = max(g.tensors, key=lambda t: t.offset)
    assert last.offset + last.nbytes == ggjt[qtype].stat().st_size


# ---- ctransformers, the outside ggjt reader -----------------------------------------------------


def test_ctransformers_tokenizes_like_sentencepiece(ggjt, sp, text):
    """Its tokenize() adds BOS but not SentencePiece's dummy-prefix space."""
    llm = load_ct(ggjt["q8_0"])
    for s in SENTENCES + [text]:
        assert llm.tokenize(" " + s) == [sp.bos_id()] + sp.encode(s), s


@pytest.mark.parametrize("qtype", TYPES)
def test_ctransformers_logits(qtype, ggjt, ids, ref):
    got = ct_logits(ggjt[qtype], ids)
    # ggml keeps its KV cache in f16, so even float files get f16-level accuracy at best
    b = LOGIT_BOUNDS["f16" if qtype in ("f32", "f16") else qtype]
    m = M.logit_metrics(ref, got, np.asarray(ids))
    assert m["max_rel_dlogit"] <= b.max_rel_dlogit, m
    assert m["kld_mean"] <= b.max_kld, m
    assert m["top1"] >= b.min_top1, m
    # and it runs the weights llmconv's own evaluation of the file sees (ggml's reduced precision
    # is at most f16-like for float files, q8_0-like activations for quantized ones)
    cand = candidate_logits(ggjt[qtype], ids)
    agree = LOGIT_BOUNDS["f16" if qtype in ("f32", "f16") else "q8_0"].max_rel_dlogit
    assert M.logit_metrics(cand, got, np.asarray(ids))["max_rel_dlogit"] <= agree


def test_verify_on_ggml_file(ggjt, ckpt):
    result = llmconv.verify(ggjt["q4_0"], ckpt, tokens=N_TOKENS)
    assert result.passed
    r = json.loads(json.dumps(result.report, default=str))  # as `--json` writes it
    assert r["file_kind"] == "ggjt" and r["dominant_type"] == "q4_0" and r["file_type"] == "MOSTLY_Q4_0"
    assert r["tokens_match"] and r["passed"] and not r["metadata"]


# ---- older revisions --------------------------------------------------------------------------


def legacy_file(g, magic: str, version: int, blocks: dict[int, int] | None = None) -> bytes:
    """Re-pack a parsed file as another revision: no version field and no scores in 'ggml',
    no alignment padding before ggjt. `blocks` replaces a type's data with that many bytes per
    32-weight block (pre-v3 q4_0 is 20)."""
    h = g.hparams
    out = bytearray(struct.pack("<I", MAGIC[magic]))
    if magic != "ggml":
        out += struct.pack("<I", version)
    out += struct.pack("<7I", h.n_vocab, h.n_embd, h.n_mult, h.n_head, h.n_layer, h.n_rot, h.ftype)
    for tok, score in zip(g.vocab.tokens, g.vocab.scores):
        out += struct.pack("<I", len(tok)) + tok + (struct.pack("<f", score) if magic != "ggml" else b"")
    for t in g.tensors:
        name = t.name.encode()
        out += struct.pack(f"<3i{len(t.shape)}i", len(t.shape), len(name), t.ggml_type, *reversed(t.shape)) + name
        if magic == "ggjt":
            out += b"\0" * (-len(out) % 32)
        if blocks and t.ggml_type in blocks:
            out += bytes(t.n_elements // 32 * blocks[t.ggml_type])
        else:
            out += np.asarray(t.data).tobytes()
    return bytes(out)


@pytest.mark.parametrize("magic,version", [("ggml", 0), ("ggmf", 1), ("ggjt", 1)])
def test_older_revisions(magic, version, ggjt, ids, tmp_path):
    """f16 files in older revisions: the reader sees the same tensors, and ctransformers' loader,
    which reads them too, computes the same logits as from the ggjt v3 file. (Not for 'ggml':
    the format has no token scores, but that loader, from llama.cpp of July 2023, reads a score
    after every token whatever the revision, so it cannot read a real unversioned file.)"""
    g = read_ggml(ggjt["f16"])
    path = tmp_path / f"old-{magic}{version}.bin"
    path.write_bytes(legacy_file(g, magic, version))
    old = read_ggml(path)
    assert (old.magic, old.version) == (magic, version)
    assert old.vocab.tokens == g.vocab.tokens
    assert old.vocab.scores == (g.vocab.scores if magic != "ggml" else [0.0] * len(g.vocab.tokens))
    for a, b in zip(old.tensors, g.tensors, strict=True):
        assert (a.name, a.ggml_type, a.shape, a.gguf_layout) == (b.name, b.ggml_type, b.shape, True)
        assert np.array_equal(np.asarray(a.data), np.asarray(b.data))
    if magic != "ggml":
        few = ids[:4]
        assert np.array_equal(ct_logits(path, few), ct_logits(ggjt["f16"], few))


def test_pre_v3_quantized_blocks(ggjt, tmp_path):
    """q4_0 before ggjt v3 had f32 scales (20-byte blocks): read with that size, and not
    evaluated with GGUF's kernels."""
    g = read_ggml(ggjt["q4_0"])
    path = tmp_path / "v2.bin"
    path.write_bytes(legacy_file(g, "ggjt", 2, blocks={int(QT.Q4_0): 20}))
    old = read_ggml(path)
    q = [t for t in old.tensors if t.ggml_type == QT.Q4_0]
    assert q and all(t.nbytes == t.n_elements // 32 * 20 and not t.gguf_layout for t in q)
    with pytest.raises(LlmconvError) as e:
        open_model_file(path)
    assert "ggjt v3" in one_line_error(e)


# ---- hostile files ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_file(tmp_path_factory) -> bytes:
    d = tmp_path_factory.mktemp("small")
    src = write_meta_checkpoint(
        d / "m",
        meta_state_dict(dim=64, n_layers=1, n_heads=4, n_kv_heads=4, ffn=192, dtype=torch.float32),
        n_heads=4,
        params={"norm_eps": ASSUMED_NORM_EPS},
    )
    llmconv.convert(src, d / "m.bin", format="ggml", outtype="q8_0")
    return (d / "m.bin").read_bytes()


def read_ggml_bytes(data: bytes, tmp_path: Path):
    p = tmp_path / "good.bin"
    p.write_bytes(data)
    return read_ggml(p)


def expect_corrupt(path: Path, data: bytes, *words: str) -> str:
    path.write_bytes(data)
    with pytest.raises(LlmconvError) as e:
        read_ggml(path)
    msg = one_line_error(e)
    assert "offset" in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


def test_corrupt_headers(small_file, tmp_path):
    p = tmp_path / "bad.bin"
    g = read_ggml_bytes(small_file, tmp_path)
    first = g.tensors[0].record_offset

    def patch(at: int, fmt: str, *values) -> bytes:
        b = bytearray(small_file)
        struct.pack_into(fmt, b, at, *values)
        return bytes(b)

    expect_corrupt(p, patch(0, "<I", 0x12345678), "not a ggml file", "offset 0")
    expect_corrupt(p, patch(4, "<I", 4), "version 4")
    expect_corrupt(p, patch(8, "<I", 0xFFFFFFFF), "n_vocab 4294967295")
    expect_corrupt(p, patch(20, "<I", 0), "n_head")
    expect_corrupt(p, patch(24, "<I", 0xFFFFFFFF), "n_layer 4294967295")
    expect_corrupt(p, patch(g.vocab_offset, "<I", 0x7FFFFFFF), "token 0 claims")
    expect_corrupt(p, patch(first, "<i", 99), "99 dimensions", f"offset {first}")
    expect_corrupt(p, patch(first + 4, "<i", 0x7FFFFFFF), "name length")
    expect_corrupt(p, patch(first + 8, "<i", 99), "ggml type 99")
    expect_corrupt(p, patch(first + 12, "<i", -5), "dimensions")
    expect_corrupt(p, patch(first + 12, "<i", 2**31 - 32), "runs past the end")
    expect_corrupt(p, small_file + b"\1" * 7, "truncated", f"offset {len(small_file)}")
    expect_corrupt(p, small_file + bytes(40), "0 dimensions")
    t0 = g.tensors[0]
    dup = bytearray(small_file + small_file[first : first + 12 + 4 * len(t0.shape) + len(t0.name)])
    dup += bytes(-len(dup) % 32) + np.asarray(t0.data).tobytes()
    expect_corrupt(p, bytes(dup), "duplicate")


def test_truncations(small_file, tmp_path):
    p = tmp_path / "cut.bin"
    g = read_ggml_bytes(small_file, tmp_path)
    cuts = (
        set(range(0, 64))
        | set(range(g.vocab_offset, g.vocab_offset + 40))
        | {o + d for t in g.tensors for o in (t.record_offset, t.offset) for d in (0, 1, 5, 13)}
    )
    cuts |= {t.offset + t.nbytes - 1 for t in g.tensors}
    for n in sorted(c for c in cuts if c < len(small_file)):
        if n in {t.record_offset for t in g.tensors}:
            continue  # a cut between records is a valid file with fewer tensors
        expect_corrupt(p, small_file[:n])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_header_damage(small_file, tmp_path, data):
    """Overwrite a few bytes anywhere before the first tensor's data: the reader either reads
    the file or says what is wrong in one line, never anything else."""
    b = bytearray(small_file)
    g = read_ggml_bytes(small_file, tmp_path)
    regions = (
        [(0, 36), (g.vocab_offset, g.vocab_offset + 200)]
        + [(t.record_offset, t.offset) for t in g.tensors[:3]]
        + [(g.tensors[-1].offset - 8, len(b) - 4)]
    )
    for _ in range(data.draw(st.integers(1, 4))):
        lo, hi = data.draw(st.sampled_from(regions))
        at = data.draw(st.integers(lo, hi))
        b[at : at + 4] = data.draw(st.binary(min_size=4, max_size=4))
    p = tmp_path / "fuzz.bin"
    p.write_bytes(bytes(b))
    try:
        read_ggml(p)
    except LlmconvError as e:
        assert "\n" not in str(e) and "offset" in str(e)
