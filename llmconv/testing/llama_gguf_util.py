"""Small f32 llama GGUF files for tests that hand data to llama.cpp.

`write_f32_llama_gguf` writes a file that llama.cpp's loader accepts as a "llama" model
(the llama.* hparam keys it requires, a tiny vocab) but whose tensors hold whatever the
test wants: llama-quantize only reads the tensors, it never checks their shapes against the
hparams, so any 2-D float32 matrix can ride in a weight tensor and be quantized by the C code.

`llama_quantize_file` runs llama.cpp's quantizer (`llama_model_quantize`, what the
`llama-quantize` tool calls) on such a file; `read_tensors` reads the result back.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import gguf

# Tensor names of a one-layer llama, in the order a converter writes them. Tests map their
# matrices onto these names (one matrix per name); the 2-D ones get quantized.
LLAMA_MATRIX_NAMES = [
    "token_embd.weight",
    "blk.0.attn_q.weight",
    "blk.0.attn_k.weight",
    "blk.0.attn_v.weight",
    "blk.0.attn_output.weight",
    "blk.0.ffn_gate.weight",
    "blk.0.ffn_up.weight",
    "blk.0.ffn_down.weight",
    "output.weight",
]


def write_f32_llama_gguf(
    path: str | Path,
    tensors: dict[str, np.ndarray],
    *,
    n_embd: int = 256,
    n_ff: int = 512,
    n_head: int = 2,
    n_layer: int = 1,
    n_ctx: int = 128,
    n_vocab: int = 8,
    rms_eps: float = 1e-5,
    norms: bool = True,
) -> Path:
    """Write `tensors` (numpy shape = [rows, row_len], stored as f32) into a llama GGUF.

    Row lengths of quantized tensors must be multiples of the block size (use 256 to also
    cover K-quants). `norms` adds the 1-D norm weights a llama layer has (llama.cpp leaves
    them f32); they never affect which matrices get quantized.
    """
    path = Path(path)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_layer_norm_rms_eps(rms_eps)
    w.add_vocab_size(n_vocab)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    # A byte-free "llama" (SentencePiece-style) vocab with the specials it needs; the
    # quantizer copies it through without using it.
    w.add_tokenizer_model("llama")
    tokens = ["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(n_vocab - 3)]
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * n_vocab)
    w.add_token_types(
        [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
        + [gguf.TokenType.NORMAL] * (n_vocab - 3)
    )
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    for name, arr in tensors.items():
        w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
    if norms:
        for i in range(n_layer):
            for nm in (f"blk.{i}.attn_norm.weight", f"blk.{i}.ffn_norm.weight"):
                if nm not in tensors:
                    w.add_tensor(nm, np.ones(n_embd, dtype=np.float32))
        if "output_norm.weight" not in tensors:
            w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def llama_ftype(name: str) -> int:
    """llama.cpp's LLAMA_FTYPE_* constant for a type name ("q4_0", "f32", ...)."""
    import llama_cpp

    if name.lower() == "f32":
        return llama_cpp.LLAMA_FTYPE_ALL_F32
    return getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name.upper()}")


def has_llama_ftype(name: str) -> bool:
    try:
        llama_ftype(name)
    except AttributeError:
        return False
    return True


def llama_quantize_file(src: str | Path, dst: str | Path, type_name: str, nthread: int = 1) -> None:
    """Quantize every 2-D tensor of `src` to `type_name` with llama.cpp (pure: no type mixing)."""
    import llama_cpp
    import llama_cpp._logger  # installs llama-cpp-python's log callback; keep it to errors

    llama_cpp._logger.set_verbose(False)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_ftype(type_name)
    params.pure = True
    params.nthread = nthread
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {type_name}) returned {rc}")


def read_tensors(path: str | Path) -> dict[str, tuple[gguf.GGMLQuantizationType, np.ndarray]]:
    """name -> (ggml type, raw data as uint8 [rows, row_bytes] or float array)."""
    r = gguf.GGUFReader(str(path))
    out = {}
    for t in r.tensors:
        data = np.array(t.data)
        if data.dtype != np.uint8:
            data = data.reshape(data.shape[0], -1) if data.ndim > 1 else data
        out[t.name] = (gguf.GGMLQuantizationType(t.tensor_type), data)
    return out


_GGML_QUANTIZE_CHUNK = None


def ggml_quantize_chunk(ggml_type: int, x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    """llama.cpp's own quantizer on a float32 matrix x[rows, n] -> uint8[rows, row bytes].

    `ggml_quantize_chunk` from the libggml-base that llama-cpp-python ships, via ctypes: the
    function llama_model_quantize calls per chunk of rows, with the tensor's imatrix slice
    (`imatrix`, float32[n]) or NULL.
    """
    global _GGML_QUANTIZE_CHUNK
    import ctypes
    import llama_cpp

    if _GGML_QUANTIZE_CHUNK is None:
        lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
        fn = lib.ggml_quantize_chunk
        fn.restype = ctypes.c_size_t
        fn.argtypes = [
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_void_p,
        ]
        lib.ggml_row_size.restype = ctypes.c_size_t
        lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
        _GGML_QUANTIZE_CHUNK = (fn, lib.ggml_row_size)
    fn, row_size = _GGML_QUANTIZE_CHUNK
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, n = x.shape
    out = np.zeros((rows, row_size(int(ggml_type), n)), np.uint8)
    qw = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    assert qw is None or qw.shape == (n,)
    written = fn(int(ggml_type), x.ctypes.data, out.ctypes.data, 0, rows, n, None if qw is None else qw.ctypes.data)
    assert written == out.size
    return out


def ggml_dequantize(ggml_type: int, raw: np.ndarray, n_per_row: int) -> np.ndarray:
    """llama.cpp's own dequantizer (the type's `to_float` from ggml_get_type_traits in
    libggml-base): uint8[rows, row bytes] -> float32[rows, n_per_row]."""
    import ctypes
    import llama_cpp

    class TypeTraits(ctypes.Structure):
        _fields_ = [
            ("type_name", ctypes.c_char_p),
            ("blck_size", ctypes.c_int64),
            ("blck_size_interleave", ctypes.c_int64),
            ("type_size", ctypes.c_size_t),
            ("is_quantized", ctypes.c_bool),
            ("to_float", ctypes.c_void_p),
            ("from_float_ref", ctypes.c_void_p),
        ]

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_get_type_traits.restype = ctypes.POINTER(TypeTraits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    traits = lib.ggml_get_type_traits(int(ggml_type)).contents
    to_float = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)(traits.to_float)
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    out = np.empty((raw.shape[0], n_per_row), np.float32)
    to_float(raw.ctypes.data, out.ctypes.data, out.size)
    return out
