"""Issue 7: output independent of thread count, split output that llama.cpp loads, memory
bounded by about one tensor (measured as peak RssAnon of a real conversion process)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader

import llmconv
from llmconv.testing.procstat import run_peak_rss_anon
from synth import meta_state_dict, write_meta_checkpoint

ROOT = Path(__file__).resolve().parents[1]
ONE = ROOT / "fixtures" / "tiny-llama"


@pytest.mark.parametrize("outtype", ["q8_0", "q4_0", "q4_k", "f16"])
def test_thread_count_does_not_change_bytes(tmp_path, outtype):
    """(f16: at -t 1 torch casts on its own thread pool, at -t 4 on each worker alone.)"""
    a, b = tmp_path / "t1.gguf", tmp_path / "t4.gguf"
    llmconv.convert(ONE, a, outtype=outtype, threads=1)
    torch_threads = torch.get_num_threads()
    llmconv.convert(ONE, b, outtype=outtype, threads=4)
    assert torch.get_num_threads() == torch_threads  # the engine gives it back
    assert a.read_bytes() == b.read_bytes()


def test_split_output_metadata(tmp_path, converted):
    out = tmp_path / "m.gguf"
    llmconv.convert(ONE, out, outtype="f16", split_max_tensors=8)
    files = sorted(tmp_path.glob("m-*-of-*.gguf"))
    assert [f.name for f in files] == ["m-00001-of-00003.gguf", "m-00002-of-00003.gguf", "m-00003-of-00003.gguf"]
    readers = [GGUFReader(f) for f in files]
    assert [r.get_field("split.no").contents() for r in readers] == [0, 1, 2]
    assert all(r.get_field("split.count").contents() == 3 for r in readers)
    assert all(r.get_field("split.tensors.count").contents() == 21 for r in readers)
    assert readers[0].get_field("llama.block_count") is not None
    assert readers[1].get_field("llama.block_count") is None
    assert [len(r.tensors) for r in readers] == [8, 8, 5]
    # the same tensors, the same bytes, as the unsplit file
    whole = converted(ONE, "f16")
    want = {t.name: np.asarray(t.data).tobytes() for t in GGUFReader(whole).tensors}
    got = {t.name: np.asarray(t.data).tobytes() for r in readers for t in r.tensors}
    assert got == want


def test_split_by_size(tmp_path):
    out = tmp_path / "m.gguf"
    llmconv.convert(ONE, out, outtype="f32", split_max_size="1M")
    files = sorted(tmp_path.glob("m-*-of-*.gguf"))
    assert len(files) > 1
    for f in files:
        r = GGUFReader(f)
        data = sum(int(t.n_bytes) for t in r.tensors)
        assert data <= 2**20 or len(r.tensors) == 1


@pytest.mark.llamacpp
def test_llamacpp_loads_split_file(tmp_path, converted):
    import llama_cpp

    whole, split = converted(ONE, "f32"), tmp_path / "s.gguf"
    llmconv.convert(ONE, split, outtype="f32", split_max_tensors=5)
    tokens = [1, 100, 200, 300, 400, 50, 60]
    logits = []
    for p in (whole, tmp_path / "s-00001-of-00005.gguf"):
        llm = llama_cpp.Llama(str(p), n_ctx=32, logits_all=True, type_k=0, type_v=0, n_threads=1, verbose=False)
        llm.eval(tokens)
        logits.append(np.array(llm.scores[: len(tokens)]))
        del llm
    assert np.array_equal(logits[0], logits[1])


def _peak_rss_anon(cmd: list[str]) -> int:
    _, peak, code, err = run_peak_rss_anon(cmd)
    assert code == 0, err
    return peak


@pytest.mark.slow
@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_peak_memory_is_about_one_tensor(tmp_path_factory, outtype):
    """~230M parameters (460 MB bf16 checkpoint, 0.9 GB as float32). The bound: a tiny model's
    peak (interpreter, torch, numpy) + 4 x the largest tensor as float32 + 64 MiB."""
    base = tmp_path_factory.getbasetemp() / "big-ckpt"
    if not (base / "params.json").exists():
        sd = meta_state_dict(dim=1536, n_layers=8, n_heads=12, n_kv_heads=12, ffn=4096, seed=2)
        write_meta_checkpoint(base, sd, params={"n_heads": 12, "n_kv_heads": 12, "multiple_of": 256})
        del sd
    largest_f32 = 4096 * 1536 * 4
    model_f32 = 8 * (4 * 1536 * 1536 + 3 * 4096 * 1536) * 4
    tmp = tmp_path_factory.mktemp("mem")
    cmd = [sys.executable, "-m", "llmconv.cli", "convert", "--outtype", outtype, "-q", "-t", "2"]
    small = _peak_rss_anon(cmd + [str(ONE), "-o", str(tmp / "small.gguf")])
    big = _peak_rss_anon(cmd + [str(base), "-o", str(tmp / "big.gguf")])
    bound = small + 4 * largest_f32 + 64 * 2**20
    print(
        f"peak RssAnon: tiny {small / 2**20:.0f} MiB, 230M-param model {big / 2**20:.0f} MiB, "
        f"bound {bound / 2**20:.0f} MiB, whole model as f32 {model_f32 / 2**20:.0f} MiB"
    )
    assert big <= bound


def _convert_chunked(ckpt: Path, outtype: str, out: Path, chunk_weights: int, threads: int) -> bytes:
    from llmconv.convert import stream
    from llmconv.convert.execute import write_gguf
    from llmconv.convert.pipeline import plan_conversion

    conv = plan_conversion(ckpt, outtype=outtype, outfile=out)
    old = stream.CHUNK_WEIGHTS
    stream.CHUNK_WEIGHTS = chunk_weights
    try:
        write_gguf(conv.out_path, conv.kvs, conv.plan, threads=threads, progress=False)
    finally:
        stream.CHUNK_WEIGHTS = old
    return out.read_bytes()


@pytest.mark.parametrize("outtype", ["f16", "q4_0", "q4_k_m"])
def test_chunk_boundaries_do_not_change_bytes(tmp_path, outtype):
    """The engine cuts tensors into chunks of rows and reads them straight from the shards.
    Chunks of 7 rows (cutting across the two shards of a dim-0 split, and through every
    dim-1 split) and of one whole tensor give the same file as the whole-tensor reference:
    each tensor loaded whole (torch.cat of its shards) and quantized in one call."""
    from llmconv import quantize as q
    from llmconv.convert.pipeline import plan_conversion

    two = ROOT / "fixtures" / "tiny-llama-2shard"
    small = _convert_chunked(two, outtype, tmp_path / "a.gguf", 7 * 256, 3)
    big = _convert_chunked(two, outtype, tmp_path / "b.gguf", 1 << 24, 1)
    assert small == big
    conv = plan_conversion(two, outtype=outtype)
    r = GGUFReader(tmp_path / "a.gguf")
    got = {t.name: np.asarray(t.data).view(np.uint8).tobytes() for t in r.tensors}
    for t in conv.plan.tensors:
        assert got[t.name] == q.quantize_tensor(t.src.load(), t.qtype).tobytes(), t.name
