"""llama.cpp's CPU product of a GGUF block weight with activations quantized to 8-bit blocks.

ggml's CPU backend never multiplies a Q4_1, Q4_0 or Q8_0 weight with float activations: each
activation row is first cut into blocks of 32 and quantized (ggml's `quantize_row_q8_1` /
`quantize_row_q8_0`, x86 path), then every block pair is multiplied in integers
(`vec_dot_q4_1_q8_1`, `vec_dot_q8_0_q8_0`, `vec_dot_q4_0_q8_0`):

    activation block:  amax = max |x_k|,  d = amax / 127 (stored float16),
                       q_k = round(x_k * 127 / amax) int8 (half to even; all 0 when amax = 0),
                       s = d * sum_k q_k (stored float16; Q8_1 only, computed from d before
                       its float16 rounding)
    Q4_1 block (w = d_w u + m_w):   d_w d_x sum_k u_k q_k + m_w s_x
    Q4_0 block (w = d_w (u - 8)):   d_w d_x sum_k (u_k - 8) q_k
    Q8_0 block (w = d_w c):         d_w d_x sum_k c_k q_k

summed over a row's blocks. The integer sums are exact, so this reproduces ggml's values up to
the order of its float32 additions. The quantized activations cost accuracy (on SmolLM2 a
product moves by up to 0.9-2.6% of its largest value), which is why jaxllm's plain `gguf`
recipe keeps them float; this path is for matching llama.cpp's numbers.

Axes: rows R (x's leading axes, flattened), outputs O, inputs I, blocks N = I / 32, slot k.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxllm.errors import JaxLLMError
from jaxllm.quant.qtensor import QuantizedWeight, codes

BLOCK = 32
# The [N, R, O] int32 block sums are made for at most this many elements at once (64 MiB);
# more rows are run in chunks (a prefill through the 49152-row tied head).
_MAX_BLOCK_SUMS = 1 << 24


class Q8Blocks(NamedTuple):
    """Activations in 8-bit blocks: values int8 [R, N, 32], scale and block_sum float16 [R, N]
    (block_sum = d * sum(q), ggml Q8_1's `s`)."""

    values: jax.Array
    scale: jax.Array
    block_sum: jax.Array


def quantize_q8_blocks(x: jax.Array) -> Q8Blocks:
    """x [R, I] (I a multiple of 32) -> ggml's Q8_1 blocks (Q8_0 is the same without the sum)."""
    r, i = x.shape
    xb = x.astype(jnp.float32).reshape(r, i // BLOCK, BLOCK)
    amax = jnp.max(jnp.abs(xb), axis=-1)  # [R, N]
    d = amax / 127.0
    inv = jnp.where(amax > 0, 127.0 / jnp.where(amax > 0, amax, 1.0), 0.0)
    q = jnp.clip(jnp.round(xb * inv[..., None]), -127, 127)
    block_sum = d * jnp.sum(q, axis=-1)  # exact integers in float32 (|sum| <= 4064)
    return Q8Blocks(q.astype(jnp.int8), d.astype(jnp.float16), block_sum.astype(jnp.float16))


def signed_codes(w: QuantizedWeight) -> jax.Array:
    """The weight's integer codes as ggml multiplies them, int8 [O, N, 32]: Q4_1's u, Q4_0's
    u - 8, Q8_0's c."""
    c = codes(w)
    if w.bits == 4:
        c = c.astype(jnp.int8) - (8 if w.offset is None else 0)
    o, i = w.shape
    return c.astype(jnp.int8).reshape(o, i // BLOCK, BLOCK)


def check_block_weight(w: QuantizedWeight, name: str = "weight") -> None:
    """JaxLLMError unless w is a GGUF-style weight with blocks of 32 inputs."""
    if w.group != BLOCK or w.shape[1] % BLOCK:
        raise JaxLLMError(
            f"{name}: the q8 activation path needs GGUF blocks of {BLOCK} inputs, got group "
            f"{w.group} over {w.shape[1]} inputs"
        )


def _blocked_rows(xb: Q8Blocks, wc: jax.Array, w: QuantizedWeight) -> jax.Array:
    """Q8 blocks of rows [R, N, 32] times codes [O, N, 32] -> float32 [R, O]."""
    dims = (((2,), (2,)), ((1,), (1,)))  # contract the 32 slots, batch over the blocks N
    acc = jax.lax.dot_general(xb.values, wc, dims, preferred_element_type=jnp.int32)  # [N,R,O]
    dd = xb.scale.astype(jnp.float32).T[:, :, None] * w.scale.astype(jnp.float32).T[:, None, :]
    y = jnp.sum(dd * acc.astype(jnp.float32), axis=0)
    if w.offset is not None:
        y = y + xb.block_sum.astype(jnp.float32) @ w.offset.astype(jnp.float32).T
    return y


def blocked_dot(x: jax.Array, w: QuantizedWeight) -> jax.Array:
    """x [..., I] @ W^T -> float32 [..., O] for a GGUF block weight W [O, I], with x quantized
    to 8-bit blocks of 32 as ggml's CPU backend does (see the module docstring)."""
    lead, (o, i) = x.shape[:-1], w.shape
    rows = math.prod(lead)
    x2 = x.reshape(rows, i)
    wc = signed_codes(w)
    chunk = max(1, _MAX_BLOCK_SUMS // ((i // BLOCK) * o))
    if rows <= chunk:
        return _blocked_rows(quantize_q8_blocks(x2), wc, w).reshape(*lead, o)
    pad = -rows % chunk
    xs = jnp.pad(x2, ((0, pad), (0, 0))).reshape(-1, chunk, i)
    ys = jax.lax.map(lambda xc: _blocked_rows(quantize_q8_blocks(xc), wc, w), xs)
    return ys.reshape(-1, o)[:rows].reshape(*lead, o)
