"""The quantized product the model's layers call: y = x @ W^T for a `QuantizedWeight` W [O, I].

Weight-only: on CPU, few-row float32 products (decode) go to the native kernel
`cpu_kernels/qmatvec.cc`, which reads the codes once and widens them in registers. Elsewhere
the weight is dequantized inside the jitted step (a temporary of the program, never an
input) and multiplied by the model's own `linear`, except that on GPU few-row products with
per-channel int8 weights go to the Pallas kernel `pallas_kernels/quant_matmul.py`
(`jaxllm/quant/int8_kernel.py` says when).

w8a8: x is quantized per token (row) to int8 on the fly, multiplied with the int8 codes
accumulating in int32 (`preferred_element_type`: an int8 result would overflow), and the
result is scaled by the row scale times the channel scale. On CPU every such product, decode
or prefill, runs in the native VNNI kernels (`qmatvec.cc` for 1-3 rows, `int8_gemm.cc`
from 4), which also quantize x: XLA:CPU's int8 dot runs below its float32 rate, theirs at
3-4x it.

Axes: leading batch axes ..., in I, out O.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import cpu_kernels
from jaxllm.cpu_kernels import linear
from jaxllm.quant.int8_kernel import int8_kernel_qlinear, uses_int8_kernel
from jaxllm.quant.qtensor import QuantizedWeight, dequantize, group_params


def _native_int8() -> bool:
    """Whether w8a8's int8 x int8 products go to the native VNNI kernels: on CPU, where the
    kernels are built (any number of rows)."""
    return jax.default_backend() == "cpu" and cpu_kernels.available()


def native_w8a8(
    x: jax.Array,
    codes: jax.Array,
    groups: int,
    scale: jax.Array | None = None,
    valid_rows: jax.Array | None = None,
) -> jax.Array:
    """`qmatvec.cc`'s JaxllmW8A8Dot: x quantized per row per `groups` groups of inputs as
    `quantize_rows` does, times int8 codes [O, I], each group's integer product exact, times
    its activation scale; then, with `scale` [O], each output column times it (one rounding,
    as a multiply after the product). x [..., I] -> float32 [rows, O] (rows: the leading axes
    flattened). Quantizing and scaling in the kernel saves XLA:CPU five ops per product (the
    scale of the 49152-wide head alone was ~4 ms of a 64-sequence decode step).
    `valid_rows` (int scalar): rows from it on are padding, returned zero and not computed."""
    rows, n_in = math.prod(x.shape[:-1]), x.shape[-1]
    out = jax.ShapeDtypeStruct((rows, codes.shape[0]), jnp.float32)
    scale = jnp.zeros((0,), jnp.float32) if scale is None else scale.astype(jnp.float32)
    if valid_rows is None:
        valid = jnp.zeros((0,), jnp.int32)
    else:
        valid = jnp.reshape(jnp.asarray(valid_rows, jnp.int32), (1,))
    return jax.ffi.ffi_call("JaxllmW8A8Dot", out, vmap_method="sequential")(
        x.reshape(rows, n_in).astype(jnp.float32), codes, scale, valid, groups=np.int64(groups)
    )


def grouped_int8_matmul(x: jax.Array, w: QuantizedWeight, group: int) -> jax.Array:
    """Dynamic int8 activations with one scale per token per `group` inputs, times per-channel
    int8 weights: int8 x int8 -> int32 per group (a batched dot over the groups), then each
    group's partial sum scaled by its activation scale. x [..., I] -> float32 [..., O]."""
    lead, n_in = x.shape[:-1], x.shape[-1]
    ng = n_in // group
    if _native_int8():  # quantized in the kernel; exact int32 per group, scaled once per group
        return native_w8a8(x, w.values, ng, w.scale[:, 0]).reshape(*lead, -1)
    xq, xs = quantize_rows(x.reshape(-1, ng, group))  # [R, N, g], [R, N, 1]
    wq = w.values.reshape(-1, ng, group)  # [O, N, g]
    dims = (((2,), (2,)), ((1,), (1,)))  # contract g, batch over the groups N
    acc = jax.lax.dot_general(xq, wq, dims, preferred_element_type=jnp.int32)  # [N, R, O]
    y = jnp.sum(acc.astype(jnp.float32) * jnp.moveaxis(xs, 1, 0), axis=0)
    return (y * w.scale[:, 0].astype(jnp.float32)).reshape(*lead, -1)


def quantize_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Dynamic per-row int8: x [..., I] -> (codes int8 [..., I], scale float32 [..., 1])."""
    x32 = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x32), axis=-1, keepdims=True)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    q = jnp.clip(jnp.round(x32 / scale), -127, 127).astype(jnp.int8)
    return q, scale


def int8_matmul(xq: jax.Array, wq: jax.Array) -> jax.Array:
    """int8 [..., I] x int8 [O, I] -> int32 [..., O] (XLA's dot: on CPU `qlinear` takes the
    native kernels before it gets here)."""
    dims = (((xq.ndim - 1,), (1,)), ((), ()))
    return jax.lax.dot_general(xq, wq, dims, preferred_element_type=jnp.int32)


def qlinear(
    x: jax.Array,
    w: QuantizedWeight,
    activation_bits: int | None = None,
    activation_group: int | None = None,
) -> jax.Array:
    """x [..., I] @ W^T -> [..., O] in x's dtype. `activation_group`: with int8 activations,
    one scale per token per that many inputs instead of one per token."""
    if activation_bits == 8:
        if w.bits != 8 or w.group != w.shape[1]:
            raise ValueError("w8a8 needs per-channel int8 weights")
        if activation_group is not None and activation_group < x.shape[-1]:
            return grouped_int8_matmul(x, w, activation_group).astype(x.dtype)
        if _native_int8():  # one group per row: round(acc * xs), as below
            y = native_w8a8(x, w.values, 1, w.scale[:, 0]).reshape(*x.shape[:-1], -1)
            return y.astype(x.dtype)
        xq, xs = quantize_rows(x)
        acc = int8_matmul(xq, w.values).astype(jnp.float32)
        return (acc * xs * w.scale[:, 0].astype(jnp.float32)).astype(x.dtype)
    if uses_int8_kernel(x, w):  # GPU decode: the Pallas GEMV streams the int8 codes
        return int8_kernel_qlinear(x, w)
    if uses_native_qmatvec(x, w):
        return native_qlinear(x, w)
    return linear(x, dequantize(w, x.dtype))


def uses_native_qmatvec(x: jax.Array, w: QuantizedWeight) -> bool:
    rows = math.prod(x.shape[:-1])
    multiple = 16 if w.bits == 8 else 32
    return (
        rows <= cpu_kernels.MAX_ROWS
        and x.dtype == jnp.float32
        and w.group % multiple == 0
        and jax.default_backend() == "cpu"
        and cpu_kernels.available()
    )


def native_qlinear(x: jax.Array, w: QuantizedWeight) -> jax.Array:
    """`qmatvec.cc` (no checks: see `uses_native_qmatvec`). x [..., I] -> [..., O] float32."""
    o, i = w.shape
    out = jax.ShapeDtypeStruct(x.shape[:-1] + (o,), jnp.float32)
    scale, offset = group_params(w)  # double-quantized scales decode here, [O, N] each
    if w.bits == 8:
        return jax.ffi.ffi_call("JaxllmQMatVec8", out, vmap_method="sequential")(x, w.values, scale)
    groups = i // w.group
    xsum = jnp.sum(x.reshape(*x.shape[:-1], groups, w.group), axis=-1)
    offset = jnp.zeros((0,), jnp.float32) if offset is None else offset
    return jax.ffi.ffi_call("JaxllmQMatVec4", out, vmap_method="sequential")(
        x, w.values, scale, offset, xsum
    )
