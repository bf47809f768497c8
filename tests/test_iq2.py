"""IQ2_XXS, IQ2_XS and IQ2_S against llama.cpp: the kernels (ggml_quantize_chunk with an imatrix,
and IQ2_S without one), the dequantizers (gguf-py and ggml's own to_float), the grid tables
(iq2xs_init_impl's neighbour lists, rebuilt independently here), and the imatrix requirement."""

from __future__ import annotations

import ctypes
from pathlib import Path

import gguf
import numpy as np
import pytest

import llmconv.quantize as Q
import llmconv
from llmconv.cli import main
from llmconv.convert.gguf_source import open_gguf_source
from llmconv.convert.pipeline import gguf_model_shape
from llmconv.convert.plan import TypePolicy, make_plan
from llmconv.imatrix import write_imatrix_gguf
from llmconv.quantize import iq2
from llmconv.testing.llama_gguf_util import ggml_quantize_chunk
from kernel_data import datasets, importance_vectors, to_bf16_grid
from mix_util import assert_same_file, llama_quantize_with_imatrix, read, synthetic_imatrix, write_tensor_only_llama

IQ2 = ["iq2_xxs", "iq2_xs", "iq2_s"]
pytestmark = pytest.mark.llamacpp


def extreme_rows(n: int = 512) -> np.ndarray:
    """Whole rows that are edge cases of the search: zero, constant, tiny, huge, sparse, ±."""
    rng = np.random.default_rng(5)
    rows = [
        np.zeros(n),
        np.full(n, 0.01),
        np.full(n, -3.0),
        rng.standard_normal(n) * 1e-20,
        rng.standard_normal(n) * 1e-8,
        rng.standard_normal(n) * 1e-12,
        rng.standard_normal(n) * 3e4,
        np.where(rng.random(n) < 0.9, 0.0, rng.standard_normal(n)),
        np.tile([0.5, -0.5], n // 2),
        to_bf16_grid(rng.standard_normal(n) * 0.02),
    ]
    return np.array(rows, dtype=np.float32)


def imatrices(x: np.ndarray) -> dict[str, np.ndarray]:
    n = x.shape[1]
    ims = importance_vectors(n)
    ims["zero_half"] = np.where(np.arange(n) % 32 < 16, 0.0, 1.0)  # XS/S blocks of 16 all unweighted
    ims["only_on_zeros"] = np.where(x[-1] == 0, 1.0, 0.0) if (x[-1] == 0).any() else np.eye(1, n, 3)[0]
    return {k: v.astype(np.float32) for k, v in ims.items()}


def _assert_same(ours: np.ndarray, ref: np.ndarray, type_size: int, what: str) -> None:
    bad = np.flatnonzero((ours.reshape(-1, type_size) != ref.reshape(-1, type_size)).any(axis=1))
    assert bad.size == 0, f"{what}: {bad.size} of {ours.size // type_size} blocks differ, first {bad[:5].tolist()}"


@pytest.mark.parametrize("t", IQ2)
def test_kernel_bytes_equal_llama_cpp(t):
    """Every block identical on bf16-grid data, edge blocks and whole edge rows, under every
    kind of imatrix (each dataset meets two of them in turn, to keep the run short)."""
    qt = Q.get(t)
    sets = {**datasets(), "extreme_rows": extreme_rows()}
    k = 0
    for name, x in sets.items():
        ims = imatrices(x)
        chosen = list(ims) if name == "extreme_rows" else [list(ims)[(k + j) % len(ims)] for j in (0, 1)]
        k += 2
        for iname in chosen:
            ours = Q.quantize_tensor(x, qt, imatrix=ims[iname])
            _assert_same(ours, ggml_quantize_chunk(qt.ggml_type, x, ims[iname]), qt.type_size, f"{t} {name} {iname}")


def test_iq2_s_without_imatrix_equals_llama_cpp():
    qt = Q.get("iq2_s")
    for name in ("bf16", "bf16_coarse", "edges", "normal_1000"):
        x = datasets()[name]
        _assert_same(Q.quantize_tensor(x, qt), ggml_quantize_chunk(qt.ggml_type, x, None), qt.type_size, name)
    x = extreme_rows()
    _assert_same(Q.quantize_tensor(x, qt), ggml_quantize_chunk(qt.ggml_type, x, None), qt.type_size, "extreme")


def test_chunks_and_threads_keep_the_bytes(monkeypatch):
    monkeypatch.setattr(iq2, "CHUNK_SUPERBLOCKS", dict.fromkeys(IQ2, 3))  # chunks start mid-row
    rng = np.random.default_rng(9)
    x = to_bf16_grid(rng.standard_normal((7, 768)) * 0.05)
    qw = importance_vectors(768)["realistic"].astype(np.float32)
    for t in IQ2:
        qt = Q.get(t)
        ours = Q.quantize_tensor(x, qt, imatrix=qw, threads=2)
        _assert_same(ours, ggml_quantize_chunk(qt.ggml_type, x, qw), qt.type_size, t)


def test_xxs_and_xs_require_an_imatrix():
    x = np.ones((1, 256), np.float32)
    for t in ("iq2_xxs", "iq2_xs"):
        with pytest.raises(Q.ImatrixRequired, match=f"{t} needs an importance matrix"):
            Q.quantize_tensor(x, t)
    assert Q.quantize_tensor(x, "iq2_s").shape == (1, iq2.IQ2_S_SIZE)


def _c_to_float():
    import llama_cpp

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    # ggml_get_type_traits(type)->to_float(x, y, k): the dequantizer the CPU backend runs
    fields = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
    ]
    Traits = type("Traits", (ctypes.Structure,), {"_fields_": fields})
    lib.ggml_get_type_traits.restype = ctypes.POINTER(Traits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]

    def to_float(ggml_type: int, raw: np.ndarray, k: int) -> np.ndarray:
        tr = lib.ggml_get_type_traits(int(ggml_type)).contents
        assert tr.blck_size == 256
        fn = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)(tr.to_float)
        raw = np.ascontiguousarray(raw)
        y = np.empty(k, np.float32)
        fn(raw.ctypes.data, y.ctypes.data, k)
        return y

    return to_float


@pytest.mark.parametrize("t", IQ2)
def test_dequantize_equals_ggml_and_gguf_py(t):
    qt = Q.get(t)
    x = datasets()["bf16"][:16]
    qw = importance_vectors(x.shape[1])["realistic"].astype(np.float32)
    raw = ggml_quantize_chunk(qt.ggml_type, x, qw)
    ours = Q.dequantize_tensor(raw, qt)
    c = _c_to_float()(qt.ggml_type, raw, x.size).reshape(x.shape)
    assert np.array_equal(ours.view(np.uint32), c.view(np.uint32))
    ref = gguf.quants.dequantize(raw, qt.ggml_type).astype(np.float32)
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))
    # a real fit: the error is well below the weights' own size
    assert np.sqrt(np.mean((ours - x) ** 2)) < 0.7 * np.sqrt(np.mean(x**2))


@pytest.mark.parametrize("t,nwant", [("iq2_xxs", 2), ("iq2_xs", 2), ("iq2_s", 1)])
def test_neighbour_lists_follow_ggml_definition(t, nwant):
    """Rebuilt point by point with plain loops: for a few off-grid codes, all grid points at the
    nwant smallest distances, by (distance, index); on-grid codes map to their index."""
    g = iq2.grid(t)
    pts = g.levels.astype(int) * 2 + 1
    rng = np.random.default_rng(3)
    checked = 0
    while checked < 40:
        lv = rng.integers(0, 3, 8)
        code = int(sum(int(v) << (2 * i) for i, v in enumerate(lv)))
        d2 = [int(((pts[j] - (2 * lv + 1)) ** 2).sum()) for j in range(g.size)]
        on = [j for j in range(g.size) if d2[j] == 0]
        if on:
            assert g.index[code] == on[0]
            continue
        shells = sorted(set(d2))[:nwant]
        want = sorted((d, j) for j, d in enumerate(d2) if d in shells)
        got = g.nbr[g.nbr_start[code] : g.nbr_start[code] + g.nbr_count[code]]
        assert got.tolist() == [j for _, j in want]
        checked += 1


# ---- the iq2 mixes against llama_model_quantize with an imatrix ------------------------------

IQ2_MIXES = ["iq2_xxs", "iq2_xs", "iq2_s", "iq2_m"]


@pytest.mark.parametrize("model,mix", [("fixture", "iq2_xxs"), ("dim288", "iq2_xs"), ("fixture", "iq2_m")])
def test_mix_files_equal_llama_quantize(f32_mix_models, tmp_path, model, mix):  # noqa: F811
    """Every tensor's type and bytes with the same imatrix: the q2_K/q4_K/q5_K rule tensors,
    token_embd (unweighted), and on dim 288 every fallback (iq4_nl, output q8_0). The type
    sweep below covers odd row lengths in a deep model."""
    src = f32_mix_models[model]
    im = synthetic_imatrix(src, seed=7)
    write_imatrix_gguf(tmp_path / "im.gguf", im)
    theirs = llama_quantize_with_imatrix(src, tmp_path / "theirs.gguf", mix, im)
    ours = tmp_path / "ours.gguf"
    llmconv.quantize(src, ours, outtype=mix, imatrix=tmp_path / "im.gguf")
    assert_same_file(theirs, ours)


@pytest.mark.parametrize(
    "shape",
    [
        (8, 4, 4, False, None),
        (16, 8, 2, True, None),
        (9, 8, 8, False, None),
        (80, 8, 1, False, None),
        (12, 8, 4, False, {(0, "ffn_down"): 200, (1, "ffn_down"): 96, (5, "attn_v"): 288}),
    ],
)
def test_iq2_rule_table_matches_llama_quantize_types(tmp_path, shape):
    src_path = write_tensor_only_llama(tmp_path / "m.gguf", *shape)
    src = open_gguf_source(src_path)
    model = gguf_model_shape(src)
    im = synthetic_imatrix(src_path, seed=2)
    for mix in IQ2_MIXES:
        _, theirs = read(llama_quantize_with_imatrix(src_path, tmp_path / f"{mix}.gguf", mix, im))
        plan = make_plan(src.tensors, TypePolicy(mix, tied_embeddings=src.tied_embeddings, model=model, imatrix=im))
        ours = {t.name: t.qtype.ggml_type.name for t in plan.tensors}
        assert ours == {n: v[0] for n, v in theirs.items()}, mix


def test_iq2_mix_without_imatrix_is_a_one_line_error(f32_mix_models, tmp_path, capsys):  # noqa: F811
    src = f32_mix_models["fixture"]
    for mix in IQ2_MIXES:
        assert main(["quantize", str(src), str(tmp_path / "o.gguf"), "--type", mix, "-q"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "needs an importance matrix" in err and "blk.0." in err, err
    # an imatrix that lacks a tensor the mix puts in iq2: refused too, naming it
    im = synthetic_imatrix(src, seed=1)
    del im.entries["blk.1.ffn_up.weight"]
    write_imatrix_gguf(tmp_path / "im.gguf", im)
    assert (
        main(
            [
                "quantize",
                str(src),
                str(tmp_path / "o.gguf"),
                "--type",
                "iq2_xs",
                "--imatrix",
                str(tmp_path / "im.gguf"),
                "-q",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert "blk.1.ffn_up.weight" in err and "no entry" in err, err


def test_scale_overflow_is_refused_with_the_row():
    x = np.zeros((3, 256), np.float32)
    x[2, 7] = 3e9  # d = max_scale/31 does not fit fp16
    qw = np.ones(256, np.float32)
    for t in IQ2:
        with pytest.raises(Q.NonFiniteError, match="row 2"):
            Q.quantize_tensor(x, t, imatrix=qw)
