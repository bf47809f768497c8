"""How far a candidate's logits (and weights) are from the reference's, in llama-perplexity's terms.

All logit metrics take float arrays [T, vocab] over the same tokens. Probabilities are computed
in float64 from log-softmax, so a float32 candidate that equals the reference gives KLD ~ 0.

    max_rel_dlogit   max |cand - ref| / max |ref|          (scale: the reference's largest logit)
    mean_rel_dlogit  mean |cand - ref| / max |ref|
    kld_*            KL(P_ref || P_cand) per position: sum_v p_ref (log p_ref - log p_cand), in nats;
                     mean, median and 99th percentile over positions (llama-perplexity --kl-divergence)
    top1             fraction of positions whose argmax agrees ("Same top p")
    ppl_ref/cand     exp(mean next-token NLL): position t predicts token t+1
    ppl_ratio        ppl_cand / ppl_ref

Weights: rel_rmse = rms(dequantized - source) / rms(source), per tensor, worst first.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kld_per_position(ref: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """KL(P_ref || P_cand) in nats for each position [T]."""
    lp, lq = log_softmax(ref), log_softmax(cand)
    # clamp: float rounding can make a KLD of ~0 come out at -1e-17
    return np.maximum((np.exp(lp) * (lp - lq)).sum(axis=-1), 0.0)


def next_token_nll(logits: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """-log p(tokens[t+1] | tokens[..t]) for t = 0..T-2."""
    tokens = np.asarray(tokens)
    lp = log_softmax(logits[:-1])
    return -lp[np.arange(len(tokens) - 1), tokens[1:]]


def perplexity(logits: np.ndarray, tokens: np.ndarray) -> float:
    nll = next_token_nll(logits, tokens)
    return float(np.exp(nll.mean())) if len(nll) else float("nan")


def rel_dlogit_per_position(ref: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """max_v |cand - ref| / max |ref| for each position [T]."""
    scale = float(np.abs(ref).max()) or 1.0
    return np.abs(np.asarray(cand, np.float64) - ref).max(axis=-1) / scale


def logit_metrics(ref: np.ndarray, cand: np.ndarray, tokens: np.ndarray) -> dict:
    ref = np.asarray(ref, np.float64)
    cand = np.asarray(cand, np.float64)
    if ref.shape != cand.shape:
        raise ValueError(f"logit shapes differ: reference {ref.shape}, candidate {cand.shape}")
    scale = float(np.abs(ref).max()) or 1.0
    diff = np.abs(cand - ref)
    kld = kld_per_position(ref, cand)
    ppl_ref, ppl_cand = perplexity(ref, tokens), perplexity(cand, tokens)
    return {
        "max_rel_dlogit": float(diff.max() / scale),
        "mean_rel_dlogit": float(diff.mean() / scale),
        "kld_mean": float(kld.mean()),
        "kld_median": float(np.median(kld)),
        "kld_p99": float(np.percentile(kld, 99)),
        "top1": float((ref.argmax(-1) == cand.argmax(-1)).mean()),
        "ppl_ref": ppl_ref,
        "ppl_cand": ppl_cand,
        "ppl_ratio": ppl_cand / ppl_ref,
    }


def rel_rmse(deq: np.ndarray, src: np.ndarray) -> float:
    """rms(deq - src) / rms(src), accumulated in float64; 0 for an all-zero source that matches."""
    d = np.asarray(deq, np.float64).ravel()
    s = np.asarray(src, np.float64).ravel()
    err = float(np.sqrt(np.mean((d - s) ** 2)))
    ref = float(np.sqrt(np.mean(s**2)))
    if ref == 0.0:
        return 0.0 if err == 0.0 else float("inf")
    return err / ref


def worst_first(rows: Iterable[dict], key: str = "rel_rmse") -> list[dict]:
    return sorted(rows, key=lambda r: (-(r[key] if np.isfinite(r[key]) else np.inf), r["name"]))
