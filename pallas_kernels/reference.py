"""Pure-jnp attention, written for clarity: the oracle in tests and the fast path on CPU.

Axes: batch B, query positions T, key positions S, KV heads K, query heads per KV head G,
head_dim D. Queries arrive grouped per KV head, so K/V are never repeated per query head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Finite, so a row with every key masked (left padding) gives a uniform, not NaN, softmax.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention_reference(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, *, sm_scale: float
) -> jax.Array:
    """Grouped-query attention.

    Args:
      q: [B, T, K, G, D] queries.
      k, v: [B, K, S, D] keys and values (head-major, the KV cache layout).
      mask: [B, T, S] bool, True where a query may attend to a key; None for no mask.
      sm_scale: multiplier on q·k (usually D ** -0.5).

    Returns:
      [B, T, K, G, D] in q's dtype; scores and softmax are computed in float32.
    """
    if q.shape[1] == 1:
        return _decode_attention(q, k, v, mask, sm_scale=sm_scale)
    scores = jnp.einsum("btkgd,bksd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * sm_scale
    if mask is not None:
        scores = jnp.where(mask[:, None, None], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgts,bksd->btkgd", probs.astype(v.dtype), v)
    return out.astype(q.dtype)


def _decode_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, *, sm_scale: float
) -> jax.Array:
    """One query position (T == 1), as broadcast-multiply and reduce rather than dots.

    On XLA:CPU a dot over the [B, K, S, D] cache makes the compiler transpose or duplicate the
    freshly updated cache (several full copies per layer per step); multiply-reduce fuses
    straight off the updated cache, which then stays in place. Same math as above.
    """
    qf = q[:, 0].astype(jnp.float32) * sm_scale  # [B, K, G, D]
    scores = jnp.sum(qf[:, :, :, None, :] * k[:, :, None].astype(jnp.float32), axis=-1)
    if mask is not None:  # scores [B, K, G, S]
        scores = jnp.where(mask[:, 0][:, None, None], scores, MASK_VALUE)
    e = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    out = jnp.sum(e[..., None] * v[:, :, None].astype(jnp.float32), axis=3)  # [B, K, G, D]
    out = out / jnp.sum(e, axis=-1, keepdims=True)
    return out[:, None].astype(q.dtype)
