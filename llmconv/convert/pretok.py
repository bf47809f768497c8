"""Which llama.cpp pre-tokenizer (tokenizer.ggml.pre) a Hugging Face tokenizer.json needs.

llama.cpp splits text before BPE with a hard-coded regex chosen by name, so the name must
describe what the source tokenizer's pre-tokenizer does. Two independent ways tell:

  - the structure of `pre_tokenizer` in tokenizer.json: its Split regex, Digits step and
    ByteLevel settings. This is how the name is chosen;
  - llama.cpp's own method (convert_hf_to_gguf.py, get_vocab_base_pre): tokenize its check text
    with the tokenizer and hash the ids. A hash llama.cpp lists names the pre-tokenizer of that
    reference model. It only exists for tokenizers with the reference model's vocabulary, so it
    confirms (or, when the structure is unknown, decides) but cannot cover every tokenizer.

When both give a name and they differ, that is an error: one of them is wrong about the file.
"""

from __future__ import annotations

from hashlib import sha256
from pathlib import Path

from ..errors import LlmconvError, is_library_panic

# LLaMA 3's split regex, in tiktoken (Meta) and in tokenizer.json (Hugging Face) alike.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# The split regex of every Tekken file so far (Mistral's tiktoken-style tokenizer).
TEKKEN_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Llama 4's (Meta's llama_models/llama4/tokenizer.py O200K_PATTERN; GPT-4o's o200k regex)
LLAMA4_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Split regex (a Split step, then ByteLevel without its own regex) -> tokenizer.ggml.pre.
SPLIT_PATTERNS = {
    LLAMA3_PATTERN: "llama-bpe",  # LLaMA 3.x
    TEKKEN_PATTERN: "tekken",  # Mistral Nemo, Ministral, Mistral Small 3 (tokenizer.json)
    LLAMA4_PATTERN: "llama4",  # Llama 4 Scout, Maverick
}

# The values llmconv recognizes, each backed by a test in which llama.cpp tokenizes like the source.
PRE_TYPES = ("llama-bpe", "smollm", "tekken", "gpt-2", "llama4")

# llama.cpp's check text, from convert_hf_to_gguf.py (get_vocab_base_pre).
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) "
    "✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)

# sha256(str(ids of CHECK_TEXT)) of each reference model, as listed in convert_hf_to_gguf.py.
CHECK_HASHES = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3-8B
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral-Nemo-Base-2407
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM-135M
    "d353350c764d8c3b39c763113960e4fb4919bea5fbf208a0e3b22e8469dc7406": "llama4",  # Llama-4-Scout-17B-16E-Instruct
}


def _flatten(pre: dict | None) -> list[dict]:
    if pre is None:
        return []
    if pre.get("type") == "Sequence":
        return [s for p in pre.get("pretokenizers") or [] for s in _flatten(p)]
    return [pre]


def _describe(obj) -> str:
    if obj is None:
        return "none"
    if obj.get("type") == "Sequence":
        return (
            "Sequence["
            + ", ".join(_describe(p) for p in obj.get("pretokenizers") or obj.get("normalizers") or [])
            + "]"
        )
    if obj.get("type") == "Split":
        return f"Split({(obj.get('pattern') or {}).get('Regex') or (obj.get('pattern') or {}).get('String')!r})"
    return str(obj.get("type"))


def pre_from_structure(tj: dict) -> str | None:
    """The name whose regexes do what tokenizer.json's pre_tokenizer does, or None."""
    if tj.get("normalizer") is not None:
        return None
    steps = _flatten(tj.get("pre_tokenizer"))
    kinds = [s.get("type") for s in steps]
    if kinds.count("ByteLevel") != 1 or kinds[-1] != "ByteLevel":
        return None
    byte_level = steps[-1]
    if byte_level.get("add_prefix_space", False):
        return None
    own_regex = byte_level.get("use_regex", True)  # ByteLevel's own regex is GPT-2's
    if kinds == ["ByteLevel"] and own_regex:
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and own_regex and steps[0].get("individual_digits"):
        return "smollm"  # every digit alone, then GPT-2's regex
    if kinds == ["Split", "ByteLevel"] and not own_regex:
        split = steps[0]
        pattern = (split.get("pattern") or {}).get("Regex")
        if split.get("behavior") == "Isolated" and not split.get("invert", False):
            return SPLIT_PATTERNS.get(pattern)
    return None


def check_hash(path: Path) -> str | None:
    """llama.cpp's chkhsh of a tokenizer.json, or None without the `tokenizers` package (or when it
    cannot load the file)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    try:
        tok = Tokenizer.from_file(str(path))
        ids = tok.encode(CHECK_TEXT).ids
    except Exception:  # the Rust side raises its own exception type; the structure decides
        return None
    except BaseException as e:  # or panics (the schema refuses the inputs known to do that)
        if not is_library_panic(e):
            raise
        return None
    return sha256(str(ids).encode()).hexdigest()


def detect_pre(tj: dict, path: Path | None = None) -> str:
    """tokenizer.ggml.pre for a byte-level BPE tokenizer.json (see the module docstring)."""
    if tj.get("normalizer") is not None:
        raise LlmconvError(
            f"tokenizer.json has a normalizer ({_describe(tj['normalizer'])}) that llama.cpp's "
            "BPE pre-tokenizers do not apply; pass --pre to choose one anyway",
            file=path,
        )
    by_structure = pre_from_structure(tj)
    by_hash = CHECK_HASHES.get(check_hash(path)) if path is not None and Path(path).is_file() else None
    if by_structure and by_hash and by_structure != by_hash:
        raise LlmconvError(
            f"the pre-tokenizer looks like {by_structure!r}, but llama.cpp's check-text hash "
            f"says {by_hash!r}; pass --pre to choose",
            file=path,
        )
    found = by_structure or by_hash
    if found is None:
        raise LlmconvError(
            f"unknown pre-tokenizer ({_describe(tj.get('pre_tokenizer'))}): llama.cpp may split "
            f"text differently; pass --pre with one of {', '.join(PRE_TYPES)} if you know it matches",
            file=path,
        )
    return found
