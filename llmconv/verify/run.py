"""`llmconv verify`: is a converted file the checkpoint it came from (fidelity), and what does
its quantization cost (quality)?

    report = run_verify("Llama-2-7B-Q4_0.gguf", "llama-2-7b/")       # dict, schema in report.py

Steps:
  1. open the file (all parts of a split model) and the checkpoint; refuse a checkpoint that is
     not this file's model (vocabulary size or embedding shape differ: exit 2);
  2. tokenize the text with the checkpoint's own tokenizer; compare the file's vocabulary id by
     id and every behaviour-changing metadata key with the checkpoint (metadata_check.py);
  3. three forward passes on the same tokens: the float reference (reference.py, PyTorch, the
     checkpoint's layout), the expected pass (the same with each weight round-tripped at the
     file's type, expected.py, which also compares every tensor's bytes with llmconv's
     quantization of its source), and the candidate (candidate.py, numpy, the file alone);
  4. fidelity: candidate vs expected, against FIDELITY_BOUNDS (bounds.py), gated;
     quality: candidate vs reference, shown beside llama.cpp's published figures, gated only
     on the bounds the caller gives;
  5. the verdict: the first failure in CHECK_ORDER (report.py), with its cause where the numbers
     show one (tensor_causes.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import LlmconvError
from . import metrics as M
from .bounds import FIDELITY_BOUNDS, dominant_type, file_type_name, published_figures, quality_gates
from .bounds import LOGIT_BOUNDS, TENSOR_BOUNDS, type_name  # noqa: F401  (re-exported: the tests read them here)
from .candidate import candidate_streams
from .model_file import FileInconsistent, ModelFile, open_model_file, read_config
from .llama4 import expert_names as llama4_expert_names
from .moe import hf_expert_names
from .expected import ExpectedWeights, TensorCheck, compare_rest, rotate_half_order
from .findings import fidelity_logit_findings, quality_findings, tensor_findings
from .hooks import ForwardHooks
from .metadata_check import metadata_differences, unknown_pre
from .report import Finding, finite_or_none, format_report, ordered  # noqa: F401  (format_report: the CLI's)
from .tokens import first_vocab_difference, load_source_tokenizer, tokenize

DEFAULT_TEXT = Path(__file__).with_name("default_text.txt")
DEFAULT_TOKENS = 256


def need_engine(engine: str | None):
    """The llama.cpp module, checked before any forward pass runs."""
    if engine is None:
        return None
    if engine not in ("llama.cpp", "llama_cpp", "llamacpp"):
        raise LlmconvError(f"unknown engine {engine!r} (llama.cpp)")
    try:
        import llama_cpp
    except ImportError:
        raise LlmconvError("--engine llama.cpp needs llama-cpp-python (pip install llama-cpp-python)") from None
    except Exception as e:  # installed but broken: llama_cpp raises RuntimeError/OSError when libllama does not load
        raise LlmconvError(
            f"--engine llama.cpp: llama-cpp-python is installed but does not load: {type(e).__name__}: {e}"
        ) from None
    return llama_cpp


def same_model_or_refuse(mf: ModelFile, source) -> None:
    """A reference that is not this file's model cannot verify it: its vocabulary size or
    embedding shape differ (a different model, or a different size of the same family)."""
    emb = mf.tensors.get("token_embd.weight")
    want = next((t for t in source.tensors if t.name == "token_embd.weight"), None)
    if emb is None or want is None:
        return  # the structure check reports a missing embedding
    if tuple(emb.shape) != tuple(want.shape):
        raise LlmconvError(
            f"this reference is not the model of this file: its embedding is {tuple(want.shape)} "
            f"(vocabulary x width), the file's {tuple(emb.shape)}",
            file=source.path,
        )


def source_names(source, mf: ModelFile) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """Checkpoint tensor name -> GGUF name, and the row order of HF Q/K (rotate-half)."""
    names = {t.source_name: t.name for t in source.tensors if t.source_name}
    names |= hf_expert_names(source)  # expert -> (stacked tensor, index)
    names |= llama4_expert_names(source)
    orders: dict[str, np.ndarray] = {}
    if source.kind == "hf" and source.hparams.arch != "llama4":  # Llama 4 stores Q/K in Meta's order
        h = source.hparams
        for t in source.tensors:
            kind = t.name.split(".")[-2] if t.name.startswith("blk.") else ""
            if kind in ("attn_q", "attn_k"):
                orders[t.name] = rotate_half_order(t.shape[0], h.n_heads if kind == "attn_q" else h.n_kv_heads)
    return names, orders


def with_positions(m: dict, ref: np.ndarray, cand: np.ndarray) -> dict:
    per = M.rel_dlogit_per_position(ref, cand)
    m["rel_dlogit_pos0"] = float(per[0])
    m["rel_dlogit_rest"] = float(per[1:].max()) if len(per) > 1 else 0.0
    return m


def compare_logits(a: np.ndarray, b: np.ndarray, ids: list[int]) -> dict:
    return with_positions(M.logit_metrics(a, b, np.asarray(ids)), a, b)


def engine_logits(llama_cpp, path: Path, tokens: list[int], threads: int) -> np.ndarray:
    llm = llama_cpp.Llama(
        str(path),
        n_ctx=max(len(tokens), 16),
        n_batch=max(len(tokens), 16),
        n_ubatch=max(len(tokens), 16),
        logits_all=True,
        type_k=0,
        type_v=0,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    try:
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float32)
    finally:
        llm.close() if hasattr(llm, "close") else None


def lora_hooks(source, lora) -> Callable[[ForwardHooks | None], ForwardHooks | None]:
    """verify --lora: merge the adapters into `source`'s tensors, and return a function that puts them
    in front of a reference pass's weight hook. Without adapters, hooks pass through unchanged."""
    if not lora:
        return lambda hooks: hooks
    from ..convert.lora import apply_adapters, checkpoint_weight_hook

    merge = checkpoint_weight_hook(apply_adapters(source, lora))

    def adapted(hooks: ForwardHooks | None) -> ForwardHooks:
        if hooks is None or hooks.weight is None:
            return ForwardHooks(weight=merge, matmul_input=hooks.matmul_input if hooks else None)
        return ForwardHooks(
            weight=lambda n, w, rows: hooks.weight(n, merge(n, w, rows), rows), matmul_input=hooks.matmul_input
        )

    return adapted


# ---- the run ----------------------------------------------------------------------------------


@dataclass
class Run:
    """What one verification has opened, computed and found so far."""

    path: Path
    ref_dir: Path
    mf: ModelFile
    source: object
    ids: list[int]
    gates: dict
    activations: str
    threads: int
    progress: bool
    start: float
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    tokens_diff: tuple[int | None, str | None] = (None, None)
    metadata: list = field(default_factory=list)
    structure_error: str | None = None
    imatrix: object = None
    checks: dict[str, TensorCheck] = field(default_factory=dict)
    fidelity: dict | None = None  # candidate vs expected
    quality: dict | None = None  # candidate vs reference
    engine: dict | None = None
    engine_fidelity: dict | None = None
    engine_quality: dict | None = None
    adapted: Callable = field(default=lambda hooks: hooks)  # LoRA adapters in front of a pass's hooks (lora_hooks)


def run_verify(
    gguf_path: str | Path,
    reference_dir: str | Path,
    text: str | None = None,
    tokens: int = DEFAULT_TOKENS,
    engine: str | None = None,
    bounds: dict | None = None,
    threads: int = 1,
    activations: str = "ggml",
    ctx: int | None = None,
    progress: bool = False,
    imatrix=None,
    lora=(),
) -> dict:
    """Verify `gguf_path` against the checkpoint in `reference_dir`; returns the report (schema in
    report.py). `text` is the text itself (default: the bundled default_text.txt); `bounds` are the
    quality gates (max_kld, min_top1, max_ppl_ratio, max_rel_dlogit; None = not gated); `ctx` the
    context length the file was converted with (convert --ctx); `activations` how the quality
    candidate rounds activations ("ggml": as llama.cpp's CPU backend; fidelity is always float32).
    `lora`: the (adapter dir, scale) pairs the file was converted with (convert --lora), applied to
    the source tensors and to the weights of both reference passes. Bad input raises LlmconvError."""
    from ..convert.sources import open_source

    start = time.perf_counter()
    path, ref_dir = Path(gguf_path), Path(reference_dir)
    if tokens < 2:
        raise LlmconvError(f"--tokens {tokens}: need at least 2 tokens")
    gates = quality_gates(bounds)
    llama_cpp = need_engine(engine)
    mf = open_model_file(path)
    source = open_source(ref_dir, ctx=ctx)
    adapted = lora_hooks(source, lora)
    same_model_or_refuse(mf, source)
    tok = load_source_tokenizer(ref_dir)
    ids = tokenize(tok, DEFAULT_TEXT.read_text(encoding="utf-8") if text is None else text, tokens)
    if len(ids) < 2:
        raise LlmconvError("the text gives fewer than 2 tokens")
    run = Run(path, ref_dir, mf, source, ids, gates, activations, threads, progress, start, adapted=adapted)
    run.imatrix = imatrix  # the Imatrix the file was quantized with: the expected pass uses it too
    if len(ids) < tokens:
        run.notes.append(f"the text has only {len(ids)} tokens (asked for {tokens})")
    static_checks(run, tok)
    ref, expected = reference_passes(run)
    candidate_pass(run, ref, expected)
    if llama_cpp is not None:
        engine_pass(run, llama_cpp, ref, expected)
    run.notes += reference_notes(run.quality, len(mf.tokens or []) or ref.shape[-1])
    return assemble(run)


def static_checks(run: Run, tok) -> None:
    """Vocabulary, metadata and structure: what needs no forward pass."""
    run.tokens_diff = vocabulary_check(run.mf, run.source, tok)
    if run.tokens_diff[1]:
        run.findings.append(Finding("fidelity", "vocabulary", run.tokens_diff[1]))
    run.metadata = metadata_differences(run.mf, run.source)
    run.findings += [Finding("fidelity", "metadata", d.message(), subject=d.key) for d in run.metadata if d.failure]
    run.notes += [d.message() for d in run.metadata if not d.failure]
    pre = unknown_pre(run.mf)
    if pre:
        run.findings.append(Finding("fidelity", "metadata", pre, subject="tokenizer.ggml.pre"))
    try:
        read_config(run.mf)
    except FileInconsistent as e:
        run.structure_error = e.one_line()
        run.findings.append(
            Finding("fidelity", "structure", f"the file is not a consistent LLaMA model: {run.structure_error}")
        )


def reference_passes(run: Run) -> tuple[np.ndarray, np.ndarray]:
    """The float reference and the expected pass; the expected pass also compares every tensor."""
    from .reference import reference_logits

    ref = reference_logits(run.ref_dir, run.ids, hooks=run.adapted(None), progress=run.progress, desc="reference")
    names, orders = source_names(run.source, run.mf)
    exp = ExpectedWeights(run.mf, names, orders, "f32", run.threads, run.imatrix)
    expected = reference_logits(
        run.ref_dir, run.ids, hooks=run.adapted(exp.hooks()), progress=run.progress, desc="expected"
    )
    compare_rest(run.mf, run.source, exp.checks, run.threads)
    run.checks = exp.checks
    source_names_all = {t.name for t in run.source.tensors}
    for st in run.source.tensors:
        if st.name not in run.mf.tensors:
            run.findings.append(
                Finding(
                    "fidelity",
                    "missing_tensor",
                    f"tensor {st.name} is in the source checkpoint ({st.source_name}) but not in the file",
                    subject=st.name,
                )
            )
    run.notes += [
        f"{n}: not in the source checkpoint, not compared" for n in run.mf.tensors if n not in source_names_all
    ]
    worst = sorted(exp.checks.values(), key=lambda c: (-(c.rel_rmse if np.isfinite(c.rel_rmse) else np.inf), c.name))
    found, notes = tensor_findings(worst, run.mf, run.source)
    run.findings += found
    run.notes += notes
    return ref, expected


def candidate_pass(run: Run, ref: np.ndarray, expected: np.ndarray) -> None:
    if run.structure_error is not None:
        return
    # fidelity in float32 activations on both sides: what is left is summation order alone (rounding
    # activations to q8 codes would turn those 1e-7 differences into whole-code flips that grow with depth)
    cand = candidate_streams(run.mf, run.ids, tuple(dict.fromkeys(("f32", run.activations))), progress=run.progress)
    run.fidelity = compare_logits(expected, cand["f32"], run.ids)
    run.quality = compare_logits(ref, cand[run.activations], run.ids)
    run.findings += fidelity_logit_findings(run.fidelity, "candidate", quiet_elsewhere=not run.findings)
    run.findings += quality_findings(run.quality, run.gates, "candidate")


def engine_pass(run: Run, llama_cpp, ref: np.ndarray, expected: np.ndarray) -> None:
    run.engine = {"name": "llama.cpp", "version": getattr(llama_cpp, "__version__", None)}
    try:
        logits = engine_logits(llama_cpp, run.path, run.ids, run.threads)
    except Exception as e:  # llama.cpp refuses the file: that is a finding, not a crash
        run.engine["error"] = (
            f"llama.cpp could not load or run the file: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        )
        run.findings.append(Finding("fidelity", "engine", run.engine["error"]))
        return
    run.engine_fidelity = compare_logits(expected, logits, run.ids)
    run.engine_quality = compare_logits(ref, logits, run.ids)
    run.findings += quality_findings(run.engine_quality, run.gates, "llama.cpp")


def vocabulary_check(mf: ModelFile, source, tok):
    # the embedding may have rows past the tokenizer's tokens (padding): those ids can hold anything
    want_tokens = tok.tokens + [None] * (source.hparams.vocab_size - len(tok.tokens))
    if mf.kind != "gguf":  # legacy files hold token text as their loaders match it, not SentencePiece pieces
        from ..convert.ggml_out import ggjt_vocab

        want_tokens = [text for text, _ in ggjt_vocab(source.vocab)]
    return first_vocab_difference(mf.tokens, want_tokens)


def reference_notes(m: dict | None, n_vocab: int) -> list[str]:
    """Say so when the quality figures mean little: a reference that predicts the text barely
    better than a uniform guess over its vocabulary has random (untrained) weights."""
    if not m or not np.isfinite(m["ppl_ref"]) or m["ppl_ref"] < n_vocab / 8:
        return []
    return [
        f"the reference's perplexity on this text is {m['ppl_ref']:.0f} over a {n_vocab}-token vocabulary: "
        "its weights look untrained (random), so the quality figures say little about a real model"
    ]


def assemble(run: Run) -> dict:
    """The report dict (schema in report.py)."""
    findings = ordered(run.findings)
    failures = [f.message for f in findings if f.failure]
    checks = M.worst_first([c.as_dict() for c in run.checks.values()])
    mf = run.mf
    file_type = file_type_name(mf.get("general.file_type"))
    return finite_or_none(
        {
            "file": str(run.path),
            "file_kind": mf.kind,
            "reference": str(run.ref_dir),
            "file_type": file_type,
            "dominant_type": dominant_type(mf.tensors.values()),
            "activations": run.activations,
            "n_tokens": len(run.ids),
            "tokens_match": run.tokens_diff[1] is None,
            "first_token_diff": run.tokens_diff[0],
            "metadata": [d.as_dict() for d in run.metadata],
            "structure_error": run.structure_error,
            "tensors": checks,
            "fidelity": {
                "passed": not any(f.part == "fidelity" and f.failure for f in findings),
                "bounds": {"max_rel_dlogit": FIDELITY_BOUNDS.max_rel_dlogit, "max_kld": FIDELITY_BOUNDS.max_kld},
                "metrics": run.fidelity,
                "engine": run.engine_fidelity,
                "tensors_identical": sum(1 for c in checks if c["exact"] and not c["blocks_differ"]),
                "tensors_differ": sum(1 for c in checks if c["blocks_differ"]),
            },
            "quality": {
                "gates": run.gates,
                "passed": not any(f.part == "quality" for f in findings),
                "metrics": run.quality,
                "engine": run.engine_quality,
                "published": published_figures(file_type),
            },
            "engine": run.engine,
            "findings": [f.as_dict() for f in findings],
            "verdict": failures[0] if failures else "PASS",
            "passed": not failures,
            "failures": failures,
            "notes": run.notes,
            "seconds": time.perf_counter() - run.start,
        }
    )
