"""Issue 17: PEFT LoRA adapters -> llama.cpp LoRA GGUF (convert-lora), and merged while converting (--lora).

The judge is llama.cpp (it loads base + adapter, or the merged file) against a reference forward pass
(llmconv.verify.reference on a Hugging Face checkpoint) whose weights the test merges itself, from
PEFT's definition, in HF's layout as stored: W + scale * (alpha / r) * B @ A, no row permutation.
So a wrong Q/K permutation, a wrong transpose, a wrong alpha or a wrong rank all show as logit errors.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
from gguf import GGUFReader
from safetensors.torch import load_file, save_file

import llmconv
from llmconv.cli import main

ROOT = Path(__file__).resolve().parents[1]
HF = ROOT / "fixtures" / "hf-tiny-llama"
META = ROOT / "fixtures" / "tiny-llama"
LORA = ROOT / "fixtures" / "lora-tiny-llama"
PREFIX = "base_model.model."


def _load_generator():
    spec = importlib.util.spec_from_file_location("make_lora_fixture", ROOT / "fixtures" / "make_lora_fixture.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["make_lora_fixture"] = mod
    spec.loader.exec_module(mod)
    return mod


ml = _load_generator()


def run(argv, capsys=None):
    code = main([str(a) for a in argv])
    if capsys is not None:
        out = capsys.readouterr()
        return code, out.out, out.err
    return code


# ---- adapter variants (made at test time from the committed fixture) ---------------------------


def fixture_sd() -> dict[str, torch.Tensor]:
    return load_file(str(LORA / "adapter_model.safetensors"))


def variant(tmp: Path, name: str) -> Path:
    """fixture: as committed; rslora: the same matrices, scaled alpha/sqrt(r);
    extras: + a LoRA on embed_tokens, + lm_head saved whole (modules_to_save), + alpha_pattern for down_proj."""
    if name == "fixture":
        return LORA
    cfg, sd = json.loads((LORA / "adapter_config.json").read_text()), fixture_sd()
    if name == "rslora":
        cfg["use_rslora"] = True
    elif name == "extras":
        g = torch.Generator().manual_seed(17)
        base = load_file(str(HF / "model.safetensors"))
        vocab, dim = base["model.embed_tokens.weight"].shape
        sd[PREFIX + "model.embed_tokens.lora_embedding_A"] = torch.randn(ml.RANK, vocab, generator=g) * 0.05
        sd[PREFIX + "model.embed_tokens.lora_embedding_B"] = torch.randn(dim, ml.RANK, generator=g) * 0.05
        sd[PREFIX + "lm_head.weight"] = base["lm_head.weight"].float() + torch.randn(vocab, dim, generator=g) * 0.02
        cfg["target_modules"] = cfg["target_modules"] + ["embed_tokens"]
        cfg["modules_to_save"] = ["lm_head"]
        cfg["alpha_pattern"] = {"down_proj": 4}
    else:
        raise ValueError(name)
    return ml.write_adapter(tmp / name, sd, cfg)


def peft_scale(cfg: dict, module: str, rank: int) -> float:
    alpha = next((v for k, v in cfg.get("alpha_pattern", {}).items() if module.endswith(k)), cfg["lora_alpha"])
    return alpha / (math.sqrt(rank) if cfg.get("use_rslora") else rank)


def merged_hf_checkpoint(out: Path, adapters: list[tuple[Path, float]]) -> Path:
    """The HF fixture with the adapters merged by PEFT's definition, float32, in HF layout as stored."""
    sd = {k: v.float() for k, v in load_file(str(HF / "model.safetensors")).items()}
    for path, scale in adapters:
        cfg = json.loads((path / "adapter_config.json").read_text())
        lsd = load_file(str(path / "adapter_model.safetensors"))
        for key, t in lsd.items():
            module = key[len(PREFIX) :]
            if module.endswith(".lora_A.weight"):
                module = module[: -len(".lora_A.weight")]
                b = lsd[PREFIX + module + ".lora_B.weight"]
                sd[module + ".weight"] += scale * peft_scale(cfg, module, t.shape[0]) * (b.float() @ t.float())
            elif module.endswith(".lora_embedding_A"):
                module = module[: -len(".lora_embedding_A")]
                b = lsd[PREFIX + module + ".lora_embedding_B"]
                sd[module + ".weight"] += scale * peft_scale(cfg, module, t.shape[0]) * (b.float() @ t.float()).T
            elif module.endswith(".weight") and "lora_" not in module:
                sd[module] = t.float().clone()  # modules_to_save: replaced whole
    out.mkdir(parents=True)
    for f in HF.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, out / f.name)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out / "model.safetensors"))
    return out


def tokens(n: int = 80) -> list[int]:
    sp = spm.SentencePieceProcessor(model_file=str(HF / "tokenizer.model"))
    text = (
        "The hacker culture is a loosely networked collection of subcultures. A kludge is a clever "
        "programming trick; a hack is an appropriate application of ingenuity. Some say foo and bar."
    )
    return ([sp.bos_id()] + sp.encode(text))[:n]


def reference(ckpt: Path) -> np.ndarray:
    from llmconv.verify.reference import reference_logits

    return reference_logits(ckpt, tokens())


def llamacpp_logits(model: Path, lora: Path | None = None) -> np.ndarray:
    import llama_cpp

    kw = {"lora_path": str(lora)} if lora else {}
    llm = llama_cpp.Llama(
        str(model), n_ctx=128, n_batch=128, logits_all=True, type_k=0, type_v=0, n_threads=1, verbose=False, **kw
    )
    toks = tokens()
    llm.eval(toks)
    return np.array(llm.scores[: len(toks)], dtype=np.float32)


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("lora")


@pytest.fixture(scope="module")
def base_f32(converted):
    """f32 GGUFs of the base, from the HF checkpoint and from its Meta twin."""
    return {kind: converted(ckpt, "f32") for kind, ckpt in (("hf", HF), ("meta", META))}


# ---- the adapter file ------------------------------------------------------------------------


def gguf_fields(path: Path) -> dict:
    r = GGUFReader(str(path))
    return {f.name: f.contents() for f in r.fields.values() if not f.name.startswith("GGUF.")}


def gguf_arrays(path: Path) -> dict[str, np.ndarray]:
    r = GGUFReader(str(path))
    return {t.name: np.array(t.data) for t in r.tensors}


def test_adapter_file_has_llamacpp_keys_and_unpermuted_q_k(work):
    out = work / "keys.gguf"
    llmconv.convert_lora(LORA, HF, out)
    f = gguf_fields(out)
    assert (f["general.type"], f["adapter.type"], f["general.architecture"]) == ("adapter", "lora", "llama")
    assert f["adapter.lora.alpha"] == 16.0
    arrays, sd = gguf_arrays(out), fixture_sd()
    assert len(arrays) == len(sd)
    p = ml.mf.PARAMS
    for layer in range(p["n_layers"]):
        for gg, hf, heads in (
            ("attn_q", "self_attn.q_proj", p["n_heads"]),
            ("attn_k", "self_attn.k_proj", p["n_kv_heads"]),
            ("attn_v", "self_attn.v_proj", None),
            ("ffn_down", "mlp.down_proj", None),
        ):
            a = sd[f"{PREFIX}model.layers.{layer}.{hf}.lora_A.weight"]
            b = sd[f"{PREFIX}model.layers.{layer}.{hf}.lora_B.weight"]
            got_a = arrays[f"blk.{layer}.{gg}.weight.lora_a"]
            got_b = torch.from_numpy(arrays[f"blk.{layer}.{gg}.weight.lora_b"].copy())
            assert np.array_equal(got_a, a.numpy())
            # the file's B rows are Meta's order: putting them in HF's rotate-half order gives the adapter's B
            assert torch.equal(ml.mh.to_hf_rows(got_b, heads) if heads else got_b, b)


def test_rslora_alpha_folds_sqrt_r(work):
    out = work / "rs.gguf"
    llmconv.convert_lora(variant(work, "rslora"), HF, out)
    assert gguf_fields(out)["adapter.lora.alpha"] == np.float32(16 * math.sqrt(8))


@pytest.mark.llamacpp
@pytest.mark.parametrize("base,name", [("hf", "fixture"), ("meta", "fixture"), ("hf", "rslora"), ("meta", "extras")])
def test_llamacpp_with_adapter_gives_the_merged_reference(work, base_f32, base, name):
    adapter = variant(work, name) if name != "fixture" else LORA
    out = work / f"{base}-{name}.gguf"
    llmconv.convert_lora(adapter, HF if base == "hf" else META, out, force=True)
    ref = reference(merged_hf_checkpoint(work / f"ref-{base}-{name}", [(adapter, 1.0)]))
    without = llamacpp_logits(base_f32[base])
    assert rel_err(without, ref) > 0.02  # the adapter changes the output measurably
    assert rel_err(llamacpp_logits(base_f32[base], out), ref) <= 2e-5


@pytest.mark.llamacpp
@pytest.mark.parametrize("outtype,bound", [("f16", 2e-3), ("bf16", 2e-2), ("q8_0", 2e-2)])
def test_adapter_types_load_in_llamacpp(work, base_f32, outtype, bound):
    out = work / f"t-{outtype}.gguf"
    llmconv.convert_lora(LORA, HF, out, outtype=outtype, force=True)
    r = GGUFReader(str(out))
    types = {t.name: t.tensor_type.name for t in r.tensors}
    if outtype == "q8_0":  # A's rows (256, 768) take q8_0 blocks; B's rows are r = 8 long: f16
        assert types["blk.0.attn_q.weight.lora_a"] == "Q8_0" and types["blk.0.attn_q.weight.lora_b"] == "F16"
    else:
        assert set(types.values()) == {outtype.upper()}
    ref = reference(merged_hf_checkpoint(work / f"ref-t-{outtype}", [(LORA, 1.0)]))
    assert rel_err(llamacpp_logits(base_f32["hf"], out), ref) <= bound


def test_bin_adapter_gives_the_same_file(work):
    binned = ml.write_adapter(
        work / "bin" / LORA.name, fixture_sd(), json.loads((LORA / "adapter_config.json").read_text()), fmt="bin"
    )
    a, b = work / "st.gguf", work / "bin.gguf"
    llmconv.convert_lora(LORA, HF, a)
    llmconv.convert_lora(binned, HF, b)
    assert a.read_bytes() == b.read_bytes()


# ---- merged while converting -------------------------------------------------------------------


@pytest.mark.llamacpp
@pytest.mark.parametrize(
    "base,adapters",
    [
        ("hf", [("fixture", 1.0)]),
        ("meta", [("fixture", 1.0), ("rslora", 0.5)]),
        ("hf", [("extras", 0.75)]),
    ],
)
def test_merged_f32_gives_the_merged_reference(work, base, adapters):
    paths = [(variant(work, n), s) for n, s in adapters]
    out = work / f"merged-{base}-{len(adapters)}-{adapters[0][0]}.gguf"
    specs = [f"{p}:{s}" if s != 1.0 else str(p) for p, s in paths]
    llmconv.convert(HF if base == "hf" else META, out, outtype="f32", force=True, lora=specs)
    ref = reference(merged_hf_checkpoint(work / f"ref-m-{out.stem}", paths))
    assert rel_err(llamacpp_logits(out), ref) <= 2e-5


@pytest.mark.llamacpp
def test_merged_q4_k_m_is_llama_quantize_of_the_merged_f32(work):
    import llama_cpp
    import llama_cpp._logger

    f32, ours, theirs = work / "mq-f32.gguf", work / "mq-ours.gguf", work / "mq-theirs.gguf"
    lora = [str(LORA), f"{variant(work, 'rslora')}:0.5"]
    llmconv.convert(HF, f32, outtype="f32", force=True, lora=lora)
    llmconv.convert(HF, ours, outtype="q4_K_M", force=True, lora=lora)
    llama_cpp._logger.set_verbose(False)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, 1
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(theirs).encode(), params) == 0
    mine, ref = (
        {t.name: (t.tensor_type.name, np.asarray(t.data).tobytes()) for t in GGUFReader(str(p)).tensors}
        for p in (ours, theirs)
    )  # llama.cpp writes them in another order
    assert {n: t for n, (t, _) in mine.items()} == {n: t for n, (t, _) in ref.items()}
    assert "Q4_K" in {t for t, _ in mine.values()}
    for name in ref:
        assert mine[name][1] == ref[name][1], name


def test_lora_spec_parsing():
    from llmconv.convert.lora import parse_lora_spec

    assert parse_lora_spec("a/b") == (Path("a/b"), 1.0)
    assert parse_lora_spec("a/b:0.5") == (Path("a/b"), 0.5)
    assert parse_lora_spec("c:/x/y") == (Path("c:/x/y"), 1.0)


# ---- what is refused ---------------------------------------------------------------------------


def _broken(tmp: Path, name: str, cfg_change=None, sd_change=None) -> Path:
    cfg, sd = json.loads((LORA / "adapter_config.json").read_text()), fixture_sd()
    cfg.update(cfg_change or {})
    if sd_change:
        sd_change(sd)
    return ml.write_adapter(tmp / name, sd, cfg)


BROKEN = {
    "dora": (dict(use_dora=True), None, "DoRA"),
    "layers_to_transform": (dict(layers_to_transform=[1]), None, "outside layers_to_transform"),
    "layers_pattern": (dict(layers_pattern="h"), None, "layers_pattern"),
    "target_modules": (dict(target_modules=["q_proj"]), None, "target_modules"),
    "bias": (dict(bias="all"), None, "bias"),
    "rank": (dict(r=4), None, "rank 8"),
    "missing_b": (None, lambda sd: sd.pop(PREFIX + "model.layers.1.mlp.up_proj.lora_B.weight"), "lora_B is missing"),
    "stray": (None, lambda sd: sd.__setitem__(PREFIX + "model.norm.weight", torch.ones(256)), "not a LoRA matrix"),
    "magnitude": (
        None,
        lambda sd: sd.__setitem__(PREFIX + "model.layers.0.self_attn.q_proj.lora_magnitude_vector", torch.ones(256)),
        "DoRA",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_unsupported_adapters_are_one_line_errors(tmp_path, capsys, case):
    cfg_change, sd_change, needle = BROKEN[case]
    path = _broken(tmp_path, case, cfg_change, sd_change)
    for argv in (
        ["convert-lora", path, "--base", HF, "-o", tmp_path / "x.gguf"],
        ["convert", HF, "--lora", path, "-o", tmp_path / "y.gguf", "--dry-run"],
    ):
        code, _, err = run(argv, capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("llmconv: error: "), err
        assert needle in lines[0] and str(path) in lines[0], lines[0]
    assert not (tmp_path / "x.gguf").exists()


def test_adapter_for_another_base_is_refused(tmp_path, capsys):
    code, _, err = run(
        ["convert-lora", LORA, "--base", ROOT / "fixtures" / "llama3-tiny", "-o", tmp_path / "x.gguf"], capsys
    )
    assert code == 2 and "made for another base model" in err and "lora_A" in err, err


def test_lm_head_on_a_tied_base_is_refused(tmp_path, capsys):
    tied = tmp_path / "tied"
    shutil.copytree(HF, tied)
    sd = load_file(str(HF / "model.safetensors"))
    del sd["lm_head.weight"]
    save_file(sd, str(tied / "model.safetensors"))
    cfg = json.loads((tied / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    adapter = variant(tmp_path, "extras")
    code, _, err = run(["convert", tied, "--lora", adapter, "--dry-run"], capsys)
    assert code == 2 and "ties" in err, err


def test_malicious_bin_adapter_is_refused(tmp_path, capsys):
    sentinel = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            import os

            return os.system, (f"touch {sentinel}",)

    path = tmp_path / "evil"
    path.mkdir()
    (path / "adapter_config.json").write_text((LORA / "adapter_config.json").read_text())
    torch.save({"x": Evil()}, path / "adapter_model.bin")
    code, _, err = run(["convert-lora", path, "--base", HF, "-o", tmp_path / "x.gguf"], capsys)
    assert code == 2 and "refused" in err and not sentinel.exists(), err


# ---- verify --lora ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "base,ref,name,scale,outtype",
    [
        ("hf", "hf", "fixture", 1.0, "q8_0"),
        ("hf", "meta", "extras", 0.75, "f32"),
    ],
)
def test_verify_applies_the_adapter_to_the_reference(work, capsys, base, ref, name, scale, outtype):
    adapter = variant(work, name)
    spec = f"{adapter}:{scale}" if scale != 1.0 else str(adapter)
    out = work / f"v-{base}-{name}-{outtype}.gguf"
    llmconv.convert(HF if base == "hf" else META, out, lora=[spec], outtype=outtype, force=True)
    ref_dir = HF if ref == "hf" else META
    # fidelity (tensors, the expected pass) and quality (the float reference, gated here) both see the adapter
    code, stdout, err = run(["verify", out, "-r", ref_dir, "--lora", spec, "--tokens", 64, "--max-kld", 0.01], capsys)
    assert code == 0, stdout + err
    code, stdout, err = run(["verify", out, "-r", ref_dir, "--tokens", 64], capsys)
    assert code == 1, stdout + err  # the same file against the base alone is out of bounds
