"""Compute an importance matrix from the original checkpoint, as llama-imatrix computes it.

llama-imatrix (tools/imatrix) runs the model over calibration text and, for every matrix
multiplication whose weight is a `blk.*` tensor, adds up x**2 over the tokens for each input
column (`in_sum2`) and counts the tokens (`counts`). Its chunking, reproduced here:

  * the whole text is tokenized once, with BOS in front when the model adds one;
  * it is cut into chunks of `ctx` tokens (a remainder is dropped; `--chunks` takes the first N);
  * each chunk is evaluated as its own sequence from position 0, and its first token is
    *replaced* by BOS when the model adds one (so every chunk starts like a fresh prompt:
    without it the statistics differ by an order of magnitude, attention sinks on token 0);
  * every token of every chunk counts (llama-imatrix asks for all logits, so even the last
    layer runs on every row).

The forward pass is llmconv's float32 PyTorch reference over the checkpoint itself (Meta or
Hugging Face layout, verify/reference*.py), run layer by layer: each layer's weights are loaded
once and every chunk of a group goes through it before the next layer is loaded, so memory is
one layer plus the group's activations. The projections' inputs reach us through the
reference's `matmul_input` hook (verify/hooks.py), by the checkpoint's tensor names, mapped to
GGUF names: attn_q/attn_k/attn_v share one input, as do ffn_gate/ffn_up.
"""

from __future__ import annotations

from dataclasses import dataclass
import re
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import LlmconvError, read_text_file
from .files import Imatrix, ImatrixEntry

# The bundled calibration text: ~90 KB of the Jargon File (public domain; the fixtures' corpus)
# followed by short programs in Python, C, JavaScript, SQL and bash written for llmconv.
BUILTIN_TEXT = Path(__file__).with_name("calibration.txt")
BUILTIN_NAME = "builtin"  # --text builtin: the bundled calibration text
MIN_CTX = 16  # llama-imatrix ignores matmuls over fewer rows than this
GROUP_BYTES = 256 << 20  # float32 activations kept per group of chunks


@dataclass
class Calibration:
    chunks: np.ndarray  # int64 [n_chunks, ctx]
    dataset: str  # what imatrix.datasets records


def read_text(text: str | Path) -> tuple[str, str]:
    """(text, dataset name) for a path or `builtin`."""
    if str(text) == BUILTIN_NAME:
        return BUILTIN_TEXT.read_text(encoding="utf-8"), "llmconv:calibration.txt"
    return read_text_file(Path(text)), str(text)


def calibration_chunks(ckpt_dir: str | Path, text: str | Path, ctx: int, chunks: int | None) -> Calibration:
    from ..convert.sources import open_source
    from ..verify.run import load_source_tokenizer

    if ctx < MIN_CTX:
        raise LlmconvError(f"--ctx {ctx}: llama-imatrix collects nothing from fewer than {MIN_CTX} tokens")
    body, dataset = read_text(text)
    vocab = open_source(ckpt_dir).vocab  # first: it says what is wrong with a path that is no checkpoint
    tok = load_source_tokenizer(Path(ckpt_dir))
    bos = vocab.bos_id if vocab.add_bos and vocab.bos_id is not None else None
    ids = ([bos] if bos is not None else []) + [int(t) for t in tok.encode(body)]
    n = len(ids) // ctx if chunks is None else min(chunks, len(ids) // ctx)
    if n < 1:
        raise LlmconvError(
            f"the text has {len(ids)} tokens, fewer than one chunk of --ctx {ctx}",
            file=None if str(text) == BUILTIN_NAME else text,
        )
    arr = np.array(ids[: n * ctx], dtype=np.int64).reshape(n, ctx)
    if bos is not None:
        arr[:, 0] = bos  # llama-imatrix: every chunk starts with BOS
    return Calibration(arr, dataset)


@dataclass
class _Runner:
    """One architecture's pieces of the reference forward pass."""

    n_layers: int
    hidden: int
    embed: Callable  # int64 [T] -> float32 [T, hidden]
    rope: Callable  # T -> (cos, sin)
    layer_weights: Callable  # (i, hooks) -> weights
    block: Callable  # (x, weights, cos, sin) -> x
    gguf_name: Callable  # checkpoint tensor name -> GGUF name (None: not a blk.* projection)


HF_PROJECTIONS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _hf_gguf_name(name: str) -> str | None:
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", name)
    kind = HF_PROJECTIONS.get(m.group(2)) if m else None
    return f"blk.{m.group(1)}.{kind}.weight" if kind else None


def _runner(ckpt_dir: Path) -> _Runner:
    import torch

    from ..convert.sources import detect_format

    if detect_format(ckpt_dir) == "hf":
        from ..convert.hf_files import open_weights, read_json
        from ..verify import reference_hf as R

        c = R.HFConfig(read_json(ckpt_dir / "config.json"), ckpt_dir / "config.json")
        if c.moe is not None:  # llama-imatrix keeps a row per expert (MUL_MAT_ID): not collected here
            raise LlmconvError(
                "llmconv imatrix does not collect expert (MoE) activations yet; "
                "llama-imatrix's file for this model works with --imatrix",
                file=ckpt_dir / "config.json",
            )
        weights, _ = open_weights(ckpt_dir)
        emb = weights["model.embed_tokens.weight"]
        return _Runner(
            c.n_layers,
            c.hidden,
            lambda ids: emb.get()[torch.as_tensor(ids)].to(torch.float32),
            lambda T: R.rotary_cos_sin(c, T),
            lambda i, hooks: R.decoder_layer_weights(weights, i, hooks),
            lambda x, w, cos, sin: R.decoder_layer(x, w, c, cos, sin),
            _hf_gguf_name,
        )
    from ..convert.meta import open_meta_checkpoint
    from ..convert.plan import meta_to_gguf_name
    from ..verify import reference as R

    ckpt = open_meta_checkpoint(ckpt_dir)
    h = ckpt.hparams
    return _Runner(
        h.n_layers,
        h.dim,
        lambda ids: ckpt.load("tok_embeddings.weight")[torch.as_tensor(ids)].to(torch.float32),
        lambda T: R.rope_tables(R.meta_head_dim(ckpt), T, h.rope_theta, R.llama3_scaling(ckpt.params)),
        lambda i, hooks: R.layer_weights(ckpt, i, hooks),
        lambda x, w, cos, sin: R.transformer_block(x, w, h, cos, sin),
        lambda name: meta_to_gguf_name(name) if name.startswith("layers.") else None,
    )


def compute_imatrix(
    ckpt_dir: str | Path,
    text: str | Path = BUILTIN_NAME,
    ctx: int = 512,
    chunks: int | None = None,
    progress: bool = True,
    threads: int | None = None,
) -> Imatrix:
    """llama-imatrix's statistic for every blk.* projection of the checkpoint.
    `threads`: torch's intra-op threads (None: torch's default)."""
    import torch

    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _compute(Path(ckpt_dir), text, ctx, chunks, progress)
    finally:
        torch.set_num_threads(old_threads)


def _compute(ckpt_dir: Path, text: str | Path, ctx: int, chunks: int | None, progress: bool) -> Imatrix:
    import torch
    from tqdm import tqdm

    from ..progress import bar_label, terminal_columns

    cal = calibration_chunks(ckpt_dir, text, ctx, chunks)
    run = _runner(ckpt_dir)
    n_chunks = cal.chunks.shape[0]
    sums: dict[str, torch.Tensor] = {}
    last: list = [None, None]  # attn_q/k/v (ffn_gate/up) share one input: square it once

    def observe(name: str, x: torch.Tensor) -> torch.Tensor:
        gguf = run.gguf_name(name)
        if gguf is not None:
            if last[0] is not x:
                last[0], last[1] = x, (x.to(torch.float64) ** 2).sum(dim=0)
            if gguf in sums:
                sums[gguf] += last[1]
            else:
                sums[gguf] = last[1].clone()
        return x

    from ..verify.hooks import ForwardHooks

    hooks = ForwardHooks(matmul_input=observe)
    group = max(1, GROUP_BYTES // (ctx * run.hidden * 4))
    starts = range(0, n_chunks, group)
    # on a terminal only: no frames in a log
    with (
        torch.inference_mode(),
        tqdm(
            total=len(starts) * run.n_layers,
            unit="layer",
            disable=None if progress else True,
            desc=bar_label(f"imatrix: {n_chunks} chunks of {ctx}", terminal_columns()),
        ) as bar,
    ):
        cos, sin = run.rope(ctx)
        for s0 in starts:
            xs = [run.embed(c) for c in cal.chunks[s0 : s0 + group]]
            for i in range(run.n_layers):
                w = run.layer_weights(i, hooks)
                xs = [run.block(x, w, cos, sin) for x in xs]
                del w  # one layer's float32 weights at a time
                bar.update(1)
        last[0] = last[1] = None
    tokens = n_chunks * ctx
    entries = {
        name: ImatrixEntry(s.to(torch.float32).numpy().reshape(1, -1), np.array([tokens], np.int64))
        for name, s in sorted(sums.items())
    }
    return Imatrix(entries, [cal.dataset], n_chunks, ctx)
