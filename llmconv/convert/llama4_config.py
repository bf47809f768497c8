"""Llama 4's text config (config.json, or its text_config) for llama4.py, checked against what
llama.cpp's llama4 graph can run: the settings it hard-codes are refused when a checkpoint says
otherwise, naming the key. Also the layer rules both the converter and verify follow (which
layers are MoE, which use RoPE)."""

from __future__ import annotations

from pathlib import Path

from gguf import GGUFValueType as T
from gguf import Keys, MODEL_TENSOR

from ..errors import LlmconvError
from ..formats.gguf_writer import KV
from .hparams import LlamaHParams
from .plan import tensor_name

ARCH = "llama4"
ARCHITECTURES = ("Llama4ForConditionalGeneration", "Llama4ForCausalLM")

# What llama.cpp's llama4 graph hard-codes (src/models/llama4.cpp, llama-hparams.h).
NO_ROPE_STEP = 4  # n_no_rope_layer_step: layers 3, 7, 11, ... have no RoPE
CHUNK_SIZE = 8192  # n_swa of LLAMA_SWA_TYPE_CHUNKED, on the RoPE layers
TEMP_FLOOR_SCALE = 8192  # n_attn_temp_floor_scale
TEMP_SCALE = 0.1  # f_attn_temp_scale
NO_QK_NORM_EXPERTS = 128  # use_kq_norm = type != 17B_128E (Maverick)


def is_llama4(config: dict) -> bool:
    archs = config.get("architectures")
    return isinstance(archs, list) and any(a in ARCHITECTURES for a in archs)


def is_moe_layer(layer: int, step: int) -> bool:
    """llama.cpp: (i + 1) % n_moe_layer_step == 0; HF: moe_layers = range(step - 1, n, step)."""
    return step > 0 and (layer + 1) % step == 0


def uses_rope(layer: int) -> bool:
    """RoPE, chunked attention and the QK-norm on three layers of four; the fourth has none of
    them and gets the attention temperature instead (HF: no_rope_layers[i] == 1 means RoPE)."""
    return (layer + 1) % NO_ROPE_STEP != 0


class Llama4Config:
    """The text model's settings, checked against what llama.cpp's llama4 graph can run."""

    def __init__(self, config: dict, file: Path):
        from .hf_config import _int

        self.file = file
        self.multimodal = "text_config" in config
        text = config.get("text_config", config)
        if not isinstance(text, dict):
            raise LlmconvError("text_config is not an object", file=file)
        self.text = text
        self.prefix = "language_model.model." if self.multimodal else "model."
        self.lm_head = ("language_model." if self.multimodal else "") + "lm_head.weight"
        self.dim = _int(text, "hidden_size", file)
        self.n_layers = _int(text, "num_hidden_layers", file)
        self.n_heads = _int(text, "num_attention_heads", file)
        self.n_kv_heads = _int(text, "num_key_value_heads", file, default=self.n_heads)
        self.head_dim = _int(text, "head_dim", file, default=128)  # HF's default when absent
        self.ffn_moe = _int(text, "intermediate_size", file)
        self.ffn_dense = _int(text, "intermediate_size_mlp", file)
        self.n_expert = _int(text, "num_local_experts", file)
        self.n_expert_used = _int(text, "num_experts_per_tok", file, default=1)
        self.moe_step = _int(text, "interleave_moe_layer_step", file, default=1)
        self.vocab_size = _int(text, "vocab_size", file)
        self.eps = float(text.get("rms_norm_eps", 1e-5))
        if self.n_heads % self.n_kv_heads or self.head_dim % 2:
            raise LlmconvError(
                f"num_attention_heads {self.n_heads}, num_key_value_heads {self.n_kv_heads}, "
                f"head_dim {self.head_dim}: not an even head size shared evenly",
                file=file,
            )
        if self.n_expert_used > self.n_expert:
            raise LlmconvError(
                f"num_experts_per_tok {self.n_expert_used} > num_local_experts {self.n_expert}", file=file
            )
        self._check_fixed_settings()

    def _refuse(self, key: str, have, want) -> None:
        raise LlmconvError(
            f"text_config {key} is {have!r}, but llama.cpp's llama4 architecture fixes it to {want!r}: "
            f"the model would run differently there",
            file=self.file,
        )

    def _check_fixed_settings(self) -> None:
        t, n = self.text, self.n_layers
        if t.get("hidden_act", "silu") != "silu":
            self._refuse("hidden_act", t["hidden_act"], "silu")
        if t.get("attention_bias"):
            self._refuse("attention_bias", t["attention_bias"], False)
        if t.get("quantization_config") is not None:
            raise LlmconvError(
                "quantization_config: pre-quantized (fp8, ...) weights are not supported", file=self.file
            )
        # lists are compared item by item against the rule, never built from n (a config may claim 10**9 layers)
        moe_layers = t.get("moe_layers")
        if moe_layers is not None and (
            not isinstance(moe_layers, list)
            or len(moe_layers) != n // self.moe_step
            or any(x != (k + 1) * self.moe_step - 1 for k, x in enumerate(moe_layers))
        ):
            self._refuse("moe_layers", moe_layers, f"every {self.moe_step}th layer (interleave_moe_layer_step)")
        no_rope = t.get("no_rope_layers")
        if no_rope and (
            not isinstance(no_rope, list)
            or len(no_rope) != n
            or any(x != int(uses_rope(i)) for i, x in enumerate(no_rope))
        ):
            self._refuse("no_rope_layers", no_rope, f"1 (RoPE) on every layer but every {NO_ROPE_STEP}th")
        if not t.get("no_rope_layers") and t.get("no_rope_layer_interval", NO_ROPE_STEP) != NO_ROPE_STEP:
            self._refuse("no_rope_layer_interval", t["no_rope_layer_interval"], NO_ROPE_STEP)
        if t.get("attention_chunk_size", CHUNK_SIZE) != CHUNK_SIZE:
            self._refuse("attention_chunk_size", t.get("attention_chunk_size"), CHUNK_SIZE)
        if not t.get("attn_temperature_tuning", True):
            self._refuse("attn_temperature_tuning", t.get("attn_temperature_tuning"), True)
        if float(t.get("floor_scale", TEMP_FLOOR_SCALE)) != TEMP_FLOOR_SCALE:
            self._refuse("floor_scale", t["floor_scale"], TEMP_FLOOR_SCALE)
        if float(t.get("attn_scale", TEMP_SCALE)) != TEMP_SCALE:
            self._refuse("attn_scale", t["attn_scale"], TEMP_SCALE)
        want_norm = self.n_expert != NO_QK_NORM_EXPERTS
        if bool(t.get("use_qk_norm", True)) != want_norm:
            self._refuse("use_qk_norm", t.get("use_qk_norm", True), want_norm)

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """GGUF name -> shape in llama.cpp's order of rows and columns (numpy order)."""
        d, hd, E = self.dim, self.head_dim, self.n_expert
        out = {}
        for i in range(self.n_layers):
            s = {
                MODEL_TENSOR.ATTN_Q: (self.n_heads * hd, d),
                MODEL_TENSOR.ATTN_K: (self.n_kv_heads * hd, d),
                MODEL_TENSOR.ATTN_V: (self.n_kv_heads * hd, d),
                MODEL_TENSOR.ATTN_OUT: (d, self.n_heads * hd),
                MODEL_TENSOR.ATTN_NORM: (d,),
                MODEL_TENSOR.FFN_NORM: (d,),
            }
            if is_moe_layer(i, self.moe_step):
                f = self.ffn_moe
                s.update(
                    {
                        MODEL_TENSOR.FFN_GATE_INP: (E, d),
                        MODEL_TENSOR.FFN_GATE_EXP: (E, f, d),
                        MODEL_TENSOR.FFN_UP_EXP: (E, f, d),
                        MODEL_TENSOR.FFN_DOWN_EXP: (E, d, f),
                        MODEL_TENSOR.FFN_GATE_SHEXP: (f, d),
                        MODEL_TENSOR.FFN_UP_SHEXP: (f, d),
                        MODEL_TENSOR.FFN_DOWN_SHEXP: (d, f),
                    }
                )
            else:
                f = self.ffn_dense
                s.update({MODEL_TENSOR.FFN_GATE: (f, d), MODEL_TENSOR.FFN_UP: (f, d), MODEL_TENSOR.FFN_DOWN: (d, f)})
            out.update({tensor_name(k, i): v for k, v in s.items()})
        out[tensor_name(MODEL_TENSOR.TOKEN_EMBD)] = (self.vocab_size, d)
        out[tensor_name(MODEL_TENSOR.OUTPUT_NORM)] = (d,)
        out[tensor_name(MODEL_TENSOR.OUTPUT)] = (self.vocab_size, d)
        return out

    def hparams(self, ctx_len: int, theta: float, tied: bool) -> LlamaHParams:
        return LlamaHParams(
            dim=self.dim,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads,
            vocab_size=self.vocab_size,
            ffn_dim=self.ffn_dense,
            norm_eps=self.eps,
            rope_theta=theta,
            context_length=ctx_len,
            family="llama-4",
            tied_embeddings=tied,
            stated_head_dim=self.head_dim,
            n_expert=self.n_expert,
            n_expert_used=self.n_expert_used,
            arch=ARCH,
        )

    def extra_kvs(self) -> list[KV]:
        """The llama4 keys beyond the llama ones (llama.cpp's Llama4Model.set_gguf_parameters)."""
        f = lambda key: key.format(arch=ARCH)  # noqa: E731
        return [
            KV(f(Keys.LLM.INTERLEAVE_MOE_LAYER_STEP), self.moe_step, T.UINT32),
            KV(f(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH), self.ffn_moe, T.UINT32),
        ]
