"""Paged decode attention lowered for TPU (Mosaic): block tables and lengths as scalar prefetch.

Grid (batch, KV head). Each program walks its sequence's pages `pages_per_block` at a time,
copying them HBM -> VMEM with explicit DMAs into two alternating buffers, so the next block is
in flight while this one is computed. Only pages below the sequence's length are ever copied
(the block-table index is clamped to the last valid page), and a length-0 sequence copies
nothing. All G query heads of the KV head are one [G, D] tile (padded to 8 rows, TPU sublanes).

int8 pages travel as int8: each page's scale row [page_size] is copied beside it into its own
double buffer, and the scales are applied to the scores (keys) and the softmax weights (values).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common import MASK_VALUE, cdiv, round_up, tpu_interpret_params


def _kernel(lengths_ref, tables_ref, q_ref, *refs, sm_scale, ppb, max_pages, quantized):
    if quantized:
        k_hbm, v_hbm, ks_hbm, vs_hbm, o_ref, k_buf, v_buf, ks_buf, vs_buf, sems = refs
        pairs = ((k_hbm, k_buf), (v_hbm, v_buf), (ks_hbm, ks_buf), (vs_hbm, vs_buf))
    else:
        k_hbm, v_hbm, o_ref, k_buf, v_buf, sems = refs
        pairs = ((k_hbm, k_buf), (v_hbm, v_buf))
    b, h = pl.program_id(0), pl.program_id(1)
    page_size = k_buf.shape[2]
    bk = ppb * page_size
    length = lengths_ref[b]
    n_pages = lax.div(length + page_size - 1, page_size)
    n_blocks = lax.div(length + bk - 1, bk)

    def copies(j, slot):
        out = []
        for i in range(ppb):
            page = tables_ref[b * max_pages + jnp.minimum(j * ppb + i, n_pages - 1)]
            for s, (src, dst) in enumerate(pairs):
                out.append(
                    pltpu.make_async_copy(src.at[h, page], dst.at[slot, i], sems.at[s, slot])
                )
        return out

    @pl.when(n_blocks > 0)
    def _():
        for c in copies(0, 0):
            c.start()

    q = q_ref[...].astype(jnp.float32) * sm_scale  # [G8, D]
    d = q.shape[-1]

    def body(j, carry):
        acc, m, l = carry
        slot = lax.rem(j, 2)

        @pl.when(j + 1 < n_blocks)
        def _():
            for c in copies(j + 1, 1 - slot):
                c.start()

        for c in copies(j, slot):
            c.wait()
        k = k_buf[slot].reshape(bk, d).astype(jnp.float32)
        v = v_buf[slot].reshape(bk, d).astype(jnp.float32)
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        kpos = j * bk + lax.broadcasted_iota(jnp.int32, s.shape, 1)
        valid = kpos < length
        if quantized:  # q . (code * scale) = (q . code) * scale: one multiply per key
            s = s * ks_buf[slot].reshape(1, bk)
        s = jnp.where(valid, s, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
        p = jnp.where(valid, jnp.exp(s - m_new), 0.0)
        alpha = jnp.exp(m - m_new)
        weights = p
        if quantized:  # a hidden slot's scale may be anything, NaN included
            weights = jnp.where(valid, p * vs_buf[slot].reshape(1, bk), 0.0)
        pv = lax.dot_general(
            weights, v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )
        return acc * alpha + pv, m_new, l * alpha + jnp.sum(p, axis=1, keepdims=True)

    rows = q.shape[0]
    init = (
        jnp.zeros((rows, d), jnp.float32),
        jnp.full((rows, 1), MASK_VALUE, jnp.float32),
        jnp.zeros((rows, 1), jnp.float32),
    )
    acc, _, l = lax.fori_loop(0, n_blocks, body, init)
    o_ref[...] = (acc / jnp.where(l > 0, l, 1.0)).astype(o_ref.dtype)


def paged_attention_tpu(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    lengths: jax.Array,
    block_tables: jax.Array,
    *,
    sm_scale: float,
    interpret: bool,
    pages_per_block: int | None = None,
    k_scales: jax.Array | None = None,
    v_scales: jax.Array | None = None,
) -> jax.Array:
    """q [B, H, D], pages [K, P, page_size, D] -> [B, H, D]; int8 pages come with float32
    scales [K, P, page_size]; see `paged_attention`."""
    b, h, d = q.shape
    kh, _, page_size, _ = k_pages.shape
    g = h // kh
    g8 = round_up(g, 8)
    max_pages = block_tables.shape[1]
    ppb = min(pages_per_block or max(1, cdiv(128, page_size)), max_pages)
    qg = jnp.pad(q.reshape(b, kh, g, d), ((0, 0), (0, 0), (0, g8 - g), (0, 0)))
    quantized = k_scales is not None
    kernel = functools.partial(
        _kernel, sm_scale=sm_scale, ppb=ppb, max_pages=max_pages, quantized=quantized
    )
    n_in = 4 if quantized else 2  # k, v pages (and their scales), left in HBM
    scale_bufs = [pltpu.VMEM((2, ppb, page_size), jnp.float32)] * 2 if quantized else []
    scales = (k_scales.astype(jnp.float32), v_scales.astype(jnp.float32)) if quantized else ()
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, kh),
            in_specs=[
                pl.BlockSpec((None, None, g8, d), lambda b_, h_, *_: (b_, h_, 0, 0)),
                *[pl.BlockSpec(memory_space=pl.ANY)] * n_in,
            ],
            out_specs=pl.BlockSpec((None, None, g8, d), lambda b_, h_, *_: (b_, h_, 0, 0)),
            scratch_shapes=[
                pltpu.VMEM((2, ppb, page_size, d), k_pages.dtype),
                pltpu.VMEM((2, ppb, page_size, d), v_pages.dtype),
                *scale_bufs,
                pltpu.SemaphoreType.DMA((n_in, 2)),
            ],
        ),
        out_shape=jax.ShapeDtypeStruct((b, kh, g8, d), q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=tpu_interpret_params() if interpret else False,
        name="paged_attention_tpu_int8" if quantized else "paged_attention_tpu",
    )(lengths, block_tables.reshape(-1), qg, k_pages, v_pages, *scales)
    return out[:, :, :g].reshape(b, h, d)
