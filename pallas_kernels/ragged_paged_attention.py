"""Ragged paged attention: one kernel for a mixed engine step.

The queries of many sequences arrive packed in one [tokens, H, D] array: decode steps (one
token) beside prefill chunks (many), sequence i at rows cu_q_lens[i]:cu_q_lens[i+1]. Each
sequence's queries are the last q_len tokens of its kv_len cached tokens and attend causally to
its own pages.

Work is cut into query tiles of `block_q` tokens that never straddle two sequences; a tile
holds all G query heads of one KV head, so each page is read once per group. The tile list is
built on device from cu_q_lens (its length is a static bound: tokens / block_q + sequences),
and outputs land in a per-tile buffer that one gather puts back in token order.

int8 pages (codes plus float32 scales [K, num_pages, page_size], as `paged_attention` takes
them) are read in place: each program loads int8 tiles and their scale rows and applies the key
scales to the scores and the value scales to the softmax weights.
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
from pallas_kernels.paged_attention import check_page_scales, safe_block_tables


def ragged_paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    kv_lens: jax.Array,
    block_tables: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: jax.Array | int,
    *,
    k_scales: jax.Array | None = None,
    v_scales: jax.Array | None = None,
    sm_scale: float | None = None,
    sliding_window: int | None = None,
    block_q: int | None = None,
    pages_per_block: int | None = None,
    interpret: bool | None = None,
    platform: str | None = None,
) -> jax.Array:
    """Causal attention for packed queries of many sequences over their paged caches.

    Args:
      q: [T, H, D] packed query tokens.
      k_pages, v_pages: [K, num_pages, page_size, D].
      kv_lens: [S] int32 tokens in each sequence's cache, this step's queries included.
      block_tables: [S, max_pages_per_seq] int32.
      cu_q_lens: [S + 1] int32 offsets of each sequence's queries in q (non-decreasing).
      num_seqs: sequences in use (the rest of the S slots are ignored); rows of q past
        cu_q_lens[num_seqs] come back as zeros.
      k_scales, v_scales: [K, num_pages, page_size] float32 scales of int8 pages (both or
        neither); the codes are cast to q's dtype and scaled inside the kernel.
      sliding_window: hide keys this many positions or more behind a query.
      block_q: query tokens per tile (default: 64 query rows per tile across the group).
      pages_per_block: pages per key tile (default: 64 keys).
      interpret, platform: as in `flash_attention` (the GPU kernel serves both platforms).

    Returns:
      [T, H, D] in q's dtype.
    """
    t, h, d = q.shape
    kh, num_pages, page_size, _ = k_pages.shape
    s = kv_lens.shape[0]
    if cu_q_lens.shape != (s + 1,) or block_tables.shape[0] != s:
        raise ValueError(
            f"ragged_paged_attention: kv_lens [S={s}] needs cu_q_lens [S+1] and block_tables "
            f"[S, pages]; got {cu_q_lens.shape} and {block_tables.shape}"
        )
    g = check_gqa(h, kh, "ragged_paged_attention")
    scales = check_page_scales(k_pages, k_scales, v_scales, "ragged_paged_attention")
    sm_scale = float(d**-0.5 if sm_scale is None else sm_scale)
    _, interpret = resolve_platform(platform, interpret)
    gp = next_pow2(g)
    bq = block_q or max(1, 64 // gp)
    bq = max(bq, cdiv(16, gp))  # at least 16 rows per dot
    max_pages = block_tables.shape[1]
    ppb = min(pages_per_block or max(1, 64 // page_size), max_pages)
    n_kblocks = cdiv(max_pages, ppb)

    kv_lens = kv_lens.astype(jnp.int32)
    cu = cu_q_lens.astype(jnp.int32)
    live = jnp.arange(s) < num_seqs
    q_lens = jnp.where(live, cu[1:] - cu[:-1], 0)
    tiles = cdiv(q_lens, bq)
    tiles_end = jnp.cumsum(tiles)
    n_tiles = t // bq + min(s, t)  # static bound on sum(ceil(q_len / bq))
    u = jnp.arange(n_tiles)
    tile_seq = jnp.clip(jnp.searchsorted(tiles_end, u, side="right"), 0, s - 1)
    tile_first = u - (tiles_end[tile_seq] - tiles[tile_seq])
    tile_valid = u < tiles_end[-1]
    tile_qstart = jnp.where(tile_valid, cu[tile_seq] + tile_first * bq, 0)
    tile_rows = jnp.where(tile_valid, jnp.minimum(bq, cu[tile_seq + 1] - tile_qstart), 0)
    # Absolute position of the tile's first query.
    tile_pos = kv_lens[tile_seq] - q_lens[tile_seq] + tile_first * bq
    meta = jnp.stack([tile_seq, tile_qstart, tile_rows, tile_pos], axis=1).astype(jnp.int32)

    tables = safe_block_tables(
        block_tables.astype(jnp.int32), jnp.where(live, kv_lens, 0), page_size, n_kblocks * ppb
    )
    qg = q.reshape(t, kh, g, d)
    qg = jnp.pad(qg, ((0, bq), (0, 0), (0, gp - g), (0, 0)))  # tiles may run past the end
    out = _ragged_gpu(
        qg,
        k_pages,
        v_pages,
        scales,
        jnp.where(live, kv_lens, 0),
        tables,
        meta,
        sm_scale=sm_scale,
        window=sliding_window,
        bq=bq,
        ppb=ppb,
        interpret=interpret,
    )  # fmt: skip  [n_tiles, bq, K, gp, D]
    rows = jnp.arange(t)
    seq = jnp.clip(jnp.searchsorted(cu, rows, side="right") - 1, 0, s - 1)
    local = rows - cu[seq]
    tile = tiles_end[seq] - tiles[seq] + local // bq
    row_live = rows < cu[jnp.asarray(num_seqs)]
    res = out[jnp.where(row_live, tile, 0), local % bq][:, :, :g].reshape(t, h, d)
    return jnp.where(row_live[:, None, None], res, 0).astype(q.dtype)


def _ragged_kernel(*refs, sm_scale, window, bq, ppb, quantized):
    if quantized:
        meta_ref, q_ref, k_ref, v_ref, ks_ref, vs_ref, len_ref, bt_ref, o_ref = refs
    else:
        meta_ref, q_ref, k_ref, v_ref, len_ref, bt_ref, o_ref = refs
    kvh = pl.program_id(1)
    seq, qstart, nrows, pos0 = meta_ref[0, 0], meta_ref[0, 1], meta_ref[0, 2], meta_ref[0, 3]
    kv_len = len_ref[seq]
    page_size = k_ref.shape[2]
    bk = ppb * page_size
    gp, d = q_ref.shape[2], q_ref.shape[3]
    rows = bq * gp
    q = q_ref[pl.ds(qstart, bq), kvh, :, :].reshape(rows, d)  # row r is token r // gp
    qpos = pos0 + lax.div(lax.broadcasted_iota(jnp.int32, (rows, 1), 0), gp)
    last_pos = jnp.minimum(pos0 + nrows - 1, kv_len - 1)
    hi = jnp.where(nrows > 0, lax.div(last_pos + bk, bk), 0)
    lo = 0
    if window is not None:
        lo = jnp.minimum(lax.div(jnp.maximum(pos0 - window + 1, 0), bk), hi)
    scale = sm_scale * LOG2E

    def body(j, carry):
        pages = bt_ref[seq, pl.ds(j * ppb, ppb)]
        k, v = k_ref[kvh, pages].reshape(bk, d), v_ref[kvh, pages].reshape(bk, d)
        if quantized:  # int8 codes are exact in bf16 and f32
            k, v = k.astype(q.dtype), v.astype(q.dtype)
        sc = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        v_scale = None
        if quantized:  # q . (code * scale) = (q . code) * scale: one multiply per key
            sc = sc * ks_ref[kvh, pages].reshape(1, bk)
            v_scale = vs_ref[kvh, pages].reshape(1, bk)
        kpos = j * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
        valid = (kpos <= qpos) & (kpos < kv_len)
        if window is not None:
            valid &= qpos - kpos < window
        return online_softmax_step(carry, sc * scale, v, valid, v_scale)

    acc, _, l = lax.fori_loop(lo, hi, body, online_softmax_init(rows, d))
    out = acc / jnp.where(l > 0, l, 1.0)[:, None]
    o_ref[...] = out.reshape(bq, gp, d).astype(o_ref.dtype)


def _ragged_gpu(qg, k_pages, v_pages, scales, kv_lens, tables, meta, *, sm_scale, window, bq,
                ppb, interpret):  # fmt: skip
    n_tiles = meta.shape[0]
    tp, kh, gp, d = qg.shape
    s = kv_lens.shape[0]
    kernel = functools.partial(
        _ragged_kernel, sm_scale=sm_scale, window=window, bq=bq, ppb=ppb,
        quantized=scales is not None,
    )  # fmt: skip
    whole = lambda shape: pl.BlockSpec(shape, lambda u, h: (0,) * len(shape))
    return pl.pallas_call(
        kernel,
        grid=(n_tiles, kh),
        in_specs=[
            pl.BlockSpec((1, 4), lambda u, h: (u, 0)),
            whole(qg.shape),
            whole(k_pages.shape),
            whole(v_pages.shape),
            *([] if scales is None else [whole(k_pages.shape[:-1])] * 2),
            whole((s,)),
            whole(tables.shape),
        ],
        out_specs=pl.BlockSpec((None, bq, None, gp, d), lambda u, h: (u, 0, h, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((n_tiles, bq, kh, gp, d), qg.dtype),
        interpret=interpret,
        compiler_params=None if interpret else gpu_compiler_params(4, 3),
        name="ragged_paged_attention_int8" if scales is not None else "ragged_paged_attention",
    )(meta, qg, k_pages, v_pages, *(scales or ()), kv_lens, tables)
