"""Shared by the mix tests (test_mixes.py, test_imatrix_files.py, test_iq4.py, test_moe.py): the
models mixes are compared on, llama.cpp's quantizer as the oracle (with and without an imatrix),
and a byte-for-byte comparison of two GGUF files' tensors."""

from __future__ import annotations

import ctypes
from pathlib import Path

import gguf
import numpy as np

from llmconv.imatrix import Imatrix, ImatrixEntry

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "fixtures" / "tiny-llama"
MIXES = ["q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k"]
SYNTH = {
    "gqa2-ffn800": dict(dim=256, n_layers=12, n_heads=8, n_kv_heads=4, ffn=800, seed=3),
    "dim288": dict(dim=288, n_layers=2, n_heads=4, n_kv_heads=4, ffn=768, seed=4),
}


def llama_quantize(src: Path, dst: Path, mix: str, pure: bool = False) -> Path:
    import llama_cpp
    import llama_cpp._logger

    llama_cpp._logger.set_verbose(False)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{mix.upper()}")
    params.nthread = 1
    params.pure = pure
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    assert rc == 0, f"llama_model_quantize({src.name}, {mix}) returned {rc}"
    return dst


def read(path: Path) -> tuple[int, dict[str, tuple[str, bytes]]]:
    r = gguf.GGUFReader(str(path))
    tensors = {t.name: (gguf.GGMLQuantizationType(t.tensor_type).name, np.asarray(t.data).tobytes()) for t in r.tensors}
    return int(r.get_field("general.file_type").contents()), tensors


def assert_same_file(theirs: Path, ours: Path) -> None:
    ft_theirs, t_theirs = read(theirs)
    ft_ours, t_ours = read(ours)
    assert t_ours.keys() == t_theirs.keys()
    types = {n: (t_theirs[n][0], t_ours[n][0]) for n in t_theirs if t_theirs[n][0] != t_ours[n][0]}
    assert not types, f"types differ (llama.cpp, llmconv): {types}"
    data = [n for n in t_theirs if t_theirs[n][1] != t_ours[n][1]]
    assert not data, f"tensor bytes differ: {data}"
    assert ft_ours == ft_theirs


def synthetic_imatrix(f32_gguf: Path, seed: int = 0, chunk_size: int = 64) -> Imatrix:
    """An imatrix for every blk.* matrix of a GGUF, shaped like llama-imatrix's: in_sum2 is a
    sum of squared activations over `counts` tokens (skewed, a few outlier and dead columns);
    stacked experts [n_expert, rows, n] get one such row per expert, each its own token count
    (the tokens routed to it)."""
    rng = np.random.default_rng(seed)
    entries = {}
    for t in gguf.GGUFReader(str(f32_gguf)).tensors:
        if t.name.startswith("blk.") and len(t.shape) in (2, 3):
            n = int(t.shape[0])  # gguf-py lists ne[0] (the row length) first
            n_mat = int(t.shape[2]) if len(t.shape) == 3 else 1
            sums, counts = [], []
            for _ in range(n_mat):
                tokens = int(rng.integers(100, 1000))
                s = rng.gamma(0.6, 0.05, n) * tokens
                s[rng.choice(n, 2, replace=False)] *= 200
                s[rng.choice(n, 3, replace=False)] = 0
                sums.append(s.astype(np.float32))
                counts.append(tokens)
            entries[t.name] = ImatrixEntry(np.stack(sums), np.array(counts))
    return Imatrix(entries, ["synthetic"], 7, chunk_size)


def llama_quantize_with_imatrix(src: Path, dst: Path, mix: str, im: Imatrix, pure: bool = False) -> Path:
    import llama_cpp
    import llama_cpp._logger

    llama_cpp._logger.set_verbose(False)
    names = sorted(im.entries)
    values = [np.ascontiguousarray(im.importance(n), np.float32) for n in names]
    items = (llama_cpp.llama_model_imatrix_data * (len(names) + 1))()
    keep = []
    for i, (n, v) in enumerate(zip(names, values)):
        keep.append(n.encode())
        items[i].name = keep[-1]
        items[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        items[i].size = v.size
    items[len(names)].name = None  # the terminator llama.cpp stops at
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{mix.upper()}")
    params.nthread = 1
    params.pure = pure
    params.imatrix = ctypes.cast(items, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    assert rc == 0, f"llama_model_quantize({src.name}, {mix}, imatrix) returned {rc}"
    return dst


LAYER_KINDS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def write_tensor_only_llama(
    path: Path,
    n_layers: int,
    n_heads: int,
    n_kv: int,
    tied: bool,
    rows: dict[tuple[int, str], int] | None = None,
    kinds=LAYER_KINDS,
) -> Path:
    """A llama GGUF whose matrices are 2 x 256 (row lengths overridable per tensor): llama-quantize
    reads the hparams for its rules but never checks shapes (nor that every layer tensor is
    there: `kinds`), so every rule runs on a few bytes."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_embedding_length(256)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(256)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(256 // n_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(8)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(5)])
    w.add_token_scores([0.0] * 8)
    w.add_token_types(
        [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.NORMAL] * 5
    )
    rng = np.random.default_rng(n_layers)
    mat = lambda n=256: rng.standard_normal((2, n)).astype(np.float32)
    w.add_tensor("token_embd.weight", mat())
    for i in range(n_layers):
        for kind in kinds:
            w.add_tensor(f"blk.{i}.{kind}.weight", mat((rows or {}).get((i, kind), 256)))
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(256, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(256, np.float32))
    w.add_tensor("output_norm.weight", np.ones(256, np.float32))
    if not tied:
        w.add_tensor("output.weight", mat())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_tensor_only_moe(
    path: Path, n_layers: int, n_expert: int, n_heads: int = 8, n_kv: int = 2, expert_rows: int = 1
) -> Path:
    """A llama GGUF with experts whose matrices have `expert_rows` rows (the others 2):
    llama-quantize reads the hparams for its rules but not the shapes, so the rules run on a
    few bytes."""
    w = gguf.GGUFWriter(str(path), "llama")
    for add, v in (
        (w.add_context_length, 64),
        (w.add_embedding_length, 256),
        (w.add_block_count, n_layers),
        (w.add_feed_forward_length, 256),
        (w.add_head_count, n_heads),
        (w.add_head_count_kv, n_kv),
        (w.add_rope_dimension_count, 32),
        (w.add_expert_count, n_expert),
        (w.add_expert_used_count, 2),
        (w.add_vocab_size, 8),
        (w.add_file_type, gguf.LlamaFileType.ALL_F32),
    ):
        add(v)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(5)])
    w.add_token_scores([0.0] * 8)
    w.add_token_types(
        [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.NORMAL] * 5
    )
    rng = np.random.default_rng(n_layers * 10 + n_expert)
    mat = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    w.add_tensor("token_embd.weight", mat(2, 256))
    for i in range(n_layers):
        for kind in ("attn_q", "attn_k", "attn_v", "attn_output"):
            w.add_tensor(f"blk.{i}.{kind}.weight", mat(2, 256))
        w.add_tensor(f"blk.{i}.ffn_gate_inp.weight", mat(n_expert, 256))
        for kind in ("ffn_gate_exps", "ffn_down_exps", "ffn_up_exps"):
            w.add_tensor(f"blk.{i}.{kind}.weight", mat(n_expert, expert_rows, 256))
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(256, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(256, np.float32))
    w.add_tensor("output_norm.weight", np.ones(256, np.float32))
    w.add_tensor("output.weight", mat(2, 256))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
