"""Flash attention forward for Hopper GPUs in Mosaic GPU: TMA copies, warpgroup MMAs and warp
specialisation.

Each CTA owns 2 x `block_q` query rows of one head and runs three warpgroups: two compute
warpgroups (one per `block_q` rows, so they share every K/V tile), and one producer that streams
K/V tiles GMEM -> SMEM with TMA through a ring of `stages` buffers. A tile's slot is released
when both compute warpgroups have arrived on its "free" barrier, so loads run ahead of the math
by up to `stages` tiles. Scores and P·V are `wgmma`s; the softmax runs in registers in base 2.

`block_kv == 2 * block_q` makes both compute warpgroups need the same key tiles under a causal
mask (the diagonal tile is masked for both), so neither has to drain the ring for the other.

The fast path covers the common case (bf16/f16, head_dim 64 or 128, lengths multiples of the
tiles, causal or not, no segments or window); `flash_attention` sends everything else to the
portable kernel. Outputs match the portable forward: (out, natural-log lse [B, H, T]).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


@dataclasses.dataclass(frozen=True)
class MgpuConfig:
    block_q: int = 64  # rows per compute warpgroup (the wgmma M tile)
    block_kv: int = 128
    stages: int = 2


def supported(q, k, st) -> bool:
    """Whether the Mosaic GPU fast path can run this call (else the portable kernel does)."""
    if st.platform != "gpu" or st.has_segments or st.window is not None:
        return False
    if q.dtype not in (jnp.bfloat16, jnp.float16) or k.dtype != q.dtype:
        return False
    if q.shape[-1] not in (64, 128) or st.kv_layout != "bskd":
        return False
    cfg = MgpuConfig()
    if st.t % (2 * cfg.block_q) or st.s % cfg.block_kv or (st.causal and st.t > st.s):
        return False
    if st.interpret:
        return False
    try:
        dev = jax.devices()[0]
        return dev.platform == "gpu" and str(getattr(dev, "compute_capability", "")).startswith(
            "9."
        )
    except RuntimeError:
        return False


def flash_forward_mgpu(q, k, v, st, cfg: MgpuConfig = MgpuConfig(), interpret=None):
    """q [B, T, H, D], k/v [B, S, K, D] -> (out [B, T, H, D], lse [B, H, T]); causal is
    aligned bottom-right with the static offset S - T."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    b, t, h, d = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = h // kh
    bq, bk, stages = cfg.block_q, cfg.block_kv, cfg.stages
    assert bk == 2 * bq, "both compute warpgroups must need the same key tiles"
    offset = s - t
    n_kv = s // bk
    dtype = q.dtype
    scale2 = st.sm_scale * LOG2E
    emulated = interpret is not None  # the Mosaic GPU interpreter has no layouts or registers

    def cast(x, layout):
        return x if emulated else plgpu.layout_cast(x, layout)

    def iota(shape, dim):
        if emulated:
            return lax.broadcasted_iota(jnp.int32, shape, dim)
        return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)

    def set_registers(n, action):
        if not emulated:
            plgpu.set_max_registers(n, action=action)

    def kv_steps(tile):
        if not st.causal:
            return n_kv
        # Rows [tile * 2bq, tile * 2bq + 2bq) sit at positions + offset: keys below the last.
        return lax.div(tile * 2 * bq + 2 * bq + offset + bk - 1, bk)

    def body(q_ref, k_ref, v_ref, o_ref, lse_ref, scratch):
        (q_smem, k_smem, v_smem, lse_smem), bars = scratch
        q_bar, k_ready, v_ready, k_free, v_free = bars
        bi, hi, tile = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("q")
        wg = lax.axis_index("wg")
        steps = kv_steps(tile)

        @pl.when(wg < 2)
        def _compute():
            set_registers(232, "increase")
            row0 = tile * 2 * bq + wg * bq
            rows = pl.ds(row0, bq)
            my_q = q_smem.at[wg]
            plgpu.copy_gmem_to_smem(q_ref.at[bi, rows, hi], my_q, q_bar.at[wg])
            plgpu.barrier_wait(q_bar.at[wg])
            wgmma_layout = plgpu.Layout.WGMMA
            m = cast(jnp.full((bq,), -1e30, jnp.float32), wgmma_layout.reduce(1))
            l = cast(jnp.zeros((bq,), jnp.float32), wgmma_layout.reduce(1))
            acc = cast(jnp.zeros((bq, d), jnp.float32), wgmma_layout)

            def step(j, carry, masked):
                acc, m, l = carry
                slot = lax.rem(j, stages)
                plgpu.barrier_wait(k_ready.at[slot])

                def scores(ref):
                    plgpu.wgmma(ref, my_q, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                    return ref[...]

                if emulated:  # the interpreter's wgmma takes no transposed operand
                    sc = lax.dot_general(
                        my_q[...], k_smem.at[slot][...], (((1,), (1,)), ((), ())),
                        preferred_element_type=jnp.float32,
                    )  # fmt: skip
                else:
                    sc = pl.run_scoped(scores, plgpu.ACC((bq, bk), jnp.float32))
                plgpu.barrier_arrive(k_free.at[slot])
                sc = sc * scale2
                if masked:
                    qi, ki = iota((bq, bk), 0), iota((bq, bk), 1)
                    sc = jnp.where(ki + j * bk <= qi + row0 + offset, sc, -1e30)
                m_new = jnp.maximum(m, sc.max(axis=1))
                alpha = jnp.exp2(m - m_new)
                p = jnp.exp2(sc - lax.broadcast_in_dim(m_new, sc.shape, [0]))
                l = l * alpha + p.sum(axis=1)
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                p16 = p.astype(dtype)
                plgpu.barrier_wait(v_ready.at[slot])

                def values(ref):
                    plgpu.wgmma(ref, p16, v_smem.at[slot])
                    return ref[...]

                if emulated:  # nor a register operand
                    pv = lax.dot_general(
                        p16, v_smem.at[slot][...], (((1,), (0,)), ((), ())),
                        preferred_element_type=jnp.float32,
                    )  # fmt: skip
                else:
                    pv = pl.run_scoped(values, plgpu.ACC((bq, d), jnp.float32))
                plgpu.barrier_arrive(v_free.at[slot])
                return acc + pv, m_new, l

            carry = (acc, m, l)
            if st.causal:
                # Tiles wholly below the diagonal need no mask; the last one does.
                carry = lax.fori_loop(0, steps - 1, lambda j, c: step(j, c, False), carry)
                acc, m, l = step(steps - 1, carry, True)
            else:
                acc, m, l = lax.fori_loop(0, steps, lambda j, c: step(j, c, False), carry)
            out = acc / lax.broadcast_in_dim(l, acc.shape, [0])
            my_q[...] = out.astype(dtype)
            lse_smem.at[wg][...] = (m + jnp.log2(l)) * LN2
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(my_q, o_ref.at[bi, rows, hi])
            plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[bi, hi, rows])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _produce():
            set_registers(40, "decrease")
            kv_head = lax.div(hi, jnp.int32(g))

            @pl.loop(0, steps)
            def _(j):
                slot = lax.rem(j, stages)
                keys = (bi, pl.ds(j * bk, bk), kv_head)

                @pl.when(j >= stages)
                def _():
                    plgpu.barrier_wait(k_free.at[slot])

                plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem.at[slot], k_ready.at[slot])

                @pl.when(j >= stages)
                def _():
                    plgpu.barrier_wait(v_free.at[slot])

                plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem.at[slot], v_ready.at[slot])

            # Observe the last releases too, so every barrier phase is waited on exactly once.
            @pl.loop(jnp.maximum(steps - stages, 0), steps)
            def _(j):
                slot = lax.rem(j, stages)
                plgpu.barrier_wait(k_free.at[slot])
                plgpu.barrier_wait(v_free.at[slot])

    def entry(q_ref, k_ref, v_ref, o_ref, lse_ref):
        transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
        smem = (
            plgpu.SMEM((2, bq, d), dtype, transforms=transforms),
            plgpu.SMEM((stages, bk, d), dtype, transforms=transforms),
            plgpu.SMEM((stages, bk, d), dtype, transforms=transforms),
            plgpu.SMEM((2, bq), jnp.float32),
        )
        bars = (
            plgpu.Barrier(num_barriers=2),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_arrivals=2, num_barriers=stages),
            plgpu.Barrier(num_arrivals=2, num_barriers=stages),
        )
        pl.run_scoped(
            lambda *scratch: body(q_ref, k_ref, v_ref, o_ref, lse_ref, scratch),
            smem,
            bars,
            collective_axes="wg",
        )

    kwargs = {} if interpret is None else {"interpret": interpret}
    out, lse = plgpu.kernel(
        entry,
        out_type=(
            jax.ShapeDtypeStruct((b, t, h, d), dtype),
            jax.ShapeDtypeStruct((b, h, t), jnp.float32),
        ),
        grid=(h, t // (2 * bq), b),
        grid_names=("heads", "q", "batch"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        **kwargs,
    )(q, k, v)
    return out, lse
