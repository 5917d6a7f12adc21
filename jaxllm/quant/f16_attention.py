"""llama.cpp's CPU attention numerics (without flash attention), as attention backend
`llamacpp`.

With a float16 KV cache, ggml multiplies K with Q converted to float16, takes the softmax in
float32, and multiplies V with the probabilities converted to float16 (each product of two
float16 values summed in float32). Measured on SmolLM2 against llama.cpp's own tensors: the
float32 softmax-value step is 2e-3 (relative to the largest output) from llama.cpp's, these
roundings bring it to 2e-5. Recipe field `attention_f16` selects this backend.

Axes as in jaxllm/attention.py: q [B, T, K, G, D], k/v [B, K, S, D], mask [B, T, S]; the
engine's paged form q [T, H, D] over pages [K, num_pages, page, D].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm.attention import register_attention
from pallas_kernels.reference import MASK_VALUE

NAME = "llamacpp"


def _f16(x: jax.Array) -> jax.Array:
    """x rounded to float16, carried as float32."""
    return x.astype(jnp.float16).astype(jnp.float32)


def f16_attention(q, k, v, mask, *, sm_scale: float, q_offset=None) -> jax.Array:
    """Grouped-query attention with float16 Q/K/V and probabilities -> [B, T, K, G, D]."""
    del q_offset  # the dense mask says everything
    scores = jnp.einsum(
        "btkgd,bksd->bkgts", _f16(q), _f16(k), precision="highest"
    )  # [B, K, G, T, S]
    scores = scores * sm_scale
    if mask is not None:
        scores = jnp.where(mask[:, None, None], scores, MASK_VALUE)
    probs = _f16(jax.nn.softmax(scores, axis=-1))
    out = jnp.einsum("bkgts,bksd->btkgd", probs, _f16(v), precision="highest")
    return out.astype(q.dtype)


def paged_f16_attention(q, k_pages, v_pages, meta, *, sm_scale: float) -> jax.Array:
    """The engine's paged step with the same roundings: q [T, H, D] -> [T, H, D]."""
    from jaxllm.engine.cpu_attention import split_paged_attention

    out = split_paged_attention(
        _f16(q), k_pages, v_pages, meta, sm_scale=sm_scale, probs_dtype=jnp.float16
    )
    return out.astype(q.dtype)


register_attention(NAME, f16_attention, paged_f16_attention, paged_reads_split=True)
