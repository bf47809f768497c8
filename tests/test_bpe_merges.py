"""Merges rebuilt from tiktoken ranks: the same list as the naive definition (every split of every
token into two tokens, by token rank, then by the parts' ranks), and no blow-up on hostile files."""

from __future__ import annotations

import random

import pytest

from llmconv.convert import bpe, tiktoken_bpe
from llmconv.errors import LlmconvError


def naive_merges(ranks: dict[bytes, int], first_rank: int = 0) -> list[str]:
    """What HF's TikTokenConverter computes, literally: O(sum of len^2)."""
    out = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2 or rank < first_rank:
            continue
        local = [
            (ranks[token[:j]], ranks[token[j:]])
            for j in range(1, len(token))
            if token[:j] in ranks and token[j:] in ranks
        ]
        by_rank = sorted(ranks, key=ranks.get)
        out += [f"{bpe.bytes_to_token(by_rank[a])} {bpe.bytes_to_token(by_rank[b])}" for a, b in sorted(local)]
    return out


def random_vocab(seed: int, n: int, alphabet: bytes) -> dict[bytes, int]:
    """A vocabulary grown by joining random pairs of existing tokens, as BPE training does."""
    rng = random.Random(seed)
    ranks = {bytes([b]): b for b in range(256)}
    pool = [bytes([c]) for c in alphabet]
    while len(ranks) < 256 + n:
        t = rng.choice(pool) + rng.choice(pool)
        if t not in ranks and len(t) <= 12:
            ranks[t] = len(ranks)
            pool.append(t)
    return ranks


@pytest.mark.parametrize("seed,alphabet", [(0, b"ab"), (1, b"abc "), (2, bytes(range(200, 210)))])
def test_fast_merges_equal_the_naive_definition(seed, alphabet):
    ranks = random_vocab(seed, 400, alphabet)
    fast = tiktoken_bpe.merges_from_ranks(ranks)
    assert fast == naive_merges(ranks)
    assert len(fast) > 400  # tokens with several splits occur
    assert tiktoken_bpe.merges_from_ranks(ranks, first_rank=300) == naive_merges(ranks, first_rank=300)


def test_hostile_vocabularies_do_not_blow_up():
    """A 2.7 MB file of long tokens: a chain of prefixes of one random 2000-byte string converts
    (one merge each); 2000 tokens "aa...a" would need ~1.3 GB of merges and are refused."""
    rng = random.Random(0)
    base = {bytes([b]): b for b in range(256)}
    x = bytes(rng.randrange(256) for _ in range(2000))
    chain = dict(base)
    for k in range(2, len(x) + 1):
        chain.setdefault(x[:k], len(chain))
    merges = tiktoken_bpe.merges_from_ranks(chain)
    assert len(merges) == len(chain) - 256
    runs = dict(base) | {b"a" * k: 254 + k for k in range(2, 2002)}
    with pytest.raises(LlmconvError, match="MiB"):
        tiktoken_bpe.merges_from_ranks(runs)
