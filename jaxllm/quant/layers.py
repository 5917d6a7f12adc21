"""NNX modules that stand in for the model's `Linear` and `Embedding` with quantized weights.

They hold the integer codes and scales as `QuantizedParam` variables (not `nnx.Param`: an
optimizer over `nnx.Param` leaves them alone) and call the same way as the float modules,
so the model's code does not change.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.quant.matmul import qlinear
from jaxllm.quant.qtensor import QuantizedWeight, dequantize


class QuantizedParam(nnx.Variable):
    """Integer codes, scales or offsets of a quantized weight."""


def _hold(w: QuantizedWeight) -> tuple[QuantizedParam, QuantizedParam, QuantizedParam | None]:
    offset = QuantizedParam(w.offset) if w.offset is not None else None
    return QuantizedParam(w.values), QuantizedParam(w.scale), offset


def _hold_supers(w: QuantizedWeight) -> tuple[QuantizedParam | None, QuantizedParam | None]:
    """The float16 super-scales of double-quantized scales (None, None without them)."""
    if w.scale_super is None:
        return None, None
    return QuantizedParam(w.scale_super), QuantizedParam(w.offset_super)


class _Holds:
    values: QuantizedParam
    scale: QuantizedParam
    offset: QuantizedParam | None
    scale_super: QuantizedParam | None = None
    offset_super: QuantizedParam | None = None
    bits: int
    group: int

    @property
    def qweight(self) -> QuantizedWeight:
        offset = self.offset[...] if self.offset is not None else None
        supers = [None if p is None else p[...] for p in (self.scale_super, self.offset_super)]
        return QuantizedWeight(
            self.values[...], self.scale[...], offset, self.bits, self.group, *supers
        )


class QuantizedLinear(_Holds, nnx.Module):
    """y = x @ W^T + b with W a `QuantizedWeight` [out, in]."""

    def __init__(
        self,
        w: QuantizedWeight,
        bias: jax.Array | None = None,
        activation_bits: int | None = None,
        inv_smooth: jax.Array | None = None,
        activation_group: int | None = None,
    ):
        self.values, self.scale, self.offset = _hold(w)
        self.scale_super, self.offset_super = _hold_supers(w)
        self.bits, self.group = w.bits, w.group
        self.activation_bits = activation_bits
        self.activation_group = activation_group
        self.bias = nnx.Param(bias) if bias is not None else None
        # SmoothQuant: W was multiplied by s per input channel, so x is divided by it.
        self.inv_smooth = QuantizedParam(inv_smooth) if inv_smooth is not None else None

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.inv_smooth is not None:
            x = x * self.inv_smooth[...].astype(x.dtype)
        y = qlinear(x, self.qweight, self.activation_bits, self.activation_group)
        if self.bias is not None:
            y = y + self.bias[...]
        return y


class QuantizedEmbedding(_Holds, nnx.Module):
    """Token embedding [V, E] in quantized rows; `attend` is the tied output head."""

    def __init__(self, w: QuantizedWeight, dtype, activation_bits: int | None = None):
        self.values, self.scale, self.offset = _hold(w)
        self.scale_super, self.offset_super = _hold_supers(w)
        self.bits, self.group = w.bits, w.group
        self.dtype = dtype
        self.activation_bits = activation_bits

    def __call__(self, ids: jax.Array) -> jax.Array:
        """ids [B, T] -> [B, T, E]: only the looked-up rows are dequantized."""
        w = self.qweight
        flat = ids.reshape(-1)

        def take(a):
            return None if a is None else jnp.take(a, flat, axis=0)

        rows = QuantizedWeight(
            take(w.values), take(w.scale), take(w.offset), w.bits, w.group,
            take(w.scale_super), take(w.offset_super),
        )  # fmt: skip
        return dequantize(rows, self.dtype).reshape(*ids.shape, -1)

    def attend(self, x: jax.Array) -> jax.Array:
        """x [B, T, E] -> logits [B, T, V] in float32."""
        return qlinear(x, self.qweight, self.activation_bits).astype(jnp.float32)


class BlockQ8Linear(QuantizedLinear):
    """A GGUF block weight multiplied as llama.cpp's CPU backend does: activations in 8-bit
    blocks of 32, integer block products (`jaxllm.quant.ggml_dot`)."""

    def __call__(self, x: jax.Array) -> jax.Array:
        from jaxllm.quant.ggml_dot import blocked_dot

        y = blocked_dot(x, self.qweight).astype(x.dtype)
        if self.bias is not None:
            y = y + self.bias[...]
        return y


class BlockQ8Embedding(QuantizedEmbedding):
    """`QuantizedEmbedding` whose tied output head takes `BlockQ8Linear`'s product."""

    def attend(self, x: jax.Array) -> jax.Array:
        from jaxllm.quant.ggml_dot import blocked_dot

        return blocked_dot(x, self.qweight)
