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
    scores = jnp.einsum("btkgd,bksd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * sm_scale
    if mask is not None:
        scores = jnp.where(mask[:, None, None], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgts,bksd->btkgd", probs.astype(v.dtype), v)
    return out.astype(q.dtype)
