"""Flash attention forward lowered for TPU (Mosaic).

Grid (batch, query head, query tile, key tile) with the key axis innermost and sequential: the
running max, sum and accumulator live in VMEM scratch across it. The query offset arrives as
scalar prefetch, so the K/V index maps clamp the key tile to the last one a causal query tile
can see: skipped tiles repeat the previous block index and cost no DMA, and `pl.when` skips
their compute. Heads go first ([B, H, T, D]), the layout Mosaic tiles well; a head-major KV
cache ([B, K, S, D]) is read in place. Segment ids travel lane- and sublane-broadcast, as
vectors must on TPU.

The backward pass on TPU differentiates the jnp reference (XLA); the kernel backward is the
GPU family's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common import MASK_VALUE, round_up, tpu_interpret_params

LANES = 128


def _kernel(
    off_ref, q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr,
    *, st, bq, bk, n_k,
):  # fmt: skip
    i, j = pl.program_id(2), pl.program_id(3)
    q_first = i * bq + off_ref[0]
    last = _last_tile(q_first + bq - 1, st, bk, n_k)

    @pl.when(j == 0)
    def _():
        m_scr[...] = jnp.full(m_scr.shape, MASK_VALUE, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    first = _first_tile(q_first, st, bk)

    @pl.when((j <= last) & (j >= first))
    def _():
        q = q_ref[...]
        k = k_ref[...]
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        s = s * st.sm_scale
        qpos = q_first + lax.broadcasted_iota(jnp.int32, s.shape, 0)
        kpos = j * bk + lax.broadcasted_iota(jnp.int32, s.shape, 1)
        mask = kpos < st.s
        if st.causal:
            mask &= kpos <= qpos
        if st.window is not None:
            mask &= qpos - kpos < st.window
        if st.has_segments:
            mask &= qs_ref[...][:, :1] == ks_ref[...][:1, :]
        s = jnp.where(mask, s, MASK_VALUE)
        m_prev = m_scr[...][:, :1]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
        alpha = jnp.exp(m_prev - m_new)
        l_new = l_scr[...][:, :1] * alpha + jnp.sum(p, axis=1, keepdims=True)
        v = v_ref[...]
        pv = lax.dot_general(
            p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )
        acc_scr[...] = acc_scr[...] * alpha + pv
        m_scr[...] = jnp.broadcast_to(m_new, m_scr.shape)
        l_scr[...] = jnp.broadcast_to(l_new, l_scr.shape)

    @pl.when(j == n_k - 1)
    def _():
        l = l_scr[...][:, :1]
        seen = l > 0
        l_safe = jnp.where(seen, l, 1.0)
        o_ref[...] = (acc_scr[...] / l_safe).astype(o_ref.dtype)
        lse = jnp.where(seen, m_scr[...][:, :1] + jnp.log(l_safe), -jnp.inf)
        lse_ref[...] = jnp.broadcast_to(lse, lse_ref.shape)


def _first_tile(q_first, st, bk):
    if st.window is None:
        return 0
    return lax.div(jnp.maximum(q_first - st.window + 1, 0), bk)


def _last_tile(q_last, st, bk, n_k):
    if not st.causal:
        return n_k - 1
    return jnp.clip(lax.div(jnp.maximum(q_last, 0), bk), 0, n_k - 1)


def flash_forward_tpu(q, k, v, q_seg, kv_seg, offset, st):
    """(out [B, T, H, D], lse [B, H, T]) for `flash_attention` on TPU."""
    b, t, h, d = q.shape
    if st.kv_layout == "bskd":
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    kh = k.shape[1]
    g = h // kh
    bq = min(st.blocks.block_q, round_up(t, 8))
    bk = round_up(min(st.blocks.block_k, round_up(st.s, 128)), 128)  # lanes
    tp, sp = round_up(t, bq), round_up(st.s, bk)
    n_q, n_k = tp // bq, sp // bk
    qh = jnp.pad(q.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, tp - t), (0, 0)))
    kp = jnp.pad(k, ((0, 0), (0, 0), (0, sp - st.s), (0, 0)))
    vp = jnp.pad(v, ((0, 0), (0, 0), (0, sp - st.s), (0, 0)))
    qs = jnp.broadcast_to(jnp.pad(q_seg, ((0, 0), (0, tp - t)))[:, :, None], (b, tp, LANES))
    ks = jnp.broadcast_to(jnp.pad(kv_seg, ((0, 0), (0, sp - st.s)))[:, None, :], (b, 8, sp))

    def kv_index(b_, h_, i, j, off):
        q_first = i * bq + off[0]
        last = _last_tile(q_first + bq - 1, st, bk, n_k)
        return (
            b_,
            lax.div(h_, g),
            jnp.clip(j, jnp.minimum(_first_tile(q_first, st, bk), last), last),
            0,
        )

    def ks_index(b_, h_, i, j, off):
        return (b_, 0, kv_index(b_, h_, i, j, off)[2])

    kernel = functools.partial(_kernel, st=st, bq=bq, bk=bk, n_k=n_k)
    out, lse = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(b, h, n_q, n_k),
            in_specs=[
                pl.BlockSpec((None, None, bq, d), lambda b_, h_, i, j, off: (b_, h_, i, 0)),
                pl.BlockSpec((None, None, bk, d), kv_index),
                pl.BlockSpec((None, None, bk, d), kv_index),
                pl.BlockSpec((None, bq, LANES), lambda b_, h_, i, j, off: (b_, i, 0)),
                pl.BlockSpec((None, 8, bk), ks_index),
            ],
            out_specs=[
                pl.BlockSpec((None, None, bq, d), lambda b_, h_, i, j, off: (b_, h_, i, 0)),
                pl.BlockSpec((None, None, bq, LANES), lambda b_, h_, i, j, off: (b_, h_, i, 0)),
            ],
            scratch_shapes=[
                pltpu.VMEM((bq, LANES), jnp.float32),
                pltpu.VMEM((bq, LANES), jnp.float32),
                pltpu.VMEM((bq, d), jnp.float32),
            ],
        ),
        out_shape=[
            jax.ShapeDtypeStruct((b, h, tp, d), q.dtype),
            jax.ShapeDtypeStruct((b, h, tp, LANES), jnp.float32),
        ],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
        ),
        interpret=tpu_interpret_params() if st.interpret else False,
        name="flash_attention_tpu",
    )(offset, qh, kp, vp, qs, ks)
    return out[:, :, :t].transpose(0, 2, 1, 3), lse[:, :, :t, 0]
