"""SmoothQuant (Xiao et al., 2022) for w8a8: move activation outliers into the weights.

A few input channels of SmolLM2's layers carry activations far larger than the rest, and one
int8 scale per token then leaves the others a handful of levels. With per-channel factors
s [I], x @ W^T = (x / s) @ (W * s)^T; choosing s_j = max|x_j|^a / max|W_j|^(1-a) evens the
channels out between the two operands before both are quantized. The factors come from the
float model's activations on offline calibration text; 1 / s is applied to x inside the
quantized layer (one multiply per element, fused into the activation quantizer).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jaxllm.model import Transformer
from jaxllm.quant.calibrate import record_linear_inputs


def input_absmax(model: Transformer, windows: Sequence[Sequence[int]]) -> dict[str, jax.Array]:
    """max |x_j| [I] of every linear layer's inputs over the windows (one eager pass)."""

    def fold_max(prev, x):
        amax = jnp.max(jnp.abs(x), axis=0)
        return amax if prev is None else jnp.maximum(prev, amax)

    return record_linear_inputs(model, windows, fold_max)


def smoothing_factors(act_absmax: jax.Array, weight: jax.Array, alpha: float = 0.5) -> jax.Array:
    """s [I] for weight [O, I]: max|x_j|^alpha / max|W_j|^(1 - alpha)."""
    w_absmax = jnp.max(jnp.abs(weight), axis=0)
    s = jnp.maximum(act_absmax, 1e-5) ** alpha / jnp.maximum(w_absmax, 1e-5) ** (1 - alpha)
    return jnp.clip(s, 1e-5, 1e5).astype(jnp.float32)
