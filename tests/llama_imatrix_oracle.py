"""llama.cpp's own imatrix statistic, computed the way llama-imatrix does, without building it.

llama-imatrix registers a ggml scheduler eval callback (`cb_eval` in the context params): asked
about every graph node, it claims the MUL_MAT nodes whose weight (src[0]) is a `blk.*` tensor
and whose activations (src[1]) are f32 with at least 16 rows; after each one is computed it adds
x**2 of every activation row to the weight's in_sum2 and counts the rows. This module installs
the same callback through llama-cpp-python's low-level API (ctypes, the ggml_tensor layout of
the vendored ggml.h) and evaluates the same chunks llama-imatrix evaluates: each chunk its own
sequence from position 0, the KV cache cleared in between, all logits requested (so the last
layer runs on every row). The KV cache is f32 and flash attention off, so the comparison with
llmconv's float32 reference is not blurred by f16 rounding.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

GGML_MAX_DIMS, GGML_MAX_SRC, GGML_MAX_OP_PARAMS, GGML_MAX_NAME = 4, 10, 64, 64


class GGMLTensor(ctypes.Structure):
    pass


GGMLTensor._fields_ = [
    ("type", ctypes.c_int),
    ("buffer", ctypes.c_void_p),
    ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
    ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
    ("op", ctypes.c_int),
    ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
    ("flags", ctypes.c_int32),
    ("src", ctypes.POINTER(GGMLTensor) * GGML_MAX_SRC),
    ("view_src", ctypes.POINTER(GGMLTensor)),
    ("view_offs", ctypes.c_size_t),
    ("data", ctypes.c_void_p),
    ("name", ctypes.c_char * GGML_MAX_NAME),
    ("extra", ctypes.c_void_p),
    ("padding", ctypes.c_char * 8),
]


def llama_cpp_imatrix(gguf_path: Path, chunks: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """(name -> in_sum2 float64[n], name -> counts) from llama.cpp over `chunks` [n_chunks, ctx]."""
    import llama_cpp
    import llama_cpp._logger

    llama_cpp._logger.set_verbose(False)
    base = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    base.ggml_op_name.restype = ctypes.c_char_p
    base.ggml_op_name.argtypes = [ctypes.c_int]
    mul_mat = next(i for i in range(200) if base.ggml_op_name(i) == b"MUL_MAT")

    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}

    def collect(t_ptr, ask, _user):
        t = ctypes.cast(t_ptr, ctypes.POINTER(GGMLTensor)).contents
        if t.op != mul_mat:
            return not ask  # not interested (ask); keep computing (not ask)
        w, x = t.src[0].contents, t.src[1].contents
        name = w.name.decode()
        if ask:
            return bool(x.ne[1] >= 16 and x.type == 0 and name.startswith("blk."))
        rows = x.ne[1] * x.ne[2] * x.ne[3]
        assert x.ne[2] == x.ne[3] == 1 and x.nb[0] == 4
        buf = (ctypes.c_char * (x.nb[1] * (x.ne[1] - 1) + 4 * x.ne[0])).from_address(x.data)
        a = np.lib.stride_tricks.as_strided(np.frombuffer(buf, np.float32), (x.ne[1], x.ne[0]), (x.nb[1], 4))
        s = (a.astype(np.float64) ** 2).sum(axis=0)
        sums[name] = sums.get(name, 0) + s
        counts[name] = counts.get(name, 0) + rows
        return True

    callback_type = llama_cpp.llama_context_params._fields_[
        [f[0] for f in llama_cpp.llama_context_params._fields_].index("cb_eval")
    ][1]
    cb = callback_type(collect)

    n_chunks, ctx = chunks.shape
    mparams = llama_cpp.llama_model_default_params()
    model = llama_cpp.llama_model_load_from_file(str(gguf_path).encode(), mparams)
    assert model, f"llama.cpp cannot load {gguf_path}"
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = ctx
    cparams.n_threads = cparams.n_threads_batch = 1
    cparams.type_k = cparams.type_v = 0  # GGML_TYPE_F32
    cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    cparams.cb_eval = cb
    lctx = llama_cpp.llama_init_from_model(model, cparams)
    assert lctx
    batch = llama_cpp.llama_batch_init(ctx, 0, 1)
    try:
        for chunk in chunks:
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(lctx), True)
            batch.n_tokens = ctx
            for k, tok in enumerate(chunk):
                batch.token[k] = int(tok)
                batch.pos[k] = k
                batch.n_seq_id[k] = 1
                batch.seq_id[k][0] = 0
                batch.logits[k] = True
            assert llama_cpp.llama_decode(lctx, batch) == 0
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(lctx)
        llama_cpp.llama_model_free(model)
    return sums, counts
