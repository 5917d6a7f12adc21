"""Quality measures shared by the benchmark, QAT and the report: perplexity through the KV
cache (so an int8 cache is part of what is measured)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.model import Transformer, default_cache_dtype, init_cache


def text_windows(ids: Sequence[int], window: int, count: int) -> list[list[int]]:
    """The first `count` non-overlapping windows of `window` tokens."""
    return [list(ids[i * window : (i + 1) * window]) for i in range(count)]


def window_logits(
    model: Transformer, windows: Sequence[Sequence[int]], kv_dtype=None
) -> list[np.ndarray]:
    """Logits [len(window), V] (float64) of each window, run as one prefill through a KV cache
    of `kv_dtype` (default: the model's `kv_cache_dtype`, else its dtype)."""
    kv_dtype = kv_dtype or default_cache_dtype(model)
    graphdef, state = nnx.split(model)
    cfg = model.config

    @jax.jit
    def logits_fn(state, tokens):
        m = nnx.merge(graphdef, state)
        t = tokens.shape[1]
        cache = init_cache(cfg, 1, t, kv_dtype)
        mask = jnp.tril(jnp.ones((t, t), bool))[None]
        logits, _ = m(tokens, jnp.arange(t)[None], mask, cache, jnp.int32(0))
        return logits[0]

    return [
        np.asarray(logits_fn(state, jnp.asarray([ids], jnp.int32)), np.float64) for ids in windows
    ]


def mean_nll(logits: Sequence[np.ndarray], windows: Sequence[Sequence[int]]) -> float:
    """Mean next-token negative log-likelihood of the windows under their logits."""
    nll, count = 0.0, 0
    for lg, ids in zip(logits, windows):
        mx = lg.max(-1, keepdims=True)
        logz = np.log(np.exp(lg - mx).sum(-1)) + mx[:, 0]
        nll += float((logz[:-1] - lg[np.arange(len(ids) - 1), ids[1:]]).sum())
        count += len(ids) - 1
    return nll / count


def perplexity(model: Transformer, windows: Sequence[Sequence[int]], kv_dtype=None) -> float:
    """exp(mean next-token NLL) over the windows, each run as one prefill through a KV cache
    of `kv_dtype` (default: the model's `kv_cache_dtype`, else its dtype)."""
    return math.exp(mean_nll(window_logits(model, windows, kv_dtype), windows))
