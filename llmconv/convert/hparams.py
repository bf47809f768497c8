"""Model hyperparameters, and the rules that fill in what a checkpoint leaves out."""

from __future__ import annotations

from dataclasses import dataclass

ARCH = "llama"  # general.architecture of every model llmconv writes


@dataclass
class LlamaHParams:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    ffn_dim: int
    norm_eps: float
    rope_theta: float
    context_length: int
    family: str  # "llama-1", "llama-2", "code-llama", "llama-3", ...
    multiple_of: int | None = None
    ffn_dim_multiplier: float | None = None
    tied_embeddings: bool = False
    # head_dim as config.json / params.json states it (Mistral Nemo: 128 with dim 5120 and 32 heads);
    # None when the checkpoint does not say, and then it is dim / n_heads
    stated_head_dim: int | None = None
    # mixture of experts (Mixtral): experts per layer and experts each token uses; 0 when dense
    n_expert: int = 0
    n_expert_used: int = 0
    arch: str = "llama"  # general.architecture: "llama", or "llama4" (convert/llama4.py)

    @property
    def head_dim(self) -> int:
        return self.stated_head_dim or self.dim // self.n_heads

    @property
    def rope_dim(self) -> int:
        return self.head_dim


def meta_ffn_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None = None) -> int:
    """Meta's FeedForward hidden size, as model.py computes it; without a multiplier also what a
    ggjt loader derives from n_embd and n_mult (in integer arithmetic, as the C loader)."""
    hidden = 2 * (4 * dim) // 3
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


# Context length of Meta's original checkpoints, which params.json does not record.
# The family is recognised from what params.json does hold:
#   rope_theta == 1e6                      -> Code Llama      16384
#   use_scaled_rope                        -> LLaMA 3.1/3.2  131072
#   vocab_size >= 128000 or theta 500000   -> LLaMA 3          8192
#   norm_eps == 1e-6                       -> LLaMA 1          2048
#   otherwise                              -> LLaMA 2          4096
# `--ctx` on the command line always wins.
CONTEXT_BY_FAMILY = {
    "llama-1": 2048,
    "llama-2": 4096,
    "code-llama": 16384,
    "llama-3": 8192,
    "llama-3.1": 131072,
}


def meta_family(params: dict, vocab_size: int) -> str:
    if float(params.get("rope_theta", 10000.0)) == 1e6 and vocab_size < 128000:
        return "code-llama"
    # only LLaMA 3.1+ sets use_scaled_rope, and only LLaMA 3 uses theta 500000 (small test
    # checkpoints with a LLaMA 3 layout have far fewer than 128000 tokens)
    if params.get("use_scaled_rope"):
        return "llama-3.1"
    if vocab_size >= 128000 or float(params.get("rope_theta", 10000.0)) == 500000.0:
        return "llama-3"
    if float(params.get("norm_eps", 1e-5)) == 1e-6:
        return "llama-1"
    return "llama-2"
