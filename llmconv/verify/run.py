"""`llmconv verify`: run a converted file and the original checkpoint on the same tokens and
compare, in llama-perplexity's terms (see metrics.py).

    report = run_verify("Llama-2-7B-Q4_0.gguf", "llama-2-7b/")       # dict, schema below

Steps: tokenize the text with the checkpoint's own SentencePiece model ([bos] + encode(text),
cut to `tokens`); check the file's vocabulary against that tokenizer id by id and its metadata
against the checkpoint's hyperparameters; run the PyTorch float32 reference over the checkpoint
(reference.py) and the numpy candidate over the file (candidate.py); compare the logits; compare
every tensor, dequantized, with its source weight; optionally run the file in llama.cpp too.

Bounds (the file's type is the type holding most weights of its 2-D tensors)
----------------------------------------------------------------------------

Two sources set them. The fixture: fixtures/tiny-llama (dim 256, 2 layers, bf16 weights, vocab
512), converted to each type with llmconv's default per-tensor choices and verified over the
bundled default_text.txt at 64 and 256 tokens, candidate in llama.cpp's CPU arithmetic
("measured" below: the worse of the two runs; llama.cpp's own KLD agrees to 2 digits). And
llama.cpp's published LLaMA-3-8B figures (tools/perplexity/README.md, no imatrix), because the
tiny model degrades *less* in KLD than a real one: LLaMA-3-8B shows q8_0 KLD 0.0014 / 97.7 %
same top, q6_K 0.0055 / 96.0 %, q5_0 0.022, q4_K_M 0.031 / 91.9 %, q4_0 0.072, q3_K_M 0.10,
q2_K 0.45 / 71.1 % (LLaMA-2-7B: q8_0 0.00037, q4_K_M 0.013, q2_K 0.11). Each KLD bound is about
1.5-3x the larger of the two, each top-1 bound leaves about twice the measured disagreement;
max rel dlogit (a max over every position and vocabulary entry, unpublished) is about 2x the
fixture. The logit bounds catch a wrong model, not mild quality loss: the checks that find
conversion slips in lossy files are the per-tensor errors and the metadata/vocabulary checks.

    type   measured: max rel dlogit  KLD mean   top-1  | bound: max rel dlogit  max KLD   min top-1
    f32               1.2e-06        1.2e-12   1.000   |          0.0001        1e-06     0.99
    f16               4.5e-04        1.1e-07   1.000   |          0.005         0.0001    0.98
    bf16              2.6e-03        6.0e-06   1.000   |          0.02          0.001     0.97
    q8_0              8.5e-03        8.1e-05   0.996   |          0.03          0.004     0.95
    q6_k              3.0e-02        4.9e-04   0.980   |          0.08          0.01      0.93
    q5_1              3.9e-02        1.2e-03   0.973   |          0.15          0.04      0.88
    q5_0              6.4e-02        1.9e-03   0.941   |          0.15          0.04      0.88
    q5_k              5.0e-02        1.3e-03   0.977   |          0.15          0.03      0.88
    q4_1              6.8e-02        4.3e-03   0.957   |          0.3           0.12      0.80
    q4_0              1.3e-01        7.5e-03   0.922   |          0.3           0.12      0.80
    q4_k              8.0e-02        4.2e-03   0.965   |          0.3           0.08      0.80
    q3_k              1.7e-01        1.6e-02   0.887   |          0.4           0.25      0.68
    q2_k              3.6e-01        8.5e-02   0.742   |          0.7           0.7       0.45

(Printed by `python -m llmconv.verify.calibrate`, with a headroom column and the per-tensor
table below; rerun it after changing a kernel, a type mix, the fixture or a bound.)

Per tensor (by the tensor's own type): rel_rmse = rms(deq - src)/rms(src) and rel_max_err =
max|deq - src| / max|src|. The max-error bounds follow from each format's step size (half a
step, or a whole step where the block's far side can clip), so they hold for any model: a
corrupted block scale shows there even in a large tensor, where its share of the RMS is tiny.
A failing tensor is then explained where the numbers allow: it matches another layer's source
tensor, or its source with a Q/K row permutation, or its error sits in a few blocks that are
further from their source values than those are from zero (broken_blocks).
Worst over every tensor of every file above:

    tensor type   worst rel_rmse  worst rel_max_err  | bound rel_rmse  bound rel_max_err
    f32            0.00e+00        0.00e+00          |  1e-06         1e-06
    f16            1.09e-08        1.39e-07          |  0.001         0.001
    bf16           0.00e+00        0.00e+00          |  0.005         0.005
    q8_0           7.13e-03        3.96e-03          |  0.02          0.01
    q6_k           2.19e-02        1.61e-02          |  0.04          0.04
    q5_1           4.30e-02        2.20e-02          |  0.06          0.05
    q5_0           5.64e-02        3.12e-02          |  0.1           0.08
    q5_k           4.16e-02        2.87e-02          |  0.08          0.08
    q4_1           8.83e-02        4.42e-02          |  0.15          0.1
    q4_0           1.13e-01        6.25e-02          |  0.2           0.15
    q4_k           8.18e-02        4.41e-02          |  0.15          0.15
    q3_k           1.80e-01        1.25e-01          |  0.3           0.35
    q2_k           3.26e-01        2.54e-01          |  0.5           0.6

Report schema (all plain JSON types)
------------------------------------

Numbers that are not finite are written as null, so the report is strict JSON (json.dumps
would write Infinity/NaN, which strict parsers refuse): a tensor's rel_rmse/rel_max_err is null
when it cannot be compared (shape differs from the source, or the file holds inf/NaN), a tensor
bound is null for a type without one, and a logit metric is null when the logits are not finite.

    file              str    the verified file
    file_kind         str    "gguf", or the legacy magic ("ggjt", ...)
    reference         str    the checkpoint directory
    file_type         str|None  general.file_type by name ("MOSTLY_Q4_0"), None if absent
    dominant_type     str    type holding most 2-D weights ("q4_0"); picks the bounds
    activations       str    "ggml" (llama.cpp's CPU activation rounding) or "f32"
    n_tokens          int    tokens evaluated (bos + text, cut to `tokens`)
    tokens_match      bool   the file's vocabulary equals the source tokenizer's, id by id
    first_token_diff  int|None  first id where they differ (or the shorter length)
    metadata          list   [{key, file, source}] hyperparameters that differ from the checkpoint's
    structure_error   str|None  why the file cannot be evaluated as a LLaMA model (then metrics is None)
    metrics           dict|None candidate vs reference:
        max_rel_dlogit, mean_rel_dlogit   float  |cand - ref| max / mean, over max|ref|
        kld_mean, kld_median, kld_p99     float  KL(ref || cand) per position, nats
        top1                              float  fraction of positions with the same argmax
        ppl_ref, ppl_cand, ppl_ratio      float  next-token perplexity of each, cand/ref
        rel_dlogit_pos0, rel_dlogit_rest  float  max rel |dlogit| at position 0 / at positions >= 1
    engine            dict|None  with --engine: {name, version, metrics (same keys), vs_candidate:
                             {max_rel_dlogit, kld_mean}} or {name, error}
    tensors           list   [{name, type, rel_rmse, rel_max_err, bound_rel_rmse, bound_rel_max_err,
                             note}] worst rel_rmse first; note explains an outlier when it can
    bounds            dict   {type, max_rel_dlogit, max_kld, min_top1}
    passed            bool   no failures
    failures          list[str]  one message per violated check, pointing at a cause where the numbers show one
    notes             list[str]  things worth knowing that are not failures
    seconds           float  wall time
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT
from gguf import LlamaFileType

from ..errors import LlmconvError, load_json
from . import metrics as M
from .candidate import FileInconsistent, ModelFile, candidate_logits, open_model_file, read_config

DEFAULT_TEXT = Path(__file__).with_name("default_text.txt")
DEFAULT_TOKENS = 256


# ---- bounds ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class LogitBounds:
    max_rel_dlogit: float
    max_kld: float
    min_top1: float


LOGIT_BOUNDS: dict[str, LogitBounds] = {   # how they were chosen: see the module docstring
    "f32": LogitBounds(1e-4, 1e-6, 0.99),
    "f16": LogitBounds(0.005, 1e-4, 0.98),
    "bf16": LogitBounds(0.02, 1e-3, 0.97),
    "q8_0": LogitBounds(0.03, 4e-3, 0.95),
    "q6_k": LogitBounds(0.08, 0.01, 0.93),
    "q5_1": LogitBounds(0.15, 0.04, 0.88),
    "q5_0": LogitBounds(0.15, 0.04, 0.88),
    "q5_k": LogitBounds(0.15, 0.03, 0.88),
    "q4_1": LogitBounds(0.30, 0.12, 0.80),
    "q4_0": LogitBounds(0.30, 0.12, 0.80),
    "q4_k": LogitBounds(0.30, 0.08, 0.80),
    "q3_k": LogitBounds(0.40, 0.25, 0.68),
    "q2_k": LogitBounds(0.70, 0.70, 0.45),
}
# (rel_rmse, rel_max_err) per tensor type
TENSOR_BOUNDS: dict[str, tuple[float, float]] = {
    "f32": (1e-6, 1e-6), "f16": (1e-3, 1e-3), "bf16": (5e-3, 5e-3),
    "q8_0": (0.02, 0.01), "q5_1": (0.06, 0.05), "q5_0": (0.10, 0.08),
    "q4_1": (0.15, 0.10), "q4_0": (0.20, 0.15),
    "q6_k": (0.04, 0.04), "q5_k": (0.08, 0.08), "q4_k": (0.15, 0.15), "q3_k": (0.30, 0.35), "q2_k": (0.50, 0.60),
}


def type_name(t: QT | int) -> str:
    return QT(int(t)).name.lower()


def file_type_name(mf: ModelFile) -> str | None:
    ft = mf.get("general.file_type")
    if ft is None:
        return None
    try:
        return LlamaFileType(int(ft)).name
    except ValueError:
        return f"unknown ({ft})"


def dominant_type(mf: ModelFile) -> str:
    """The type that holds most of the 2-D weights (output/embedding upgrades do not count more)."""
    count: dict[str, int] = {}
    for t in mf.tensors.values():
        if len(t.shape) == 2:
            count[type_name(t.ggml_type)] = count.get(type_name(t.ggml_type), 0) + int(np.prod(t.shape))
    return max(count, key=count.get) if count else "f32"


def bounds_for(kind: str, overrides: dict | None = None) -> dict:
    b = LOGIT_BOUNDS.get(kind, LOGIT_BOUNDS["q2_k"])
    out = {"type": kind, "max_rel_dlogit": b.max_rel_dlogit, "max_kld": b.max_kld, "min_top1": b.min_top1}
    for k, v in (overrides or {}).items():
        if k not in out or k == "type":
            raise LlmconvError(f"unknown bound {k!r} (max_rel_dlogit, max_kld, min_top1)")
        if v is not None:
            out[k] = float(v)
    return out


# ---- tokens and vocabulary ---------------------------------------------------------------------

@dataclass
class SourceTokenizer:
    """The checkpoint's own tokenizer, through its own library (never llmconv's converter).

    tokens: the source vocabulary id by id, written as a GGUF file stores it (SentencePiece
    pieces; byte-level BPE tokens in GPT-2's printable-byte alphabet, as bpe.py writes them);
    None where the source defines no token (ids an embedding pads past the tokenizer)."""
    kind: str                                 # "sentencepiece", "tokenizer.json" or "tiktoken"
    path: Path
    bos_id: int | None
    encode: Callable[[str], list[int]]        # text -> ids, no BOS/EOS
    tokens: list[bytes | None]


def load_source_tokenizer(ckpt_dir: Path) -> SourceTokenizer:
    """tokenizer.model (SentencePiece, or Meta's LLaMA 3 tiktoken text) first, as the converter
    reads it, else a Hugging Face tokenizer.json."""
    from ..convert.bpe import is_tiktoken_file

    model = ckpt_dir / "tokenizer.model"
    if model.is_file():
        return tiktoken_tokenizer(ckpt_dir) if is_tiktoken_file(model) else sentencepiece_tokenizer(ckpt_dir)
    if (ckpt_dir / "tokenizer.json").is_file():
        return tokenizer_json_tokenizer(ckpt_dir)
    raise LlmconvError("no tokenizer: verify tokenizes with the checkpoint's tokenizer.model or tokenizer.json",
                       file=ckpt_dir)


def _optional_import(module: str, what: str):
    """tokenizers and tiktoken are an optional extra (pip install 'llmconv[bpe]')."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise LlmconvError(f"verifying against {what} needs the {module} package: pip install {module}") from None


def sentencepiece_tokenizer(ckpt_dir: Path) -> SourceTokenizer:
    import sentencepiece as spm

    path = ckpt_dir / "tokenizer.model"
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as e:
        raise LlmconvError(f"not a SentencePiece model: {str(e).splitlines()[0] if str(e) else e}", file=path) from None
    bos = sp.bos_id()
    return SourceTokenizer("sentencepiece", path, bos if bos >= 0 else None, lambda text: sp.encode(text),
                           source_pieces(sp, ckpt_dir))


def source_pieces(sp, ckpt_dir: Path) -> list[bytes | None]:
    """The source vocabulary id by id: SentencePiece pieces, then added tokens past its end by id:
    added_tokens.json (Meta, old HF), or tokenizer_config.json's added_tokens_decoder (HF)."""
    pieces: list[bytes | None] = [sp.id_to_piece(i).encode("utf-8") for i in range(sp.get_piece_size())]
    added: dict[int, str] = {}
    extra_file = ckpt_dir / "added_tokens.json"
    if extra_file.is_file():
        added.update({i: piece for piece, i in _json(extra_file).items() if isinstance(i, int)})
    config_file = ckpt_dir / "tokenizer_config.json"
    if config_file.is_file():
        decoder = _json(config_file).get("added_tokens_decoder") or {}
        for i, tok in decoder.items() if isinstance(decoder, dict) else ():
            text = tok.get("content") if isinstance(tok, dict) else tok
            if str(i).isdigit() and isinstance(text, str):
                added[int(i)] = text
    for i in sorted(added):
        if i >= len(pieces):
            pieces += [None] * (i - len(pieces)) + [added[i].encode("utf-8")]
    return pieces


def tiktoken_tokenizer(ckpt_dir: Path) -> SourceTokenizer:
    """Meta's LLaMA 3 tokenizer.model, built into a tiktoken Encoding from the file's own ranks
    (tiktoken is never asked to download anything), with Meta's split regex and its 256
    special tokens after the ranks, named as that release names them."""
    from ..convert.bpe import LLAMA3_PATTERN, bytes_to_token, meta_special_tokens, meta_special_version
    from ..convert.bpe import read_tiktoken_ranks
    from ..convert.meta import read_params

    tiktoken = _optional_import("tiktoken", "a LLaMA 3 tiktoken tokenizer.model")
    path = ckpt_dir / "tokenizer.model"
    ranks = read_tiktoken_ranks(path)
    specials = meta_special_tokens(meta_special_version(read_params(ckpt_dir)))
    n = len(ranks)
    enc = tiktoken.Encoding(name=f"llmconv-verify-{n}", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                            special_tokens={s: n + k for k, s in enumerate(specials)})
    by_rank = sorted(ranks, key=ranks.__getitem__)
    tokens = [bytes_to_token(b).encode("utf-8") for b in by_rank] + [s.encode("utf-8") for s in specials]
    # special-token text in the input is encoded as plain text, as Meta's tokenizer does by default
    return SourceTokenizer("tiktoken", path, n + specials.index("<|begin_of_text|>"),
                           lambda text: enc.encode(text, allowed_special=set(), disallowed_special=()), tokens)


def tokenizer_json_tokenizer(ckpt_dir: Path) -> SourceTokenizer:
    """A Hugging Face tokenizer.json through the `tokenizers` library. BOS is tokenizer_config's
    bos_token, else what the post-processor puts in front of a sequence."""
    tokenizers = _optional_import("tokenizers", "a tokenizer.json")
    path = ckpt_dir / "tokenizer.json"
    try:
        tok = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:      # the library raises its own Exception subclass for any bad file
        raise LlmconvError(f"tokenizers cannot read it: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
                           file=path) from None
    config_file = ckpt_dir / "tokenizer_config.json"
    bos_text = _json(config_file).get("bos_token") if config_file.is_file() else None
    bos_text = bos_text.get("content") if isinstance(bos_text, dict) else bos_text
    bos = tok.token_to_id(bos_text) if isinstance(bos_text, str) else None
    if bos is None:
        with_specials = tok.encode("x", add_special_tokens=True).ids
        plain = tok.encode("x", add_special_tokens=False).ids
        bos = with_specials[0] if len(with_specials) > len(plain) and with_specials[1:1 + len(plain)] == plain else None
    by_id = {i: t for t, i in tok.get_vocab(with_added_tokens=True).items()}
    tokens = [by_id[i].encode("utf-8") if i in by_id else None for i in range(max(by_id) + 1)]
    return SourceTokenizer("tokenizer.json", path, bos,
                           lambda text: tok.encode(text, add_special_tokens=False).ids, tokens)


def _json(path: Path) -> dict:
    obj = load_json(path)
    return obj if isinstance(obj, dict) else {}


def tokenize(tok: SourceTokenizer, text: str, n: int) -> list[int]:
    ids = ([tok.bos_id] if tok.bos_id is not None else []) + list(tok.encode(text))
    return ids[:n]


def first_vocab_difference(file_tokens: list[bytes] | None,
                           source: list[bytes | None]) -> tuple[int | None, str | None]:
    """The first id where the file's token differs from the source's (None in `source`: any token)."""
    if file_tokens is None:
        return 0, "the file has no tokenizer.ggml.tokens list"
    for i, (a, b) in enumerate(zip(file_tokens, source)):
        if b is not None and a != b:
            return i, (f"vocabulary differs at id {i}: the file has {a!r}{_as_bytes(a)}, "
                       f"the source tokenizer has {b!r}{_as_bytes(b)}")
    if len(file_tokens) != len(source):
        n = min(len(file_tokens), len(source))
        return n, f"vocabulary sizes differ: the file has {len(file_tokens)} tokens, the source tokenizer {len(source)}"
    return None, None


def _as_bytes(token: bytes) -> str:
    """For a GPT-2-alphabet token, the bytes it stands for (" (bytes b' the')"), else ""."""
    from ..convert.bpe import token_to_bytes

    try:
        raw = token_to_bytes(token.decode("utf-8"))
    except UnicodeDecodeError:
        return ""
    return f" (bytes {raw!r})" if raw is not None and raw != token else ""


# ---- metadata vs the checkpoint --------------------------------------------------------------

def _num(v):
    """A metadata value for a message: float32 keys read back as 9.999999747378752e-06, say 1e-05."""
    return f"{v:.7g}" if isinstance(v, float) else v


def metadata_differences(mf: ModelFile, h) -> list[dict]:
    """Hyperparameters the file states differently from the checkpoint (context length is a
    choice made at conversion, so it is not compared)."""
    k = mf.arch_key
    want = {
        k("embedding_length"): h.dim, k("block_count"): h.n_layers, k("feed_forward_length"): h.ffn_dim,
        k("attention.head_count"): h.n_heads, k("attention.head_count_kv"): h.n_kv_heads,
        k("attention.layer_norm_rms_epsilon"): h.norm_eps, k("rope.freq_base"): h.rope_theta,
        k("rope.dimension_count"): h.head_dim,
    }
    out = []
    for key, src in want.items():
        got = mf.get(key)
        if got is None:
            continue    # absent keys take llama.cpp's defaults; the forward pass shows if that matters
        same = np.isclose(float(got), float(src), rtol=1e-6, atol=0) if isinstance(src, float) else int(got) == int(src)
        if not same:
            out.append({"key": key, "file": got, "source": src})
    return out


# ---- per-tensor comparison with the source weights ---------------------------------------------

def to_rotate_half(w: np.ndarray, n_head: int) -> np.ndarray:
    """Meta's adjacent-pair row order -> Hugging Face's rotate-half order, within each head (the
    permutation HF's convert_llama_weights_to_hf.py applies to wq/wk): rows 0, 2, 4, ... then 1, 3, 5, ..."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def from_rotate_half(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse: rotate-half -> adjacent pairs (what a GGUF converter applies to HF q/k weights)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tensor_rows_errors(deq_rows, src: np.ndarray) -> tuple[float, float]:
    """(rel_rmse, rel_max_err) with the dequantized tensor streamed as row chunks."""
    s64 = 0.0
    e64 = 0.0
    emax = 0.0
    r = 0
    for chunk in deq_rows:
        s = src[r:r + chunk.shape[0]].astype(np.float64)
        d = chunk.astype(np.float64) - s
        e64 += float(np.sum(d * d))
        s64 += float(np.sum(s * s))
        emax = max(emax, float(np.abs(d).max()) if d.size else 0.0)
        r += chunk.shape[0]
    smax = float(np.abs(src).max()) if src.size else 0.0
    if not np.isfinite(e64):
        return float("inf"), float("inf")
    rel_rmse = (e64 / s64) ** 0.5 if s64 > 0 else (0.0 if e64 == 0 else float("inf"))
    rel_max = emax / smax if smax > 0 else (0.0 if emax == 0 else float("inf"))
    return rel_rmse, rel_max


def _chunks(ft, rows_per_chunk: int = 4096):
    if len(ft.shape) == 1:
        yield ft.array().reshape(1, -1)
        return
    for r0 in range(0, ft.shape[0], rows_per_chunk):
        yield ft.rows(r0, min(ft.shape[0], r0 + rows_per_chunk))


def tensor_errors(mf: ModelFile, source) -> tuple[list[dict], list[str]]:
    """Every file tensor against the source tensor of the same GGUF name, one at a time."""
    rows, notes = [], []
    by_name = {t.name: t for t in source.tensors}
    for name, ft in mf.tensors.items():
        st = by_name.get(name)
        if st is None:
            notes.append(f"{name}: not in the source checkpoint, not compared")
            continue
        tname = type_name(ft.ggml_type)
        b_rmse, b_max = TENSOR_BOUNDS.get(tname, (float("inf"), float("inf")))
        row = {"name": name, "type": tname, "rel_rmse": float("inf"), "rel_max_err": float("inf"),
               "bound_rel_rmse": b_rmse, "bound_rel_max_err": b_max, "note": None}
        if tuple(ft.shape) != tuple(st.shape):
            row["note"] = f"shape {tuple(ft.shape)} in the file, {tuple(st.shape)} in the source"
        else:
            src = st.load().reshape(st.shape)
            row["rel_rmse"], row["rel_max_err"] = tensor_rows_errors(_chunks(ft), src.reshape(src.shape[0], -1)
                                                                     if src.ndim > 1 else src.reshape(1, -1))
            del src
        rows.append(row)
    return M.worst_first(rows), notes


def explain_outlier(row: dict, mf: ModelFile, source, h) -> str | None:
    """What the file's tensor matches instead of its source, when that is one of the usual slips:
    the Hugging Face Q/K permutation applied to Meta weights (or the reverse), or a tensor from
    another layer."""
    ft = mf.tensors[row["name"]]
    if len(ft.shape) != 2:
        return None
    by_name = {t.name: t for t in source.tensors}
    deq = ft.array()
    bound = row["bound_rel_rmse"]
    kind = row["name"].split(".")[-2]
    if kind in ("attn_q", "attn_k"):
        heads = h.n_heads if kind == "attn_q" else h.n_kv_heads
        src = by_name[row["name"]].load()
        for f, what in ((to_rotate_half, "Hugging Face's Q/K permutation (adjacent pairs -> rotate-half)"),
                        (from_rotate_half, "the HF->GGUF Q/K permutation (rotate-half -> adjacent pairs)")):
            if M.rel_rmse(deq, f(src, heads)) <= bound:
                return (f"matches the source with {what} applied to its rows; llama.cpp's 'llama' architecture "
                        "wants Meta's adjacent-pair row order, which a Meta checkpoint already has")
    parts = row["name"].split(".")
    if parts[0] == "blk":
        for j in range(h.n_layers):
            other = ".".join(["blk", str(j)] + parts[2:])
            if other == row["name"] or other not in by_name or tuple(by_name[other].shape) != tuple(ft.shape):
                continue
            if M.rel_rmse(deq, by_name[other].load()) <= bound:
                return f"matches the source's {other} (tensors swapped or misnumbered between layers?)"
    block = GGML_QUANT_SIZES[ft.ggml_type][0]
    if block > 1 and row["name"] in by_name:
        return broken_blocks(deq, by_name[row["name"]].load().reshape(deq.shape), block)
    return None


def broken_blocks(deq: np.ndarray, src: np.ndarray, block: int) -> str | None:
    """Where a quantized tensor's error sits in a few blocks that are further from their source
    than the source is from zero (block RMS error > block RMS): rounding cannot do that, since
    every block is scaled to its own values, but a damaged block scale (or block bytes) does."""
    rows, n = deq.shape
    d = (deq.astype(np.float64) - src).reshape(rows, n // block, block)
    s = src.astype(np.float64).reshape(rows, n // block, block)
    err2 = np.square(d).sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.sqrt(err2 / np.square(s).sum(axis=-1))
    rel = np.where(np.isnan(rel), np.inf, rel)            # 0/0 only when err2 is nan
    bad = np.flatnonzero(rel > 1.0)
    if not len(bad) or len(bad) > max(1, rel.size // 100):
        return None                                       # none, or everywhere: not a local fault
    r, b = divmod(int(bad[np.argmax(rel.flat[bad])]), rel.shape[1])
    total = float(err2.sum())
    share = float(err2[r, b]) / total if np.isfinite(total) and total > 0 else 1.0
    return (f"{len(bad)} block(s) of {block} values far off the source; the worst, row {r} block {b} "
            f"(columns {b * block}..{b * block + block - 1}), is off by {rel[r, b]:.3g}x its own RMS and holds "
            f"{share:.0%} of the tensor's error: a corrupted block scale or block bytes")


# ---- llama.cpp --------------------------------------------------------------------------------

def engine_logits(path: Path, tokens: list[int], threads: int) -> np.ndarray:
    try:
        import llama_cpp
    except ImportError:
        raise LlmconvError("--engine llama.cpp needs llama-cpp-python (pip install llama-cpp-python)") from None
    llm = llama_cpp.Llama(str(path), n_ctx=max(len(tokens), 16), n_batch=max(len(tokens), 16),
                          n_ubatch=max(len(tokens), 16), logits_all=True, type_k=0, type_v=0,
                          n_threads=threads, n_threads_batch=threads, verbose=False)
    try:
        llm.eval(tokens)
        return np.array(llm.scores[:len(tokens)], dtype=np.float32)
    finally:
        llm.close() if hasattr(llm, "close") else None


def run_engine(engine: str, path: Path, tokens: list[int], ref: np.ndarray, cand: np.ndarray | None,
               threads: int) -> dict:
    if engine not in ("llama.cpp", "llama_cpp", "llamacpp"):
        raise LlmconvError(f"unknown engine {engine!r} (llama.cpp)")
    import llama_cpp  # noqa: F401  (engine_logits raises the friendly error)

    out = {"name": "llama.cpp", "version": getattr(llama_cpp, "__version__", None)}
    try:
        logits = engine_logits(path, tokens, threads)
    except LlmconvError:
        raise
    except Exception as e:  # llama.cpp refuses the file: that is a finding, not a crash
        out["error"] = f"llama.cpp could not load or run the file: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        return out
    out["metrics"] = _with_positions(M.logit_metrics(ref, logits, np.asarray(tokens)), ref, logits)
    if cand is not None:
        vs = M.logit_metrics(cand, logits, np.asarray(tokens))
        out["vs_candidate"] = {"max_rel_dlogit": vs["max_rel_dlogit"], "kld_mean": vs["kld_mean"]}
    return out


def _with_positions(m: dict, ref: np.ndarray, cand: np.ndarray) -> dict:
    per = M.rel_dlogit_per_position(ref, cand)
    m["rel_dlogit_pos0"] = float(per[0])
    m["rel_dlogit_rest"] = float(per[1:].max()) if len(per) > 1 else 0.0
    return m


# ---- judging ----------------------------------------------------------------------------------

def logit_failures(m: dict, b: dict, who: str) -> list[str]:
    out = []
    if not all(np.isfinite([m["max_rel_dlogit"], m["kld_mean"]])):
        return [f"{who}: logits are not finite (NaN or inf): a weight or scale in the file is NaN/inf, "
                "or the activations overflow"]
    if m["max_rel_dlogit"] > b["max_rel_dlogit"]:
        out.append(f"{who}: max relative logit error {m['max_rel_dlogit']:.3g} > {b['max_rel_dlogit']:g}")
    if m["kld_mean"] > b["max_kld"]:
        out.append(f"{who}: mean KL divergence {m['kld_mean']:.3g} > {b['max_kld']:g}")
    if m["top1"] < b["min_top1"]:
        out.append(f"{who}: top-1 agreement {m['top1']:.3f} < {b['min_top1']:g}")
    if out and m["rel_dlogit_pos0"] <= b["max_rel_dlogit"] < m["rel_dlogit_rest"]:
        out.append(f"{who}: position 0 agrees with the reference (rel error {m['rel_dlogit_pos0']:.2g}) but later "
                   f"positions do not ({m['rel_dlogit_rest']:.2g}); at position 0 attention sees only the token itself, "
                   "so the difference is in how positions interact: Q/K weights or RoPE (rope.freq_base, "
                   "rope.dimension_count, Q/K row order)")
    return out


def run_verify(gguf_path: str | Path, reference_dir: str | Path, text: str | None = None,
               tokens: int = DEFAULT_TOKENS, engine: str | None = None, bounds: dict | None = None,
               threads: int = 1, activations: str = "ggml") -> dict:
    """Verify `gguf_path` against the checkpoint in `reference_dir`; returns the report (schema in
    the module docstring). `text` is the text itself (default: the bundled default_text.txt);
    `bounds` overrides max_rel_dlogit / max_kld / min_top1. Bad input raises LlmconvError."""
    from ..convert.sources import open_source
    from .reference import reference_logits

    start = time.perf_counter()
    path = Path(gguf_path)
    ref_dir = Path(reference_dir)
    if tokens < 2:
        raise LlmconvError(f"--tokens {tokens}: need at least 2 tokens")
    mf = open_model_file(path)
    source = open_source(ref_dir)
    tok = load_source_tokenizer(ref_dir)
    text = DEFAULT_TEXT.read_text(encoding="utf-8") if text is None else text
    ids = tokenize(tok, text, tokens)
    if len(ids) < 2:
        raise LlmconvError("the text gives fewer than 2 tokens")

    kind = dominant_type(mf)
    b = bounds_for(kind, bounds)
    failures: list[str] = []
    notes: list[str] = []
    if len(ids) < tokens:
        notes.append(f"the text has only {len(ids)} tokens (asked for {tokens})")

    # the embedding may have rows past the tokenizer's tokens (padding): those ids can hold anything
    want_tokens = tok.tokens + [None] * (source.hparams.vocab_size - len(tok.tokens))
    if mf.kind != "gguf":   # legacy files hold token text as their loaders match it, not SentencePiece pieces
        from ..convert.ggml_out import ggjt_vocab
        want_tokens = [text for text, _ in ggjt_vocab(source.vocab)]
    diff_at, diff_msg = first_vocab_difference(mf.tokens, want_tokens)
    if diff_msg:
        failures.append(diff_msg)
    meta = metadata_differences(mf, source.hparams)
    for d in meta:
        failures.append(f"metadata {d['key']} = {_num(d['file'])} in the file, but the checkpoint has {_num(d['source'])}")

    structure_error = None
    cand = m = None
    try:
        read_config(mf)
    except FileInconsistent as e:
        structure_error = e.one_line()
        failures.append(f"the file is not a consistent LLaMA model: {structure_error}")

    ref = reference_logits(ref_dir, ids)
    if structure_error is None:
        cand = candidate_logits(mf, ids, activations=activations)
        m = _with_positions(M.logit_metrics(ref, cand, np.asarray(ids)), ref, cand)
        failures += logit_failures(m, b, "candidate")

    eng = None
    if engine:
        eng = run_engine(engine, path, ids, ref, cand, threads)
        if "error" in eng:
            failures.append(eng["error"])
        else:
            failures += logit_failures(eng["metrics"], b, "llama.cpp")

    rows, tnotes = tensor_errors(mf, source)
    notes += tnotes
    # a source tensor the file lacks changes the model: llama.cpp runs without it (for rope_freqs,
    # LLaMA 3.1's scaled RoPE, only positions far into a long context show the difference)
    for st in source.tensors:
        if st.name not in mf.tensors:
            failures.append(f"tensor {st.name} is in the source checkpoint ({st.source_name}) but not in the file")
    for row in rows:
        bad_rmse = not row["rel_rmse"] <= row["bound_rel_rmse"]
        bad_max = not row["rel_max_err"] <= row["bound_rel_max_err"]
        if not (bad_rmse or bad_max):
            continue
        if row["note"] is None and sum(1 for f in failures if f.startswith("tensor ")) < 4:
            row["note"] = explain_outlier(row, mf, source, source.hparams)
        what = (f"rel RMSE {row['rel_rmse']:.3g} > {row['bound_rel_rmse']:g}" if bad_rmse else
                f"max error {row['rel_max_err']:.3g} of the tensor's max > {row['bound_rel_max_err']:g} "
                "(a block far off: corrupted scale?)")
        failures.append(f"tensor {row['name']} ({row['type']}): {what} against the source weight"
                        + (f"; {row['note']}" if row["note"] else ""))

    return finite_or_none({
        "file": str(path), "file_kind": mf.kind, "reference": str(ref_dir),
        "file_type": file_type_name(mf), "dominant_type": kind, "activations": activations,
        "n_tokens": len(ids), "tokens_match": diff_msg is None, "first_token_diff": diff_at,
        "metadata": meta, "structure_error": structure_error,
        "metrics": m, "engine": eng, "tensors": rows, "bounds": b,
        "passed": not failures, "failures": failures, "notes": notes,
        "seconds": time.perf_counter() - start,
    })


def finite_or_none(obj):
    """The report with every inf/NaN float replaced by None (JSON null), recursively."""
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def _g(v, spec: str) -> str:
    """A report number for the table; null (not finite) prints as "n/a" in the same width."""
    if v is None:
        width = "".join(ch for ch in spec.split(".")[0] if ch.isdigit())
        return f"{'n/a':>{width}s}" if width else "n/a"
    return format(v, spec)


def format_report(r: dict) -> str:
    """The short table `llmconv verify` prints."""
    b = r["bounds"]
    lines = [f"{r['file']}  ({r['dominant_type']}, {r['n_tokens']} tokens)  vs  {r['reference']}"]
    head = f"{'':10s} {'max rel dlogit':>14s} {'KLD mean':>10s} {'KLD p99':>10s} {'top-1':>7s} {'PPL ratio':>10s}"
    lines.append(head)

    def row(who, m):
        return (f"{who:10s} {_g(m['max_rel_dlogit'], '14.3g')} {_g(m['kld_mean'], '10.3g')} "
                f"{_g(m['kld_p99'], '10.3g')} {_g(m['top1'], '7.3f')} {_g(m['ppl_ratio'], '10.4f')}")

    if r["metrics"]:
        lines.append(row("candidate", r["metrics"]))
    eng = r.get("engine")
    if eng and eng.get("metrics"):
        lines.append(row("llama.cpp", eng["metrics"]))
    lines.append(f"{'bound':10s} {_g(b['max_rel_dlogit'], '14.3g')} {_g(b['max_kld'], '10.3g')} {'':10s} "
                 f"{_g(b['min_top1'], '7.3f')}")
    if r["metrics"]:
        lines.append(f"perplexity: reference {_g(r['metrics']['ppl_ref'], '.3f')}, "
                     f"candidate {_g(r['metrics']['ppl_cand'], '.3f')}")
    worst = r["tensors"][:3]
    if worst:
        lines.append("worst tensors: " + ", ".join(f"{t['name']} {t['type']} {_g(t['rel_rmse'], '.3g')}" for t in worst))
    lines.append(f"vocabulary: {'matches' if r['tokens_match'] else 'DIFFERS'}")
    lines += [f"FAIL: {f}" for f in r["failures"]]
    lines.append("PASS" if r["passed"] else f"FAILED ({len(r['failures'])} check(s))")
    return "\n".join(lines)
