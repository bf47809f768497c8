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

Expert (Mixtral) layers: llama.cpp multiplies the stacked `ffn_{gate,up,down}_exps` with
MUL_MAT_ID, for which llama-imatrix keeps a row of in_sum2 and a count per expert, summing
each token into the rows of the top-k experts it was routed to (_Statistic below).

The forward pass is llmconv's float32 PyTorch reference over the checkpoint itself (Meta,
Hugging Face or Mistral layout, verify/reference*.py and verify/moe.py, cut into layers by
runners.py), run layer by layer: each layer's weights (experts one at a time) are loaded once
per group of chunks and every chunk of the group goes through it before the next layer is
loaded, so memory is one layer plus the group's activations. The projections' inputs reach us through the
reference's `matmul_input` hook (verify/hooks.py), by the checkpoint's tensor names, mapped to
GGUF names: attn_q/attn_k/attn_v share one input, as do ffn_gate/ffn_up.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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


def calibration_chunks(
    ckpt_dir: str | Path, text: str | Path, ctx: int, chunks: int | None, source=None
) -> Calibration:
    """`source`: the checkpoint's convert Source when already opened (its vocabulary says BOS)."""
    from ..convert.sources import open_source
    from ..verify.run import load_source_tokenizer

    if ctx < MIN_CTX:
        raise LlmconvError(f"--ctx {ctx}: llama-imatrix collects nothing from fewer than {MIN_CTX} tokens")
    body, dataset = read_text(text)
    # first: it says what is wrong with a path that is no checkpoint
    vocab = (source or open_source(ckpt_dir)).vocab
    encode = load_source_tokenizer(Path(ckpt_dir)).encode
    bos = vocab.bos_id if vocab.add_bos and vocab.bos_id is not None else None
    ids = ([bos] if bos is not None else []) + [int(t) for t in encode(body)]
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
    from ..verify.hooks import ForwardHooks
    from .runners import runner

    from ..convert.sources import open_source

    source = open_source(ckpt_dir)  # once: a Tekken or 200k-token vocabulary takes seconds to build
    cal = calibration_chunks(ckpt_dir, text, ctx, chunks, source)
    run = runner(ckpt_dir, source)
    n_chunks = cal.chunks.shape[0]
    stats = _Statistic(run)
    hooks = ForwardHooks(matmul_input=stats.observe)
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
                xs = run.block(i, xs, w, cos, sin, hooks)
                del w  # one layer's float32 weights at a time
                bar.update(1)
    return Imatrix(stats.entries(), [cal.dataset], n_chunks, ctx)


SQUARE_ROWS = 1024  # rows squared in float64 at a time (an expert's ffn-wide input can be large)


def _sum_of_squares(x):
    """float64 [n]: the sum over rows of x**2, a block of rows at a time (the float64 copy of a
    whole ffn-wide input would double the activations' memory)."""
    import torch

    out = torch.zeros(x.shape[-1], dtype=torch.float64)
    for block in x.split(SQUARE_ROWS):
        out += block.to(torch.float64).square().sum(dim=0)
    return out


class _Statistic:
    """in_sum2 and counts per GGUF tensor, fed by the forward pass's matmul_input hook.

    A dense projection has one row, counting every token. A stacked expert tensor has a row per
    expert (llama-imatrix on MUL_MAT_ID): expert e's row sums x**2 over exactly the tokens
    routed to e, and its count is their number. The input is what the expert multiplies:
    gate/up see the routed tokens' normed hidden state, down sees silu(gate x) * up x of those
    tokens (before the routing weight scales the output). An expert no token chose keeps a row
    of zeros and count 0, as llama-imatrix writes it to a GGUF file (llama-quantize then uses
    all-ones importances for it)."""

    def __init__(self, run):
        self.run = run
        self.sums: dict = {}  # GGUF name -> float64 [n_mat, n]
        self.counts: dict[str, np.ndarray] = {}  # GGUF name -> int64 [n_mat]
        self.last: tuple = (None, None)  # attn_q/k/v (gate/up) share one input: square it once

    def observe(self, name: str, x):
        import torch

        target = self.run.target(name)
        if target is None:
            return x
        gguf, expert = target
        if self.last[0] is not x:
            self.last = (x, _sum_of_squares(x))
        if gguf not in self.sums:
            n_mat = 1 if expert is None else self.run.n_expert
            self.sums[gguf] = torch.zeros(n_mat, x.shape[-1], dtype=torch.float64)
            self.counts[gguf] = np.zeros(n_mat, np.int64)
        row = 0 if expert is None else expert
        self.sums[gguf][row] += self.last[1]
        self.counts[gguf][row] += x.shape[0]
        return x

    def entries(self) -> dict[str, ImatrixEntry]:
        import torch

        self.last = (None, None)
        return {
            name: ImatrixEntry(s.to(torch.float32).numpy(), self.counts[name].copy())
            for name, s in sorted(self.sums.items())
        }
