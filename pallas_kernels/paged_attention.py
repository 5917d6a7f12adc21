"""Paged attention for decode: one query per sequence against a KV cache kept in pages.

A sequence's tokens live in fixed-size pages anywhere in a shared pool; its block table lists
them in order. The kernel follows the table, so pages can be shared between sequences (prefix
caching, forks) and never need to be contiguous.

GPU (flash-decoding): programs split each sequence's pages into `num_splits` ranges; each
program returns a partial (o, m, l) for all G query heads of its KV head, and the partials are
merged exactly afterwards. Only pages below the sequence's length are read: block-table entries
past the end are replaced by the last valid page before any load, and that page's extra slots
are masked.

Layouts: q [B, H, D]; k_pages, v_pages [K, num_pages, page_size, D]; lengths [B];
block_tables [B, max_pages_per_seq].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common import (
    LOG2E,
    cdiv,
    check_gqa,
    gpu_compiler_params,
    next_pow2,
    online_softmax_init,
    online_softmax_step,
    resolve_platform,
)


def paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    lengths: jax.Array,
    block_tables: jax.Array,
    *,
    sm_scale: float | None = None,
    pages_per_block: int | None = None,
    num_splits: int | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
    interpret: bool | None = None,
    platform: str | None = None,
) -> jax.Array:
    """Decode attention over a paged KV cache.

    Args:
      q: [B, H, D] one query token per sequence.
      k_pages, v_pages: [K, num_pages, page_size, D], H a multiple of K.
      lengths: [B] int32 tokens cached per sequence (0 gives zeros and reads nothing).
      block_tables: [B, max_pages_per_seq] int32 page ids; entries past a sequence's length
        are never read (they may hold anything).
      sm_scale: default D ** -0.5.
      pages_per_block: pages loaded per loop step (GPU); default fills 64 keys.
      num_splits: sequence splits per (sequence, KV head) on GPU; default from the grid size.
      num_warps, num_stages: GPU launch parameters.
      interpret, platform: as in `flash_attention`.

    Returns:
      [B, H, D] in q's dtype.
    """
    b, h, d = q.shape
    kh, num_pages, page_size, dk = k_pages.shape
    if v_pages.shape != k_pages.shape or dk != d:
        raise ValueError(
            f"paged_attention: k_pages/v_pages must be [K, pages, page_size, D={d}]; got "
            f"{k_pages.shape} and {v_pages.shape}"
        )
    if lengths.shape != (b,) or block_tables.ndim != 2 or block_tables.shape[0] != b:
        raise ValueError(
            f"paged_attention: lengths must be [B={b}] and block_tables [B, pages]; got "
            f"{lengths.shape} and {block_tables.shape}"
        )
    g = check_gqa(h, kh, "paged_attention")
    sm_scale = float(d**-0.5 if sm_scale is None else sm_scale)
    platform, interpret = resolve_platform(platform, interpret)
    lengths = lengths.astype(jnp.int32)
    block_tables = block_tables.astype(jnp.int32)
    if platform == "tpu":
        from pallas_kernels.paged_attention_tpu import paged_attention_tpu

        return paged_attention_tpu(
            q, k_pages, v_pages, lengths, block_tables, sm_scale=sm_scale, interpret=interpret
        )
    max_pages = block_tables.shape[1]
    ppb = pages_per_block or max(1, 64 // page_size)
    ppb = min(ppb, max_pages)
    n_blocks = cdiv(max_pages, ppb)
    if num_splits is None:  # enough programs to fill a large GPU, each with >= 4 blocks
        num_splits = max(1, min(cdiv(512, b * kh), n_blocks // 4))
    num_splits = max(1, min(num_splits, n_blocks))
    tables = safe_block_tables(block_tables, lengths, page_size, pad_to=n_blocks * ppb)
    gp = max(16, next_pow2(g))  # the dot wants >= 16 rows; extra rows are zero queries
    qg = jnp.pad(q.reshape(b, kh, g, d), ((0, 0), (0, 0), (0, gp - g), (0, 0)))
    o, m, l = _paged_gpu(
        qg, k_pages, v_pages, lengths, tables, sm_scale, ppb, num_splits, interpret,
        (num_warps, num_stages),
    )  # fmt: skip
    out = merge_partials(o, m, l)  # [B, K, gp, D]
    return out[:, :, :g].reshape(b, h, d).astype(q.dtype)


def safe_block_tables(
    block_tables: jax.Array, lengths: jax.Array, page_size: int, pad_to: int
) -> jax.Array:
    """Block tables whose entries past each sequence's last page repeat its last valid page
    (page 0 of the pool for an empty sequence is never loaded: its loop is empty)."""
    b, max_pages = block_tables.shape
    tables = jnp.pad(block_tables, ((0, 0), (0, pad_to - max_pages)))
    n_valid = cdiv(lengths, page_size)
    last = jnp.take_along_axis(tables, jnp.maximum(n_valid - 1, 0)[:, None], axis=1)
    return jnp.where(jnp.arange(pad_to)[None] < n_valid[:, None], tables, last)


def merge_partials(o: jax.Array, m: jax.Array, l: jax.Array) -> jax.Array:
    """Exact merge of split softmax partials.

    o [..., splits, R, D] unnormalised, m/l [..., splits, R] in base 2; returns [..., R, D]
    float32 (zeros where no split saw a key).
    """
    m_all = jnp.max(m, axis=-2, keepdims=True)
    w = jnp.exp2(m - m_all) * (l > 0)
    l_all = jnp.sum(w * l, axis=-2)
    o_all = jnp.sum(w[..., None] * o, axis=-3)
    return o_all / jnp.where(l_all > 0, l_all, 1.0)[..., None]


def _paged_kernel(
    q_ref, k_ref, v_ref, len_ref, bt_ref, o_ref, m_ref, l_ref, *, sm_scale, ppb, blocks_per_split
):
    split = pl.program_id(2)
    length = len_ref[0]
    page_size = k_ref.shape[1]
    bk = ppb * page_size
    q = q_ref[...]  # [gp, D]
    d = q.shape[-1]
    first = split * blocks_per_split
    last = jnp.minimum(first + blocks_per_split, lax.div(length + bk - 1, bk))
    scale = sm_scale * LOG2E

    def body(j, carry):
        pages = bt_ref[pl.ds(j * ppb, ppb)]
        k = k_ref[pages].reshape(bk, d)
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        kpos = j * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
        return online_softmax_step(carry, s * scale, v_ref[pages].reshape(bk, d), kpos < length)

    init = online_softmax_init(q.shape[0], d)
    acc, m, l = lax.fori_loop(first, jnp.maximum(first, last), body, init)
    o_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l


def _paged_gpu(qg, k_pages, v_pages, lengths, tables, sm_scale, ppb, num_splits, interpret, launch):
    b, kh, gp, d = qg.shape
    _, num_pages, page_size, _ = k_pages.shape
    n_blocks = tables.shape[1] // ppb
    blocks_per_split = cdiv(n_blocks, num_splits)
    kernel = functools.partial(
        _paged_kernel, sm_scale=sm_scale, ppb=ppb, blocks_per_split=blocks_per_split
    )
    pages_spec = pl.BlockSpec((None, num_pages, page_size, d), lambda b_, h_, s_: (h_, 0, 0, 0))
    row = lambda b_, h_, s_: (b_, h_, s_, 0)
    return pl.pallas_call(
        kernel,
        grid=(b, kh, num_splits),
        in_specs=[
            pl.BlockSpec((None, None, gp, d), lambda b_, h_, s_: (b_, h_, 0, 0)),
            pages_spec,
            pages_spec,
            pl.BlockSpec((1,), lambda b_, h_, s_: (b_,)),
            pl.BlockSpec((None, tables.shape[1]), lambda b_, h_, s_: (b_, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, gp, d), lambda b_, h_, s_: (b_, h_, s_, 0, 0)),
            pl.BlockSpec((None, None, None, gp), row),
            pl.BlockSpec((None, None, None, gp), row),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, kh, num_splits, gp, d), jnp.float32),
            jax.ShapeDtypeStruct((b, kh, num_splits, gp), jnp.float32),
            jax.ShapeDtypeStruct((b, kh, num_splits, gp), jnp.float32),
        ],
        interpret=interpret,
        compiler_params=None if interpret else gpu_compiler_params(*launch),
        name="paged_attention",
    )(qg, k_pages, v_pages, lengths, tables)
