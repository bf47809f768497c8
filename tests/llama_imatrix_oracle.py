"""llama.cpp's own imatrix statistic, computed the way llama-imatrix does, without building it.

llama-imatrix registers a ggml scheduler eval callback (`cb_eval` in the context params): asked
about every graph node, it claims the MUL_MAT nodes whose weight (src[0]) is a `blk.*` tensor
and whose activations (src[1]) are f32 with at least 16 rows, and every MUL_MAT_ID node (stacked
experts); after each one is computed it adds x**2 of every activation row to the weight's
in_sum2 and counts the rows: per expert for MUL_MAT_ID, by the routing ids in its src[2]. This module installs
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


def _strided(t: GGMLTensor, dtype, rows_shape: tuple[int, ...]) -> np.ndarray:
    """A view of ggml tensor `t`'s data (ne/nb: innermost first) as numpy [.., ne[1], ne[0]]."""
    ne, nb = list(t.ne)[: len(rows_shape)], list(t.nb)[: len(rows_shape)]
    extent = sum((n - 1) * b for n, b in zip(ne, nb)) + np.dtype(dtype).itemsize
    buf = (ctypes.c_char * extent).from_address(t.data)
    return np.lib.stride_tricks.as_strided(np.frombuffer(buf, dtype), tuple(reversed(ne)), tuple(reversed(nb)))


def llama_cpp_imatrix(gguf_path: Path, chunks: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(name -> in_sum2 float64 [n_mat, n], name -> counts int64 [n_mat]) from llama.cpp over
    `chunks` [n_chunks, ctx]. n_mat is 1 for a MUL_MAT weight and the expert count for a
    MUL_MAT_ID one (stacked experts): llama-imatrix's rule for those is that expert e's row sums
    the src1 rows of the tokens whose ids (src[2], [n_expert_used, n_tokens]) name e, slot k of
    a token reading src1 row k % ne[1] (gate/up: one row shared by every slot; down: the slot's
    own row), and counts them; it asks for every MUL_MAT_ID, whatever its row count."""
    import llama_cpp
    import llama_cpp._logger

    llama_cpp._logger.set_verbose(False)
    base = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    base.ggml_op_name.restype = ctypes.c_char_p
    base.ggml_op_name.argtypes = [ctypes.c_int]
    # the op numbers by name, searched from 0 (ggml_op_name does not check its argument)
    mul_mat = next(i for i in range(200) if base.ggml_op_name(i) == b"MUL_MAT")
    mul_mat_id = next(i for i in range(mul_mat, 200) if base.ggml_op_name(i) == b"MUL_MAT_ID")

    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}

    def add(name: str, n_mat: int, row: int, x: np.ndarray, n: int) -> None:
        if name not in sums:
            sums[name] = np.zeros((n_mat, x.shape[-1]))
            counts[name] = np.zeros(n_mat, np.int64)
        sums[name][row] += (x.astype(np.float64) ** 2).reshape(-1, x.shape[-1]).sum(axis=0)
        counts[name][row] += n

    def collect(t_ptr, ask, _user):
        t = ctypes.cast(t_ptr, ctypes.POINTER(GGMLTensor)).contents
        if t.op not in (mul_mat, mul_mat_id):
            return not ask  # not interested (ask); keep computing (not ask)
        w, x = t.src[0].contents, t.src[1].contents
        name = w.name.decode()
        if t.op == mul_mat_id:
            if ask:
                return True
            assert x.type == 0 and x.ne[3] == 1 and x.nb[0] == 4
            ids_t = t.src[2].contents
            xs = _strided(x, np.float32, (x.ne[0], x.ne[1], x.ne[2]))  # [n_tokens, ne1, n]
            ids = _strided(ids_t, np.int32, (ids_t.ne[0], ids_t.ne[1]))  # [n_tokens, n_used]
            assert ids.shape[0] == xs.shape[0]
            for e in range(w.ne[2]):
                tok, slot = np.nonzero(ids == e)
                add(name, w.ne[2], e, xs[tok, slot % x.ne[1]], len(tok))
            return True
        if ask:
            return bool(x.ne[1] >= 16 and x.type == 0 and name.startswith("blk."))
        assert x.ne[2] == x.ne[3] == 1 and x.nb[0] == 4
        add(name, 1, 0, _strided(x, np.float32, (x.ne[0], x.ne[1])), x.ne[1])
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
