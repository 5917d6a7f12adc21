"""GPTQ for a tied embedding table [V, E], which is also the model's output head.

As the head, the table multiplies the final normed hidden states x [E]: its error costs
||x (T - Q)^T||^2, GPTQ's usual objective with H = X^T X over calibration tokens. As the
lookup table, a row's error enters the residual stream as it is: ||T_v - Q_v||^2, an
identity Hessian. One sweep minimises both,

    H_table = X^T X / n + alpha * mean(diag(X^T X / n)) * I,

alpha weighing a row's lookup error against its head error (alpha = 0: head only; large
alpha: round to nearest). `choose_alpha` picks alpha by held-out perplexity within the
calibration windows (fit the Hessian on one half, score on the other, both ways), so the
evaluation text is never looked at.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from flax import nnx

from jaxllm.errors import JaxLLMError
from jaxllm.model import Transformer
from jaxllm.quant.qtensor import QuantizedWeight, dequantize

# Chosen by `choose_alpha` on SmolLM2-135M's GPL-3 calibration windows (the text's last 4 of
# 512 tokens) for int4-g32 asymmetric: see benchmarks/results/table_alpha_cpu.md.
DEFAULT_ALPHA = 0.3


def table_hessian(head_gram: np.ndarray, n_tokens: int, alpha: float) -> np.ndarray:
    """H_table [E, E] from the head inputs' X^T X [E, E] over `n_tokens` calibration tokens."""
    if n_tokens <= 0 or alpha < 0:
        raise JaxLLMError(
            f"table Hessian needs n_tokens > 0 and alpha >= 0, got {n_tokens}, {alpha}"
        )
    h = np.asarray(head_gram, np.float64) / n_tokens
    h = h + alpha * np.mean(np.diag(h)) * np.eye(h.shape[0])
    return h.astype(np.float32)


def hessian_error(w: np.ndarray, qw: QuantizedWeight, h: np.ndarray) -> float:
    """tr((W - dq(Q)) H (W - dq(Q))^T): GPTQ's objective for w [O, I] and H [I, I]."""
    d = np.asarray(w, np.float32) - np.asarray(dequantize(qw))
    return float(np.sum((d @ np.asarray(h, np.float32)) * d))


def head_grams(model: Transformer, windows: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """X^T X [E, E] of the tied head's inputs, one per window (float model)."""
    from jaxllm.quant.gptq import collect_hessians

    if model.lm_head is not None:
        raise JaxLLMError("the model's output head is not tied to its embedding")
    return [np.asarray(collect_hessians(model, [ids])["embed"]) for ids in windows]


def choose_alpha(
    model: Transformer,
    windows: Sequence[Sequence[int]],
    alphas: Sequence[float],
    bits: int,
    group: int,
    symmetric: bool,
    log=print,
    gptq_options: Mapping[str, object] | None = None,
    grams: Sequence[np.ndarray] | None = None,
) -> tuple[float, dict[float, float]]:
    """(best alpha, {alpha: held-out perplexity}) for GPTQ of the tied table alone.

    The windows (calibration text only) are split in two halves; each half's head Hessian
    quantizes the table, and the model with only that table quantized is scored on the other
    half. The score is the perplexity over both held-out halves. `gptq_options` go to
    `gptq_quantize` (percdamp, act_order, static_groups); `grams` are `head_grams(model,
    windows)` when already at hand.
    """
    from jaxllm.quant.evaluate import perplexity
    from jaxllm.quant.gptq import gptq_quantize
    from jaxllm.quant.layers import QuantizedEmbedding

    if len(windows) < 2:
        raise JaxLLMError(
            f"choosing alpha needs at least 2 calibration windows, got {len(windows)}"
        )
    grams = head_grams(model, windows) if grams is None else grams
    half = len(windows) // 2
    folds = [(range(half), range(half, len(windows))), (range(half, len(windows)), range(half))]
    table = model.embed.table[...]
    scores = {}
    for alpha in alphas:
        nll = count = 0.0
        for fit, held in folds:
            n_fit = sum(len(windows[i]) for i in fit)
            h = table_hessian(sum(grams[i] for i in fit), n_fit, alpha)
            qw = gptq_quantize(table, h, bits, group, symmetric=symmetric, **(gptq_options or {}))
            m = nnx.clone(model)
            m.embed = QuantizedEmbedding(qw, m.dtype)
            held_windows = [windows[i] for i in held]
            n = sum(len(w) - 1 for w in held_windows)
            nll += np.log(perplexity(m, held_windows)) * n
            count += n
        scores[alpha] = float(np.exp(nll / count))
        log(
            f"[jaxllm] table GPTQ alpha={alpha}: held-out calibration perplexity "
            f"{scores[alpha]:.4f}"
        )
    return min(scores, key=scores.get), scores
