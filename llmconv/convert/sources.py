"""Checkpoint formats: detect which one a directory holds and open it as a Source.

A Source is what the rest of the pipeline needs from any checkpoint: hyperparameters,
the vocabulary, and lazy tensors already named in GGUF terms (in Meta's Q/K layout).
"""

from __future__ import annotations

from pathlib import Path

from gguf import MODEL_TENSOR

from ..errors import LlmconvError
from .tiktoken_bpe import is_tiktoken_file, load_meta_tiktoken
from .guards import check_checkpoint_files, require_regular_file
from .meta import MetaCheckpoint, open_meta_checkpoint
from .meta_params import ffn_formula_warning
from .plan import SourceTensor, meta_to_gguf_name, tensor_name
from .source import Source, explicit_tokenizer
from .rope import llama3_rope_factors_from_params
from .tokenizer import check_vocab_size, load_sentencepiece, load_sentencepiece_file


def detect_format(model_dir: Path) -> str:
    """meta: params.json + consolidated.NN.pth; mistral: params.json + consolidated*.safetensors;
    hf: config.json. Mistral's repositories often hold both their own and the HF layout: the HF
    one is read then (as llama.cpp's converter does without --mistral-format)."""
    has_params = (model_dir / "params.json").is_file()
    has_config = (model_dir / "config.json").is_file()
    if has_params and any(model_dir.glob("consolidated*.safetensors")):
        hf_weights = any(model_dir.glob("model*.safetensors")) or any(model_dir.glob("pytorch_model*.bin"))
        return "hf" if has_config and hf_weights else "mistral"
    if has_params:
        return "meta"
    if has_config:
        return "hf"
    raise LlmconvError(
        "neither params.json (Meta, Mistral) nor config.json (Hugging Face) found: not a checkpoint directory",
        file=model_dir,
    )


INPUT_FORMATS = ("meta", "hf", "mistral")


def check_checkpoint_dir(path: Path) -> None:
    """The usual mistakes get a message that says what to do instead."""
    if path.is_dir():
        return
    if not path.exists():
        raise LlmconvError("no such file or directory", file=path)
    require_regular_file(path)  # a FIFO given as CKPT_DIR would block the open below
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        raise LlmconvError(
            "this is a GGUF file, not a checkpoint directory: to requantize it use "
            "`llmconv quantize IN.gguf [OUT.gguf] TYPE`; to look inside, `llmconv inspect`",
            file=path,
        )
    raise LlmconvError(
        "expected a checkpoint directory (params.json or config.json and the weights), "
        "not a file: pass the folder that holds it",
        file=path,
    )


def open_source(
    model_dir: str | Path,
    input_format: str = "auto",
    ctx: int | None = None,
    pre: str | None = None,
    tokenizer: str | Path | None = None,
) -> Source:
    """Open a checkpoint directory. `pre` overrides tokenizer.ggml.pre for BPE tokenizers;
    `tokenizer` (--tokenizer) is a tokenizer file, or a folder holding one, used instead of the
    checkpoint's own."""
    model_dir = Path(model_dir)
    check_checkpoint_dir(model_dir)
    check_checkpoint_files(model_dir)
    kind = detect_format(model_dir) if input_format == "auto" else input_format
    tokenizer = Path(tokenizer) if tokenizer is not None else None
    if kind == "meta":
        return open_meta_source(model_dir, ctx, pre, tokenizer)
    if kind == "hf":
        from .hf import open_hf_source
        from .hf_files import read_json
        from .llama4 import open_llama4_source
        from .llama4_config import is_llama4

        config = read_json(model_dir / "config.json", required=False)
        opener = open_llama4_source if config is not None and is_llama4(config) else open_hf_source
        src = opener(model_dir, ctx, pre, tokenizer)
        if input_format == "auto" and (model_dir / "params.json").is_file():
            src.notes.append(
                "the folder also holds Mistral's own layout (params.json, consolidated*.safetensors); "
                "read the Hugging Face one (--input-format mistral reads the other)"
            )
        return src
    if kind == "mistral":
        from .mistral import open_mistral_source

        return open_mistral_source(model_dir, ctx, pre, tokenizer)
    raise LlmconvError(f"unknown input format {input_format!r} ({', '.join(INPUT_FORMATS)})", file=model_dir)


def meta_tokenizer_path(model_dir: Path, tokenizer: Path | None, notes: list[str]) -> Path:
    """tokenizer.model: --tokenizer's, the checkpoint's, or the one Meta's download script (LLaMA 1
    and 2) puts beside the model folders (llama/tokenizer.model, llama/llama-2-7b/...)."""
    if tokenizer is not None:
        folder, file = explicit_tokenizer(tokenizer)
        if file is not None:
            return file
        if not (folder / "tokenizer.model").is_file():
            raise LlmconvError("--tokenizer: the folder has no tokenizer.model", file=folder)
        return folder / "tokenizer.model"
    own = model_dir / "tokenizer.model"
    if own.is_file():
        return own
    parent = model_dir.resolve().parent / "tokenizer.model"
    if parent.is_file():
        notes.append(
            f"tokenizer.model is not in the checkpoint folder; using {parent} from the folder above, "
            f"where Meta's download script puts it (--tokenizer names another)"
        )
        return parent
    raise LlmconvError(
        "tokenizer.model is missing (here and in the folder above; --tokenizer names one)", file=model_dir
    )


def open_meta_source(
    model_dir: Path, ctx: int | None = None, pre: str | None = None, tokenizer: Path | None = None
) -> Source:
    ckpt = open_meta_checkpoint(model_dir, ctx=ctx)
    h = ckpt.hparams
    notes: list[str] = []
    tok_path = meta_tokenizer_path(model_dir, tokenizer, notes)
    if is_tiktoken_file(tok_path):  # LLaMA 3.x: tiktoken text, not SentencePiece
        vocab = load_meta_tiktoken(tok_path, ckpt.params)
    elif tok_path.name == "tokenizer.model":
        vocab = load_sentencepiece(tok_path.parent)
    else:
        vocab = load_sentencepiece_file(tok_path)
    if pre is not None:
        if vocab.model != "gpt2":
            raise LlmconvError("--pre applies to BPE tokenizers; this checkpoint's is SentencePiece", file=tok_path)
        vocab.pre = pre
    check_vocab_size(vocab, h.vocab_size, tok_path, "tok_embeddings.weight")
    warnings = [w for w in [ffn_formula_warning(h)] if w]
    tensors = meta_tensors(ckpt)
    factors = llama3_rope_factors_from_params(ckpt.params, h.head_dim, file=model_dir / "params.json")
    if factors is not None:  # LLaMA 3.1+: first, where llama.cpp's converter puts it
        tensors.insert(
            0,
            SourceTensor(
                name=tensor_name(MODEL_TENSOR.ROPE_FREQS),
                shape=tuple(factors.shape),
                load=lambda: factors.copy(),
                files=[model_dir / "params.json"],
                source_name="use_scaled_rope (params.json)",
                source_dtype="f32",
            ),
        )
    return Source("meta", model_dir, h, vocab, tensors, warnings=warnings, notes=notes)


def meta_tensors(ckpt: MetaCheckpoint) -> list[SourceTensor]:
    out = []
    for name in ckpt.names:
        gguf_name = meta_to_gguf_name(name)
        if gguf_name is None:
            raise LlmconvError(
                "unknown tensor name: no GGUF mapping for it", file=ckpt.source_files(name)[0], tensor=name
            )
        out.append(
            SourceTensor(
                name=gguf_name,
                shape=ckpt.shapes[name],
                load=lambda name=name: ckpt.load_f32(name),
                read_rows=ckpt.rows_reader(name),
                prefetch=lambda name=name: ckpt.prefetch(name),
                files=ckpt.source_files(name),
                source_name=name,
                source_dtype=ckpt.dtype_name(name),
            )
        )
    return out
