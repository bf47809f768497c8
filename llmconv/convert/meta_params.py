"""A Meta checkpoint's params.json: read, turned into hyperparameters and checked against the
tensors' shapes (meta.py opens the shards; Mistral's own layout and HF configs reuse the shape
table and the head_dim rule)."""

from __future__ import annotations

from pathlib import Path

from ..errors import LlmconvError, load_json
from .hparams import CONTEXT_BY_FAMILY, LlamaHParams, meta_family, meta_ffn_dim


def read_params(path: Path) -> dict:
    p = path / "params.json"
    if not p.is_file():
        raise LlmconvError("params.json is missing: not a Meta checkpoint directory", file=path)
    params = load_json(p)
    if not isinstance(params, dict):
        raise LlmconvError("expected a JSON object", file=p)
    for key in ("dim", "n_layers", "n_heads"):
        if not isinstance(params.get(key), int) or params[key] <= 0:
            raise LlmconvError(f"key {key!r} missing or not a positive integer", file=p)
    return params


def meta_hparams(params: dict, shapes: dict, path: Path, ctx: int | None) -> LlamaHParams:
    """The hyperparameters of the Meta checkpoint at `path`: params.json, checked against every
    tensor's shape (`shapes`: name -> the merged shape), the feed-forward size taken from them."""
    pfile = path / "params.json"
    if "tok_embeddings.weight" not in shapes:
        raise LlmconvError("checkpoint has no tok_embeddings.weight", file=path, tensor="tok_embeddings.weight")
    emb_rows, emb_cols = shapes["tok_embeddings.weight"]
    dim = params["dim"]
    if emb_cols != dim:
        raise LlmconvError(
            f"embedding width {emb_cols} != params.json dim {dim}", file=pfile, tensor="tok_embeddings.weight"
        )
    vocab = params.get("vocab_size", -1)
    if vocab is None or vocab <= 0:
        vocab = emb_rows
    elif vocab != emb_rows:
        raise LlmconvError(
            f"vocab_size {vocab} != embedding rows {emb_rows}", file=pfile, tensor="tok_embeddings.weight"
        )
    n_heads = params["n_heads"]
    n_kv = params.get("n_kv_heads") or n_heads
    head_dim = stated_head_dim(params, pfile)
    if (head_dim is None and dim % n_heads) or n_heads % n_kv:
        raise LlmconvError(f"dim {dim}, n_heads {n_heads}, n_kv_heads {n_kv} do not divide", file=pfile)
    n_layers = params["n_layers"]
    _check_layer_count(shapes, n_layers, pfile)
    w1 = shapes.get("layers.0.feed_forward.w1.weight")
    if w1 is None:
        raise LlmconvError(
            "checkpoint has no feed-forward weights", file=path, tensor="layers.0.feed_forward.w1.weight"
        )
    ffn = _feed_forward_size(shapes, n_layers)
    expected = expected_shapes(dim, n_layers, n_heads, n_kv, ffn, vocab, head_dim)
    for name, shape in shapes.items():
        want = expected.get(name)
        if want is not None and shape != want:  # an unknown name is reported by the name mapping, with its shard
            raise LlmconvError(
                f"shape {shape} but params.json (dim={dim}, n_heads={n_heads}, n_kv_heads={n_kv}"
                f"{f', head_dim={head_dim}' if head_dim else ''}) "
                f"and ffn={ffn} imply {want}",
                file=pfile,
                tensor=name,
            )
    family = meta_family(params, vocab)
    return LlamaHParams(
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        vocab_size=vocab,
        ffn_dim=ffn,
        norm_eps=float(params.get("norm_eps", 1e-5)),
        rope_theta=float(params.get("rope_theta", 10000.0)),
        context_length=ctx or CONTEXT_BY_FAMILY[family],
        family=family,
        multiple_of=params.get("multiple_of"),
        ffn_dim_multiplier=params.get("ffn_dim_multiplier"),
        tied_embeddings="output.weight" not in shapes,
        stated_head_dim=head_dim,
    )


def _check_layer_count(shapes: dict, n_layers: int, pfile: Path) -> None:
    for i in range(n_layers):
        if f"layers.{i}.attention.wq.weight" not in shapes:
            raise LlmconvError(
                f"params.json says {n_layers} layers but layer {i} is missing",
                file=pfile,
                tensor=f"layers.{i}.attention.wq.weight",
            )
    if f"layers.{n_layers}.attention.wq.weight" in shapes:
        raise LlmconvError(
            f"params.json says {n_layers} layers but the checkpoint has more",
            file=pfile,
            tensor=f"layers.{n_layers}.attention.wq.weight",
        )


def _feed_forward_size(shapes: dict, n_layers: int) -> int:
    """params.json does not state it: the size most w1/w3 rows and w2 columns agree on, so the
    one tensor that differs (a damaged or mis-joined shard) is the one the shape check names."""
    sizes = []
    for i in range(n_layers):
        p = f"layers.{i}.feed_forward."
        sizes += [shapes[p + n][0] for n in ("w1.weight", "w3.weight") if len(shapes.get(p + n, ())) == 2]
        sizes += [shapes[p + "w2.weight"][1]] if len(shapes.get(p + "w2.weight", ())) == 2 else []
    return max(sizes, key=sizes.count)


def stated_head_dim(params: dict, file: Path, key: str = "head_dim") -> int | None:
    """head_dim when the config states it (Mistral's params.json always does; Nemo's 128 is not
    dim / n_heads). RoPE rotates pairs, so it must be even."""
    hd = params.get(key)
    if hd is None:
        return None
    if not isinstance(hd, int) or isinstance(hd, bool) or hd <= 0 or hd % 2:
        raise LlmconvError(f"{key} {hd!r} is not a positive even integer", file=file)
    return hd


def expected_shapes(dim, n_layers, n_heads, n_kv, ffn, vocab, head_dim=None) -> dict[str, tuple[int, ...]]:
    hd = head_dim or dim // n_heads
    out = {"tok_embeddings.weight": (vocab, dim), "norm.weight": (dim,), "output.weight": (vocab, dim)}
    for i in range(n_layers):
        p = f"layers.{i}."
        out.update(
            {
                p + "attention.wq.weight": (n_heads * hd, dim),
                p + "attention.wk.weight": (n_kv * hd, dim),
                p + "attention.wv.weight": (n_kv * hd, dim),
                p + "attention.wo.weight": (dim, n_heads * hd),
                p + "feed_forward.w1.weight": (ffn, dim),
                p + "feed_forward.w3.weight": (ffn, dim),
                p + "feed_forward.w2.weight": (dim, ffn),
                p + "attention_norm.weight": (dim,),
                p + "ffn_norm.weight": (dim,),
            }
        )
    return out


def ffn_formula_warning(h: LlamaHParams) -> str | None:
    """Meta's formula vs the w1 shape; a mismatch is reported, not fatal (fine-tunes resize)."""
    if not h.multiple_of:
        return None
    want = meta_ffn_dim(h.dim, h.multiple_of, h.ffn_dim_multiplier)
    if want != h.ffn_dim:
        return f"feed-forward size {h.ffn_dim} (from w1) differs from Meta's formula ({want}); using {h.ffn_dim}"
    return None
