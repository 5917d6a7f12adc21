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

int8 pages: k_pages/v_pages may hold int8 codes with float32 scales k_scales/v_scales
[K, num_pages, page_size] (one per token per KV head, x ~= code * scale). Programs load int8
tiles and their scale rows and dequantize on the fly: the key scale multiplies the scores and
the value scale the softmax weights, so no float copy of a page is ever written.
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
    k_scales: jax.Array | None = None,
    v_scales: jax.Array | None = None,
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
      k_scales, v_scales: [K, num_pages, page_size] float32 scales of int8 pages (both or
        neither); the codes are cast to q's dtype and scaled inside the kernel.
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
    scales = check_page_scales(k_pages, k_scales, v_scales, "paged_attention")
    sm_scale = float(d**-0.5 if sm_scale is None else sm_scale)
    platform, interpret = resolve_platform(platform, interpret)
    lengths = lengths.astype(jnp.int32)
    block_tables = block_tables.astype(jnp.int32)
    if platform == "tpu":
        from pallas_kernels.paged_attention_tpu import paged_attention_tpu

        return paged_attention_tpu(
            q, k_pages, v_pages, lengths, block_tables, k_scales=k_scales, v_scales=v_scales,
            sm_scale=sm_scale, interpret=interpret,
        )  # fmt: skip
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
        qg, k_pages, v_pages, scales, lengths, tables, sm_scale, ppb, num_splits, interpret,
        (num_warps, num_stages),
    )  # fmt: skip
    out = merge_partials(o, m, l)  # [B, K, gp, D]
    return out[:, :, :g].reshape(b, h, d).astype(q.dtype)


def check_page_scales(
    k_pages: jax.Array, k_scales: jax.Array | None, v_scales: jax.Array | None, what: str
) -> tuple[jax.Array, jax.Array] | None:
    """(k_scales, v_scales) as float32 for int8 pages, None for float pages; a missing or
    misshapen scale array raises, since int8 codes without their scales mean nothing."""
    quantized = jnp.dtype(k_pages.dtype) == jnp.int8
    if k_scales is None and v_scales is None and not quantized:
        return None
    want = k_pages.shape[:-1]
    if k_scales is None or v_scales is None or k_scales.shape != want or v_scales.shape != want:
        raise ValueError(
            f"{what}: int8 pages need k_scales and v_scales [K, pages, page_size]={want}; got "
            f"{None if k_scales is None else k_scales.shape} and "
            f"{None if v_scales is None else v_scales.shape}"
        )
    return k_scales.astype(jnp.float32), v_scales.astype(jnp.float32)


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


def _paged_kernel(*refs, sm_scale, ppb, blocks_per_split, quantized):
    if quantized:
        q_ref, k_ref, v_ref, ks_ref, vs_ref, len_ref, bt_ref, o_ref, m_ref, l_ref = refs
    else:
        q_ref, k_ref, v_ref, len_ref, bt_ref, o_ref, m_ref, l_ref = refs
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
        k, v = k_ref[pages].reshape(bk, d), v_ref[pages].reshape(bk, d)
        if quantized:  # int8 codes are exact in bf16 and f32
            k, v = k.astype(q.dtype), v.astype(q.dtype)
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        v_scale = None
        if quantized:  # q . (code * scale) = (q . code) * scale: one multiply per key
            s = s * ks_ref[pages].reshape(1, bk)
            v_scale = vs_ref[pages].reshape(1, bk)
        kpos = j * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
        return online_softmax_step(carry, s * scale, v, kpos < length, v_scale)

    init = online_softmax_init(q.shape[0], d)
    acc, m, l = lax.fori_loop(first, jnp.maximum(first, last), body, init)
    o_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l


def _paged_gpu(
    qg, k_pages, v_pages, scales, lengths, tables, sm_scale, ppb, num_splits, interpret, launch
):
    b, kh, gp, d = qg.shape
    _, num_pages, page_size, _ = k_pages.shape
    n_blocks = tables.shape[1] // ppb
    blocks_per_split = cdiv(n_blocks, num_splits)
    kernel = functools.partial(
        _paged_kernel, sm_scale=sm_scale, ppb=ppb, blocks_per_split=blocks_per_split,
        quantized=scales is not None,
    )  # fmt: skip
    pages_spec = pl.BlockSpec((None, num_pages, page_size, d), lambda b_, h_, s_: (h_, 0, 0, 0))
    scale_spec = pl.BlockSpec((None, num_pages, page_size), lambda b_, h_, s_: (h_, 0, 0))
    row = lambda b_, h_, s_: (b_, h_, s_, 0)
    return pl.pallas_call(
        kernel,
        grid=(b, kh, num_splits),
        in_specs=[
            pl.BlockSpec((None, None, gp, d), lambda b_, h_, s_: (b_, h_, 0, 0)),
            pages_spec,
            pages_spec,
            *([] if scales is None else [scale_spec, scale_spec]),
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
        name="paged_attention_int8" if scales is not None else "paged_attention",
    )(qg, k_pages, v_pages, *(scales or ()), lengths, tables)
