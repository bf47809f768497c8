"""Mistral's own checkpoint layout: params.json + consolidated.safetensors (or
consolidated-0000k-of-0000N.safetensors) + tekken.json or tokenizer.model.vN.

Mistral publishes it beside the Hugging Face layout (llama.cpp reads it with --mistral-format).
What it shares with Meta's original layout, and what not:
  - names are Meta's (`layers.N.attention.wq.weight`, `tok_embeddings.weight`, ...), and Q/K rows
    are in Meta's adjacent-pair RoPE order: nothing is un-permuted (llama.cpp's MistralModel sets
    undo_permute = False);
  - params.json states head_dim (Mistral Nemo: 128 with dim 5120 and 32 heads) and the
    feed-forward size (`hidden_dim`); it usually records no context length;
  - the files are split by tensor, not model-parallel, like Hugging Face shards;
  - the tokenizer is SentencePiece (tokenizer.model.v1/.v3/.v7) or Tekken (tekken.json, a
    tiktoken-style byte-level BPE); llama.cpp's converter writes a built-in chat template name
    by tokenizer version ("mistral-v3", "mistral-v3-tekken", ...) when no chat_template.jinja
    is shipped.
"""

from __future__ import annotations

import re
from pathlib import Path

from gguf import GGUFValueType as T
from gguf import Keys

from ..errors import LlmconvError
from ..formats.gguf_writer import KV
from . import moe
from .hparams import LlamaHParams
from .meta_params import expected_shapes, read_params, stated_head_dim
from .plan import SourceTensor, meta_to_gguf_name
from .tokenizer import Vocab, check_vocab_size, load_sentencepiece_file

# Used when params.json records no context length (most do not): Mistral 7B v0.2/v0.3's.
DEFAULT_CONTEXT = 32768
# Tensors of a vision encoder (Pixtral, Mistral Small 3.1): not part of the text model llama.cpp runs.
_VISION_PREFIXES = ("vision_encoder.", "vision_language_adapter.", "patch_merger.", "pre_mm_projector_norm.")
# params.json sections of models this llama-architecture path cannot describe
_REFUSED = {
    "llama_4_scaling": "llama-4 attention scaling (llama.cpp's mistral3 architecture)",
    "yarn": "YaRN RoPE scaling",
    "quantization": "pre-quantized (fp8) weights",
}
# llama.cpp's built-in chat templates for Mistral tokenizers, by (version, kind)
_CHAT_TEMPLATES = {
    ("v1", "spm"): "mistral-v1",
    ("v1", "tekken"): "mistral-v1",
    ("v3", "spm"): "mistral-v3",
    ("v3", "tekken"): "mistral-v3-tekken",
    ("v7", "spm"): "mistral-v7",
    ("v7", "tekken"): "mistral-v7-tekken",
}


def find_mistral_tokenizer(model_dir: Path, tokenizer: Path | None) -> Path:
    """tekken.json first (as mistral-common does), then the highest tokenizer.model.vN, then a
    plain tokenizer.model; --tokenizer (a file, or a folder searched the same way) wins."""
    folder = model_dir
    if tokenizer is not None:
        if tokenizer.is_file():
            return tokenizer
        if not tokenizer.is_dir():
            raise LlmconvError("--tokenizer: no such file or folder", file=tokenizer)
        folder = tokenizer
    if (folder / "tekken.json").is_file():
        return folder / "tekken.json"
    versioned = sorted(folder.glob("tokenizer.model.v*"), key=lambda p: _version_number(p.name))
    if versioned:
        return versioned[-1]
    if (folder / "tokenizer.model").is_file():
        return folder / "tokenizer.model"
    raise LlmconvError("no tokenizer: expected tekken.json or tokenizer.model.vN (--tokenizer names one)", file=folder)


def _version_number(name: str) -> int:
    m = re.search(r"\.v(\d+)", name)
    return int(m.group(1)) if m else 0


def load_mistral_vocab(path: Path, notes: list[str]) -> tuple[Vocab, list[KV]]:
    """The vocabulary and its chat-template KV, as llama.cpp's converter writes them."""
    if path.suffix == ".json":
        from .tekken import tekken_vocab

        vocab, kind = tekken_vocab(path), "tekken"
        version = _tekken_version(path)
    else:
        vocab, kind = load_sentencepiece_file(path), "spm"
        m = re.search(r"\.(v\d+)", path.name)
        version = m.group(1) if m else "v1"  # plain tokenizer.model: Mistral 7B v0.1's, v1
        if vocab.pad_id is None:
            vocab.pad_id = vocab.eos_id  # MistralVocab's rule: no pad token -> pad with eos
    vocab.add_bos, vocab.add_eos = True, False
    jinja = path.parent / "chat_template.jinja"
    if jinja.is_file():
        return vocab, [KV(Keys.Tokenizer.CHAT_TEMPLATE, jinja.read_text(encoding="utf-8"), T.STRING)]
    name = _CHAT_TEMPLATES.get((version, kind))
    if name is None:
        notes.append(f"no chat template written: llama.cpp has none built in for {kind} tokenizer {version}")
        return vocab, []
    return vocab, [KV(Keys.Tokenizer.CHAT_TEMPLATE, name, T.STRING)]


def _tekken_version(path: Path) -> str:
    from ..errors import load_json

    doc = load_json(path)
    version = (doc.get("config") or {}).get("version") if isinstance(doc, dict) else None
    return version if isinstance(version, str) else "v3"


def open_mistral_source(model_dir: Path, ctx: int | None = None, pre: str | None = None, tokenizer: Path | None = None):
    from .hf import ordered_tensors
    from .hf_files import open_weights
    from .source import Source

    pfile = model_dir / "params.json"
    params = read_params(model_dir)
    for key, what in _REFUSED.items():
        if params.get(key):
            raise LlmconvError(
                f"{key!r}: {what} is not supported by llmconv's llama-architecture conversion", file=pfile
            )
    warnings: list[str] = []
    notes: list[str] = []
    entries, files = open_weights(model_dir, kinds=("consolidated",))
    vision = [n for n in entries if n.startswith(_VISION_PREFIXES)]
    if vision:
        warnings.append(
            f"{len(vision)} vision-encoder tensors dropped (e.g. {vision[0]}): the GGUF holds the text model"
        )
        for n in vision:
            del entries[n]
    if "tok_embeddings.weight" not in entries:
        raise LlmconvError("checkpoint has no tok_embeddings.weight", file=files[0], tensor="tok_embeddings.weight")
    h = _hparams(params, entries, pfile, ctx, warnings)
    tensors = _source_tensors(model_dir, params, entries, h)

    tok_path = find_mistral_tokenizer(model_dir, tokenizer)
    vocab, template_kvs = load_mistral_vocab(tok_path, notes)
    if pre is not None:
        if vocab.model != "gpt2":
            raise LlmconvError("--pre applies to BPE tokenizers; this checkpoint's is SentencePiece", file=tok_path)
        vocab.pre = pre
    check_vocab_size(vocab, h.vocab_size, tok_path, "tok_embeddings.weight")
    return Source(
        "mistral",
        model_dir,
        h,
        vocab,
        ordered_tensors(tensors, h.n_layers),
        extra_kvs=template_kvs,
        warnings=warnings,
        notes=notes,
    )


def _source_tensors(model_dir: Path, params: dict, entries: dict, h: LlamaHParams) -> dict[str, SourceTensor]:
    """GGUF name -> SourceTensor: every checkpoint tensor named, its shape checked against
    params.json; a Mixtral's experts stacked per layer."""
    from .hf import entry_tensor, weight_loader

    pfile = model_dir / "params.json"
    expected = expected_shapes(h.dim, h.n_layers, h.n_heads, h.n_kv_heads, h.ffn_dim, h.vocab_size, h.stated_head_dim)
    tensors = {}
    moe_config = moe.mistral_moe_config(params, pfile)
    if moe_config is not None:  # Mixtral: routers and stacked experts instead of the dense ffn (Meta row order)
        tensors.update(
            moe.stack_experts(
                entries,
                moe_config,
                dim=h.dim,
                ffn=h.ffn_dim,
                n_layers=h.n_layers,
                cfg_file=pfile,
                prefix=moe.MISTRAL_PREFIX,
                expert_loader=lambda e: weight_loader(e, None),
            )
        )
        dense_ffn = {k for k in expected if k.split(".")[-2] in ("w1", "w2", "w3")}
        expected = {k: v for k, v in expected.items() if k not in dense_ffn}
        h.n_expert, h.n_expert_used = moe_config.n_expert, moe_config.n_expert_used
    for name, e in entries.items():
        gguf_name = meta_to_gguf_name(name)
        if gguf_name is None:
            raise LlmconvError("unknown tensor name: no GGUF mapping for it", file=e.file, tensor=name)
        if name not in expected:
            raise LlmconvError(
                f"params.json says {h.n_layers} layers but the checkpoint has more", file=e.file, tensor=name
            )
        if tuple(e.shape) != expected[name]:
            raise LlmconvError(
                f"shape {tuple(e.shape)} but params.json (dim={h.dim}, n_heads={h.n_heads}, "
                f"n_kv_heads={h.n_kv_heads}, head_dim={h.head_dim}, hidden_dim={h.ffn_dim}, "
                f"vocab_size={h.vocab_size}) implies {expected[name]}",
                file=e.file,
                tensor=name,
            )
        tensors[gguf_name] = entry_tensor(gguf_name, e, name)
    for name in expected:
        if name not in entries and not (h.tied_embeddings and name == "output.weight"):
            raise LlmconvError("tensor missing from the checkpoint", file=model_dir, tensor=name)
    return tensors


def _hparams(params: dict, entries: dict, pfile: Path, ctx: int | None, warnings: list[str]) -> LlamaHParams:
    dim, n_layers, n_heads = params["dim"], params["n_layers"], params["n_heads"]
    n_kv = params.get("n_kv_heads") or n_heads
    head_dim = stated_head_dim(params, pfile)
    if (head_dim is None and dim % n_heads) or n_heads % n_kv:
        raise LlmconvError(f"dim {dim}, n_heads {n_heads}, n_kv_heads {n_kv} do not divide", file=pfile)
    rows, cols = entries["tok_embeddings.weight"].shape
    vocab = params.get("vocab_size") or rows
    if vocab != rows or cols != dim:
        raise LlmconvError(
            f"embedding shape {(rows, cols)} but params.json says vocab_size {vocab}, dim {dim}",
            file=pfile,
            tensor="tok_embeddings.weight",
        )
    w1 = entries.get("layers.0.feed_forward.w1.weight") or entries.get("layers.0.feed_forward.experts.0.w1.weight")
    ffn = params.get("hidden_dim") or (w1.shape[0] if w1 is not None else None)
    if not isinstance(ffn, int) or ffn <= 0:
        raise LlmconvError("no feed-forward size: params.json has no hidden_dim and there is no w1", file=pfile)
    if params.get("sliding_window") is not None:
        warnings.append(
            f"sliding_window {params['sliding_window']} dropped: llama.cpp's llama architecture has no "
            f"sliding-window attention; it attends over the whole context"
        )
    context = ctx or params.get("max_seq_len") or params.get("max_position_embeddings")
    if context is None:
        context = DEFAULT_CONTEXT
        warnings.append(f"params.json records no context length: {DEFAULT_CONTEXT} written (--ctx sets it)")
    if not isinstance(context, int) or context <= 0:
        raise LlmconvError(f"context length {context!r} is not a positive integer", file=pfile)
    tied = "output.weight" not in entries
    if tied and params.get("tied_embeddings") is False:
        warnings.append(
            "params.json says tied_embeddings false but there is no output.weight: the output reuses the embedding"
        )
    return LlamaHParams(
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        vocab_size=vocab,
        ffn_dim=ffn,
        norm_eps=float(params.get("norm_eps", 1e-5)),
        rope_theta=float(params.get("rope_theta", 10000.0)),
        context_length=context,
        family="mistral",
        tied_embeddings=tied,
        stated_head_dim=head_dim,
    )
