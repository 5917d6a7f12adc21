"""Decode-step products that take a neighbouring op into the int8 GEMV's launch (GPU).

At batch 1 a layer of Llama-3.2-1B runs its GEMVs in ~5-16 µs each, and each small XLA
kernel beside them (an RMSNorm, the SwiGLU product, a residual add) costs a launch and a
trip of the activations through memory, a few µs more. So when a product goes to the Pallas
GEMV (`int8_kernel.uses_int8_kernel`), the norm before it, the SwiGLU after the gate/up
product and the residual add after the o and down products run inside the same kernel
(`pallas_kernels.quant_matmul.Fusion`). Everything else runs the model's own ops, one at a
time; the results agree to rounding.

Axes: leading batch axes ..., in I, out O.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from jaxllm.quant.int8_kernel import fusion_enabled, uses_int8_kernel
from jaxllm.quant.layers import QuantizedLinear
from pallas_kernels import quant_matmul


def _kernel_weight(lin: Any, x: jax.Array):
    """The QuantizedWeight of `lin` when its product with x goes to the Pallas GEMV plainly
    (no bias, smoothing or activation quantization), else None."""
    if type(lin) is not QuantizedLinear or not fusion_enabled():
        return None
    if lin.bias is not None or lin.inv_smooth is not None or lin.activation_bits is not None:
        return None
    w = lin.qweight
    return w if uses_int8_kernel(x, w) else None


def _call(x: jax.Array, w, **fusion) -> jax.Array:
    x2 = x.reshape(-1, x.shape[-1])
    y = quant_matmul.int8_matmul(x2, w.values, w.scale, **fusion)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def _norm_kernel_weight(norm: Any | None, lin: Any, x: jax.Array):
    """`_kernel_weight` where the kernel can also do the norm: there is one, and its weight
    has x's dtype (the kernel rounds the normalised x to x's dtype, as `RMSNorm` does then;
    a wider weight would promote the product)."""
    if norm is None or norm.weight[...].dtype != x.dtype:
        return None
    return _kernel_weight(lin, x)


def norm_linear(norm: Any | None, lin: Callable[[jax.Array], jax.Array], x: jax.Array) -> jax.Array:
    """lin(norm(x)) for an `RMSNorm` norm (None: lin(x)): x [..., I] -> [..., O]."""
    w = _norm_kernel_weight(norm, lin, x)
    if w is None:
        return lin(x if norm is None else norm(x))
    return _call(x, w, norm_weight=norm.weight[...], norm_eps=norm.eps)


def norm_swiglu(norm: Any | None, lin: Callable[[jax.Array], jax.Array], x: jax.Array) -> jax.Array:
    """silu(gate) * up of h = lin(norm(x)) (norm None: lin(x)), whose rows are [gate; up]:
    x [..., I] -> [..., O/2]."""
    w = _norm_kernel_weight(norm, lin, x)
    if w is None:
        h = lin(x if norm is None else norm(x))
        width = h.shape[-1] // 2
        return jax.nn.silu(h[..., :width]) * h[..., width:]
    return _call(x, w, norm_weight=norm.weight[...], norm_eps=norm.eps, swiglu=True)


def linear_residual(
    lin: Callable[[jax.Array], jax.Array], h: jax.Array, residual: jax.Array | None
) -> jax.Array:
    """residual + lin(h) (residual None: lin(h)): h [..., I], residual [..., O] -> [..., O]."""
    if residual is None:
        return lin(h)
    w = _kernel_weight(lin, h)
    if w is None or residual.dtype != h.dtype:
        return residual + lin(h)
    return _call(h, w, residual=residual.reshape(-1, residual.shape[-1]))
