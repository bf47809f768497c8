"""The float32 reference forward pass (llmconv.verify.reference) against a second, independent
LLaMA implementation: the model fixtures/make_fixtures.py trained the fixture with (Meta's
complex-number RoPE, repeat_kv and torch's fused attention, where the reference rotates
pairs with cos/sin, groups query heads and writes its own softmax)."""

from __future__ import annotations

import importlib.util
import math
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

from llmconv.errors import LlmconvError
from llmconv.verify import reference
from llmconv.verify.reference import reference_logits

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
ONE_SHARD = FIXTURES / "tiny-llama"
TWO_SHARDS = FIXTURES / "tiny-llama-2shard"


def _load_make_fixtures():
    spec = importlib.util.spec_from_file_location("make_fixtures", FIXTURES / "make_fixtures.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["make_fixtures"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


make_fixtures = _load_make_fixtures()


@pytest.fixture(scope="module")
def sp():
    return spm.SentencePieceProcessor(model_file=str(ONE_SHARD / "tokenizer.model"))


@pytest.fixture(scope="module")
def corpus_tokens(sp):
    """~300 tokens of the training text: a BOS, then whole paragraphs from the middle of the corpus."""
    paras = (FIXTURES / "corpus.txt").read_text(encoding="utf-8").splitlines()
    ids = [sp.bos_id()]
    for para in paras[len(paras) // 2 :]:
        ids += sp.encode(para + "\n")
        if len(ids) >= 300:
            break
    return ids[:300]


def _training_model_logits(tokens: list[int]) -> np.ndarray:
    model = make_fixtures.load_model(ONE_SHARD)
    with torch.no_grad():
        return model(torch.tensor([tokens]))[0].numpy()


def test_reference_matches_training_model(corpus_tokens):
    ref = reference_logits(ONE_SHARD, corpus_tokens)
    want = _training_model_logits(corpus_tokens)
    assert ref.shape == (len(corpus_tokens), 512) and ref.dtype == np.float32
    # Both run in float32 from the same bf16 weights; only summation order differs.
    np.testing.assert_allclose(ref, want, rtol=1e-4, atol=1e-4)


def test_reference_matches_training_model_on_arbitrary_tokens():
    # Byte-fallback tokens, specials and rare pieces, BOS absent: nothing the model was fit to.
    tokens = torch.randint(0, 512, (97,), generator=torch.Generator().manual_seed(7)).tolist()
    np.testing.assert_allclose(
        reference_logits(ONE_SHARD, tokens), _training_model_logits(tokens), rtol=1e-4, atol=1e-4
    )


def test_two_shards_give_the_same_logits(corpus_tokens):
    one = reference_logits(ONE_SHARD, corpus_tokens)
    two = reference_logits(TWO_SHARDS, corpus_tokens)
    # Shards rejoin to the same bf16 tensors, so the float32 arithmetic is the same.
    np.testing.assert_allclose(two, one, rtol=0, atol=1e-6)


def test_reference_predicts_the_corpus(corpus_tokens):
    """The fixture is a trained model and the reference runs it correctly: next-token loss on
    its own training text is far below chance (ln 512 = 6.24)."""
    logits = torch.from_numpy(reference_logits(ONE_SHARD, corpus_tokens))
    loss = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(corpus_tokens[1:])).item()
    assert loss < math.log(512) - 2.0


def test_causal_prefix_logits_do_not_depend_on_later_tokens(corpus_tokens):
    full = reference_logits(ONE_SHARD, corpus_tokens[:40])
    prefix = reference_logits(ONE_SHARD, corpus_tokens[:25])
    np.testing.assert_allclose(full[:25], prefix, rtol=1e-5, atol=1e-5)


def test_layers_are_released_before_the_next_is_loaded(monkeypatch, corpus_tokens):
    """Streaming: when layer i's first tensor is loaded, every float32 copy made for the
    layers before it has been freed."""
    alive: dict[int, list[weakref.ref]] = {}
    loaded_layers = []
    real_load = reference.load_f32

    def tracking_load(ckpt, name):
        t = real_load(ckpt, name)
        if name.startswith("layers."):
            i = int(name.split(".")[1])
            if i not in alive:
                loaded_layers.append(i)
                leaked = [j for j, refs in alive.items() if any(r() is not None for r in refs)]
                assert not leaked, f"layer {leaked} still in memory when layer {i} is loaded"
            alive.setdefault(i, []).append(weakref.ref(t))
        return t

    monkeypatch.setattr(reference, "load_f32", tracking_load)
    reference_logits(ONE_SHARD, corpus_tokens[:16])
    assert loaded_layers == [0, 1]


@pytest.mark.parametrize("tokens", [[], [1, 512], [-1], [1, 2.5]])
def test_bad_tokens_are_user_errors(tokens):
    with pytest.raises(LlmconvError):
        reference_logits(ONE_SHARD, tokens)
