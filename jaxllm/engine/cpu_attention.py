"""The engine's attention on CPU: the same result as `ragged_paged_attention_reference`, arranged
for XLA:CPU.

A mixed step is split in two. Decode rows (one query per sequence) gather their sequence's pages
once and attend with a multiply-reduce; prefill chunks (a few sequences, many rows each) are
padded to [chunks, rows] and attend densely over their gathered pages. Either way each
sequence's pages are gathered once per layer, never once per query row.

Axes: T packed rows, K KV heads, G query heads per KV head, D head_dim, P pages per sequence,
page_size slots per page, L = P * page_size keys.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm.model import PagedMeta
from jaxllm.quant.kv import gather_pages
from pallas_kernels.reference import masked_softmax


def _gather(pages: jax.Array, tables: jax.Array) -> jax.Array:
    """pages [K, num_pages, page, D], tables [N, P] -> [N, K, P * page, D]; int8 pages
    (`QuantizedKV`) are dequantized after the gather, page by page as they are read."""
    return gather_pages(pages, tables)


def split_paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    meta: PagedMeta,
    *,
    sm_scale: float,
    probs_dtype=None,
) -> jax.Array:
    """q [T, H, D] packed -> [T, H, D]; rows not named in the split metadata come back zero.
    `probs_dtype`: round the softmax probabilities to it before the value product (float16:
    llama.cpp's CPU attention)."""
    t, h, d = q.shape
    kh = k_pages.shape[0]
    g = h // kh
    out = jnp.zeros((t + 1, kh, g, d), jnp.float32)  # row t swallows padding
    qg = jnp.concatenate([q, jnp.zeros((1, h, d), q.dtype)]).reshape(t + 1, kh, g, d)
    qg = qg.astype(jnp.float32) * sm_scale

    # Decode rows: [N] rows of N sequences, one query each.
    seq = meta.dec_seq
    k = _gather(k_pages, meta.block_tables[seq]).astype(jnp.float32)  # [N, K, L, D]
    v = _gather(v_pages, meta.block_tables[seq]).astype(jnp.float32)
    qd = qg[meta.dec_rows]  # [N, K, G, D]
    valid = jnp.arange(k.shape[2])[None, :] < meta.kv_lens[seq][:, None]  # [N, L]
    v = jnp.where(valid[:, None, :, None], v, 0.0)  # slots past the end may hold anything
    s = jnp.sum(qd[:, :, :, None, :] * k[:, :, None], axis=-1)  # [N, K, G, L]
    probs, _, _ = masked_softmax(s, valid[:, None, None])
    if probs_dtype is not None:
        probs = probs.astype(probs_dtype).astype(jnp.float32)
    od = jnp.sum(probs[..., None] * v[:, :, None], axis=3)
    out = out.at[meta.dec_rows].set(od, mode="drop")

    # Prefill chunks: [C, R] rows of C sequences, causal within each.
    seq = meta.pre_seq
    rows = meta.pre_rows  # [C, R], t = padding
    k = _gather(k_pages, meta.block_tables[seq]).astype(jnp.float32)  # [C, K, L, D]
    v = _gather(v_pages, meta.block_tables[seq]).astype(jnp.float32)
    qp = qg[rows]  # [C, R, K, G, D]
    q_len = meta.cu_q_lens[seq + 1] - meta.cu_q_lens[seq]
    kv_len = meta.kv_lens[seq]
    qpos = (kv_len - q_len)[:, None] + jnp.arange(rows.shape[1])[None, :]  # [C, R]
    kpos = jnp.arange(k.shape[2])
    valid = (kpos[None, None, :] <= qpos[:, :, None]) & (
        kpos[None, None, :] < kv_len[:, None, None]
    )
    v = jnp.where((kpos[None, :] < kv_len[:, None])[:, None, :, None], v, 0.0)
    s = jnp.einsum("crkgd,ckld->ckgrl", qp, k)
    probs, _, _ = masked_softmax(s, valid[:, None, None])
    if probs_dtype is not None:
        probs = probs.astype(probs_dtype).astype(jnp.float32)
    op = jnp.einsum("ckgrl,ckld->crkgd", probs, v)
    out = out.at[rows].set(op, mode="drop")
    return out[:t].reshape(t, h, d).astype(q.dtype)
