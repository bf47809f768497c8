"""Tiny Mixtral checkpoints in Hugging Face's layout, and an independent float64 forward pass.

`write_hf_mixtral` writes what transformers saves for a MixtralForCausalLM: config.json with
num_local_experts / num_experts_per_tok, safetensors with HF names
(`model.layers.N.block_sparse_moe.gate.weight`, `...experts.E.w1/w2/w3.weight`; Q/K rows in
HF's rotate-half order, which is simply how the random weights are read by the reference),
optionally sharded so that one layer's experts sit in different files, and a real tokenizer:
Mistral's SentencePiece `tokenizer.model.v1` (Mixtral 8x7B's own 32000-token vocabulary,
from the mistral-common package) when it is installed, else the fixture's. Deterministic for
a given seed.

`mixtral_logits` is the reference, written from Mixtral's definition and nothing in llmconv:

    h = embed[tokens]
    per layer:  a = rmsnorm(h); q, k, v = a Wq^T, a Wk^T, a Wv^T
                q, k rotated on pairs (x[i], x[i + hd/2]) ("rotate half", HF's layout)
                h += softmax(q k^T / sqrt(hd) + causal) v Wo^T        (GQA: kv head = j // rep)
                f = rmsnorm(h); p = softmax(f Wgate^T) over the experts
                top-k experts by p; weights p_top / sum(p_top)
                h += sum_e weight_e * W2_e (silu(W1_e f) * W3_e f)
    logits = rmsnorm(h) Wout^T
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from . import FIXTURES

FIXTURE_TOKENIZER = FIXTURES / "tokenizer.model"


def mistral_tokenizer() -> Path | None:
    """Mistral's tokenizer.model.v1 from the mistral-common package (not imported: its
    dependencies are not installed), or None."""
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "tokenizer.model.v1"
    return path if path.is_file() else None


def vocab_size(tokenizer: Path) -> int:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(tokenizer)).vocab_size()


def mixtral_state_dict(
    *,
    dim=256,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    ffn=256,
    n_expert=8,
    vocab=512,
    seed=0,
    dtype=torch.bfloat16,
    router_scale=3.0,
) -> dict[str, torch.Tensor]:
    """Random weights in HF names. `router_scale` spreads the router logits so that the top-k
    choice has clear margins (the reference checks them)."""
    g = torch.Generator().manual_seed(seed)
    hd = dim // n_heads

    def w(rows, cols, scale=1.0):
        return (torch.randn(rows, cols, generator=g) * scale * cols**-0.5).to(dtype)

    def norm():
        return (1 + 0.1 * torch.randn(dim, generator=g)).to(dtype)

    sd = {"model.embed_tokens.weight": w(vocab, dim, dim**0.5 * 0.05)}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        sd[p + "self_attn.q_proj.weight"] = w(n_heads * hd, dim)
        sd[p + "self_attn.k_proj.weight"] = w(n_kv_heads * hd, dim)
        sd[p + "self_attn.v_proj.weight"] = w(n_kv_heads * hd, dim)
        sd[p + "self_attn.o_proj.weight"] = w(dim, n_heads * hd)
        sd[p + "block_sparse_moe.gate.weight"] = w(n_expert, dim, router_scale)
        for e in range(n_expert):
            sd[p + f"block_sparse_moe.experts.{e}.w1.weight"] = w(ffn, dim)
            sd[p + f"block_sparse_moe.experts.{e}.w2.weight"] = w(dim, ffn)
            sd[p + f"block_sparse_moe.experts.{e}.w3.weight"] = w(ffn, dim)
        sd[p + "input_layernorm.weight"] = norm()
        sd[p + "post_attention_layernorm.weight"] = norm()
    sd["model.norm.weight"] = norm()
    sd["lm_head.weight"] = w(vocab, dim)
    return sd


def write_hf_mixtral(
    path: Path,
    *,
    tokenizer: Path | None = None,
    shards: int = 1,
    n_expert: int = 8,
    n_expert_used: int = 2,
    dim: int = 256,
    n_layers: int = 2,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    ffn: int = 256,
    seed: int = 0,
    sd: dict | None = None,
    config: dict | None = None,
) -> Path:
    """Write the checkpoint; with `shards` > 1, tensors are spread round-robin over the
    files, so every layer's experts are split across shards."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer or mistral_tokenizer() or FIXTURE_TOKENIZER
    vocab = vocab_size(tokenizer)
    if sd is None:
        sd = mixtral_state_dict(
            dim=dim,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            ffn=ffn,
            n_expert=n_expert,
            vocab=vocab,
            seed=seed,
        )
    save_safetensors(path, sd, shards)
    cfg = {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "hidden_size": dim,
        "intermediate_size": ffn,
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv_heads,
        "num_local_experts": n_expert,
        "num_experts_per_tok": n_expert_used,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1e6,
        "vocab_size": vocab,
        "max_position_embeddings": 32768,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "sliding_window": None,
        "router_aux_loss_coef": 0.02,
        "output_router_logits": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
    }
    cfg.update(config or {})
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "add_bos_token": True,
                "add_eos_token": False,
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "legacy": True,
                "tokenizer_class": "LlamaTokenizer",
            }
        )
    )
    (path / "tokenizer.model").write_bytes(Path(tokenizer).read_bytes())
    return path


# Hugging Face name (inside a layer) -> Mistral's own (Meta's names; experts keep theirs under feed_forward)
_MISTRAL_LAYER_NAMES = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
    "block_sparse_moe.gate": "feed_forward.gate",
}


def meta_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Q/K rows from HF's rotate-half order back to Meta's adjacent pairs: within a head, HF row
    k < hd/2 is Meta row 2k and HF row hd/2 + k is Meta row 2k + 1."""
    hd = w.shape[0] // n_heads
    return w.view(n_heads, 2, hd // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


def write_mistral_mixtral(hf_dir: Path, path: Path, tokenizer_name: str = "tokenizer.model.v1") -> Path:
    """The Mistral-layout twin of write_hf_mixtral's checkpoint `hf_dir` (what Mistral publishes
    beside it): params.json with a `moe` section, consolidated.safetensors with Meta's names
    (`layers.N.feed_forward.gate`, `layers.N.feed_forward.experts.E.wK`) and Q/K rows in Meta's
    order, and the same SentencePiece model under Mistral's versioned name."""
    from safetensors.torch import load_file, save_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    sd: dict[str, torch.Tensor] = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    out = {
        "tok_embeddings.weight": sd["model.embed_tokens.weight"],
        "norm.weight": sd["model.norm.weight"],
        "output.weight": sd["lm_head.weight"],
    }
    heads = {"self_attn.q_proj": cfg["num_attention_heads"], "self_attn.k_proj": cfg["num_key_value_heads"]}
    for name, t in sd.items():
        parts = name.split(".")
        if parts[:2] != ["model", "layers"]:
            continue
        i, rest = parts[2], ".".join(parts[3:-1])
        new = (
            rest.replace("block_sparse_moe.", "feed_forward.", 1) if ".experts." in rest else _MISTRAL_LAYER_NAMES[rest]
        )
        out[f"layers.{i}.{new}.weight"] = meta_rows(t, heads[rest]) if rest in heads else t.contiguous()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path / "consolidated.safetensors"))
    params = {
        "dim": cfg["hidden_size"],
        "n_layers": cfg["num_hidden_layers"],
        "head_dim": cfg["hidden_size"] // cfg["num_attention_heads"],
        "hidden_dim": cfg["intermediate_size"],
        "n_heads": cfg["num_attention_heads"],
        "n_kv_heads": cfg["num_key_value_heads"],
        "norm_eps": cfg["rms_norm_eps"],
        "vocab_size": cfg["vocab_size"],
        "rope_theta": cfg["rope_theta"],
        "moe": {"num_experts_per_tok": cfg["num_experts_per_tok"], "num_experts": cfg["num_local_experts"]},
    }
    (path / "params.json").write_text(json.dumps(params, indent=2))
    (path / tokenizer_name).write_bytes((hf_dir / "tokenizer.model").read_bytes())
    return path


def save_safetensors(path: Path, sd: dict, shards: int) -> None:
    """One model.safetensors, or `shards` files and their index with tensors dealt round-robin."""
    from safetensors.torch import save_file

    names = sorted(sd)
    if shards == 1:
        save_file({n: sd[n].contiguous() for n in names}, str(path / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for k in range(shards):
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: sd[n].contiguous() for n in names[k::shards]}
        save_file(part, str(path / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _rmsnorm(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def _rotate_half(x, theta):
    """x [T, heads, hd]: pairs (x[i], x[i + hd/2]) rotated by pos * theta^(-2i/hd)."""
    T, _, hd = x.shape
    inv = theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None, :]
    cos, sin = torch.cos(ang)[:, None, :], torch.sin(ang)[:, None, :]
    a, b = x[..., : hd // 2], x[..., hd // 2 :]
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


def mixtral_logits(sd: dict, config: dict, tokens: list[int]) -> tuple[torch.Tensor, float]:
    """(float64 logits [T, vocab], smallest gap between the k-th and (k+1)-th router
    probability over all tokens and layers: how safe the top-k choice is from rounding)."""
    w = {k: v.to(torch.float64) for k, v in sd.items()}
    nh, nkv, eps = config["num_attention_heads"], config["num_key_value_heads"], config["rms_norm_eps"]
    k_used, theta = config["num_experts_per_tok"], config["rope_theta"]
    hd = config["hidden_size"] // nh
    T = len(tokens)
    h = w["model.embed_tokens.weight"][torch.tensor(tokens)]
    causal = torch.triu(torch.full((T, T), float("-inf"), dtype=torch.float64), diagonal=1)
    margin = float("inf")
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = _rmsnorm(h, w[p + "input_layernorm.weight"], eps)
        q = _rotate_half((a @ w[p + "self_attn.q_proj.weight"].T).view(T, nh, hd), theta)
        k = _rotate_half((a @ w[p + "self_attn.k_proj.weight"].T).view(T, nkv, hd), theta)
        v = (a @ w[p + "self_attn.v_proj.weight"].T).view(T, nkv, hd)
        heads = [
            torch.softmax(q[:, j] @ k[:, j // (nh // nkv)].T / hd**0.5 + causal, -1) @ v[:, j // (nh // nkv)]
            for j in range(nh)
        ]
        h = h + torch.cat(heads, -1) @ w[p + "self_attn.o_proj.weight"].T
        f = _rmsnorm(h, w[p + "post_attention_layernorm.weight"], eps)
        probs = torch.softmax(f @ w[p + "block_sparse_moe.gate.weight"].T, -1)
        ranked = torch.sort(probs, -1, descending=True).values
        if k_used < probs.shape[-1]:
            margin = min(margin, float((ranked[:, k_used - 1] - ranked[:, k_used]).min()))
        top_p, top_e = torch.topk(probs, k_used, -1)
        top_p = top_p / top_p.sum(-1, keepdim=True)
        out = torch.zeros_like(h)
        for t in range(T):
            for weight, e in zip(top_p[t], top_e[t].tolist()):
                x = f[t]
                e_ = f"{p}block_sparse_moe.experts.{e}."
                g = x @ w[e_ + "w1.weight"].T
                out[t] += weight * ((g * torch.sigmoid(g) * (x @ w[e_ + "w3.weight"].T)) @ w[e_ + "w2.weight"].T)
        h = h + out
    return _rmsnorm(h, w["model.norm.weight"], eps) @ w["lm_head.weight"].T, margin
