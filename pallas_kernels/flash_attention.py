"""Flash attention: tiled attention with an online softmax, and a backward pass by recomputation.

The [T, S] score matrix never exists in memory: each program holds one tile of queries and
streams tiles of keys/values past it, keeping the running max `m`, the running sum `l` and the
output accumulator in registers. The backward pass saves only the logsumexp and recomputes
the probabilities tile by tile (FlashAttention-2).

Grouped-query attention is native: query head h reads KV head h // G through the block index
maps (no repeated K/V), and dK/dV sum over the G query heads of a group inside one program.

Layouts: q [B, T, H, D]; k, v [B, S, K, D]; causal attention is aligned bottom-right (query i
sits at position i + S - T), as a prefill chunk over a cache needs.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common import (
    LN2,
    LOG2E,
    cdiv,
    check_gqa,
    gpu_compiler_params,
    online_softmax_init,
    online_softmax_step,
    resolve_platform,
    round_up,
)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes: forward (block_q x block_k) and backward (block_q_bwd x block_k_bwd)."""

    block_q: int = 128
    block_k: int = 64
    block_q_bwd: int = 64
    block_k_bwd: int = 64
    num_warps: int = 8
    num_stages: int = 2
    mosaic_gpu: bool = True  # Hopper fast path for the forward where it applies


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything the kernels specialise on (hashable: a custom_vjp nondiff argument)."""

    causal: bool
    sm_scale: float
    window: int | None
    t: int  # true query length
    s: int  # true key length
    has_segments: bool
    blocks: BlockSizes
    platform: str
    interpret: bool
    kv_layout: str = "bskd"  # or "bksd": K/V head-major, as a KV cache is kept
    static_offset: bool = True  # q_offset is the default S - T

    @property
    def kv_seq_axis(self) -> int:
        return 1 if self.kv_layout == "bskd" else 2


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool,
    sm_scale: float | None = None,
    segment_ids: jax.Array | tuple[jax.Array, jax.Array] | None = None,
    sliding_window: int | None = None,
    q_offset: int | jax.Array | None = None,
    kv_layout: str = "bskd",
    block_sizes: BlockSizes | None = None,
    interpret: bool | None = None,
    platform: str | None = None,
) -> jax.Array:
    """Memory-efficient exact attention, differentiable in q, k and v.

    Args:
      q: [B, T, H, D]; k, v: [B, S, K, D]; H a multiple of K. float32 or bfloat16 (the
        softmax and accumulators are float32 either way).
      causal: query i sees keys j <= i + S - T.
      sm_scale: multiplier on q·k; default D ** -0.5.
      segment_ids: int32 [B, S] when T == S, or a pair ([B, T], [B, S]); queries see only keys
        with the same id (ragged or packed sequences).
      sliding_window: hide keys W or more positions behind the query.
      q_offset: position of query 0 among the keys (may be traced); default S - T. A prefill
        chunk written at cache slot c of a longer cache passes c.
      kv_layout: "bskd" (k, v [B, S, K, D]) or "bksd" ([B, K, S, D], a head-major KV cache,
        read in place).
      block_sizes: tile sizes (BlockSizes()).
      interpret: run the Pallas interpreter; default: on CPU.
      platform: "gpu" or "tpu" kernels; default: the backend's (CPU interprets "gpu").

    Returns:
      [B, T, H, D] in q's dtype. A query that sees no key gets zeros.
    """
    b, t, h, d = q.shape
    if kv_layout not in ("bskd", "bksd"):
        raise ValueError(f"flash_attention: kv_layout must be 'bskd' or 'bksd', got {kv_layout!r}")
    if k.ndim != 4 or k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(
            f"flash_attention: k and v must be [B, S, K, D] ({kv_layout}) matching q {q.shape}; "
            f"got k {k.shape}, v {v.shape}"
        )
    s_len, kh = (k.shape[1], k.shape[2]) if kv_layout == "bskd" else (k.shape[2], k.shape[1])
    check_gqa(h, kh, "flash_attention")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"flash_attention: sliding_window must be >= 1, got {sliding_window}")
    q_seg, kv_seg = _segments(segment_ids, b, t, s_len)
    platform, interpret = resolve_platform(platform, interpret)
    static = _Static(
        causal=causal,
        sm_scale=float(d**-0.5 if sm_scale is None else sm_scale),
        window=sliding_window,
        t=t,
        s=s_len,
        has_segments=q_seg is not None,
        blocks=block_sizes or BlockSizes(),
        platform=platform,
        interpret=interpret,
        kv_layout=kv_layout,
        static_offset=q_offset is None,
    )
    if q_seg is None:
        q_seg = jnp.zeros((b, t), jnp.int32)
        kv_seg = jnp.zeros((b, s_len), jnp.int32)
    offset = jnp.reshape(jnp.asarray(s_len - t if q_offset is None else q_offset, jnp.int32), (1,))
    return _flash(q, k, v, q_seg, kv_seg, offset, static)


def _segments(segment_ids, b, t, s):
    if segment_ids is None:
        return None, None
    if isinstance(segment_ids, tuple | list):
        q_seg, kv_seg = segment_ids
    else:
        if t != s:
            raise ValueError(
                f"flash_attention: one segment_ids array needs T == S (got T={t}, S={s}); "
                "pass a (q_segment_ids, kv_segment_ids) pair"
            )
        q_seg = kv_seg = segment_ids
    if q_seg.shape != (b, t) or kv_seg.shape != (b, s):
        raise ValueError(
            f"flash_attention: segment ids must be [B, T]={b, t} and [B, S]={b, s}; "
            f"got {q_seg.shape} and {kv_seg.shape}"
        )
    return q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _flash(q, k, v, q_seg, kv_seg, offset, static):
    return _forward(q, k, v, q_seg, kv_seg, offset, static)[0]


def _flash_fwd(q, k, v, q_seg, kv_seg, offset, static):
    out, lse = _forward(q, k, v, q_seg, kv_seg, offset, static)
    return out, (q, k, v, q_seg, kv_seg, offset, out, lse)


def _flash_bwd(static, res, do):
    q, k, v, q_seg, kv_seg, offset, out, lse = res
    dq, dk, dv = _backward(q, k, v, q_seg, kv_seg, offset, out, lse, do, static)
    return dq, dk, dv, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _forward(q, k, v, q_seg, kv_seg, offset, st: _Static):
    if st.platform == "tpu":
        from pallas_kernels.flash_attention_tpu import flash_forward_tpu

        return flash_forward_tpu(q, k, v, q_seg, kv_seg, offset, st)
    if st.blocks.mosaic_gpu and st.static_offset:
        from pallas_kernels import flash_attention_mgpu

        if flash_attention_mgpu.supported(q, k, st):
            return flash_attention_mgpu.flash_forward_mgpu(q, k, v, st)
    return _forward_gpu(q, k, v, q_seg, kv_seg, offset, st)


def _backward(q, k, v, q_seg, kv_seg, offset, out, lse, do, st: _Static):
    if st.platform == "tpu":  # no TPU backward kernel yet: differentiate the dense form
        _, vjp = jax.vjp(lambda q, k, v: _dense(q, k, v, q_seg, kv_seg, offset, st), q, k, v)
        return vjp(do)
    return _backward_gpu(q, k, v, q_seg, kv_seg, offset, out, lse, do, st)


def _dense(q, k, v, q_seg, kv_seg, offset, st: _Static):
    """The same attention as one dense softmax (O(T * S) memory): the jnp reference."""
    from pallas_kernels.reference import flash_attention_reference

    if st.kv_layout == "bksd":
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    return flash_attention_reference(
        q, k, v, causal=st.causal, sm_scale=st.sm_scale,
        segment_ids=(q_seg, kv_seg) if st.has_segments else None,
        sliding_window=st.window, q_offset=offset[0],
    )  # fmt: skip


def _kv_spec(st: _Static, rows: int, d: int, index):
    """BlockSpec of a K/V tile of `rows` keys; index(grid...) -> (batch, kv_head, key block)."""
    if st.kv_layout == "bskd":
        return pl.BlockSpec((None, rows, None, d), lambda *g: _bskd(index(*g)))
    return pl.BlockSpec((None, None, rows, d), lambda *g: _bksd(index(*g)))


def _bskd(idx):
    b, h, j = idx
    return (b, j, h, 0)


def _bksd(idx):
    b, h, j = idx
    return (b, h, j, 0)


# ----------------------------------------------------------------------------------------------
# Masks, shared by all kernels. Positions are absolute: query row r of tile i is at
# i * block_q + r + (S - T); key column c of tile j at j * block_k + c.


def _tile_mask(qpos, kpos, q_seg, kv_seg, st: _Static):
    """[bq, bk] bool for absolute query positions [bq, 1] and key positions [1, bk] (segment
    ids [bq] and [bk])."""
    mask = kpos < st.s  # keys padded up to the tile size
    if st.causal:
        mask &= kpos <= qpos
    if st.window is not None:
        mask &= qpos - kpos < st.window
    if st.has_segments:
        mask = mask & (q_seg[:, None] == kv_seg[None, :])
    return mask


def _kv_tile_range(q_first, q_last, st: _Static, block_k: int):
    """Key tiles [lo, hi) that a query tile spanning positions [q_first, q_last] can see, and
    `full`: tiles in [lo, full) need no mask at all (every key visible to every query)."""
    n = cdiv(st.s, block_k)
    hi = jnp.minimum(n, lax.div(q_last, block_k) + 1) if st.causal else n
    lo = 0
    if st.window is not None:
        lo = lax.div(jnp.maximum(q_first - st.window + 1, 0), block_k)
    if st.window is not None or st.has_segments:
        full = lo
    else:
        full_causal = lax.div(q_first + 1, block_k) if st.causal else n
        full = jnp.minimum(full_causal, st.s // block_k)
    hi = jnp.maximum(hi, lo)
    return lo, jnp.clip(full, lo, hi), hi


def _dot(a, b, trans_b=False):
    dims = (((1,), (1,)), ((), ())) if trans_b else (((1,), (0,)), ((), ()))
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _padded(x, axis, size):
    if x.shape[axis] == size:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad)


# ----------------------------------------------------------------------------------------------
# GPU forward: grid (batch, query head, query tile); a loop over key tiles inside.


def _fwd_kernel(
    off_ref, q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, lse_ref, *, st: _Static, bq, bk
):
    i = pl.program_id(2)
    q_first = i * bq + off_ref[0]
    rows = q_first + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
    q = q_ref[...]
    q_seg = qs_ref[...] if st.has_segments else None
    scale = st.sm_scale * LOG2E  # scores in base 2: exp2 is the cheap instruction

    def body(j, carry, masked):
        keys = pl.ds(j * bk, bk)
        s = _dot(q, k_ref[keys, :], trans_b=True) * scale  # [bq, bk]
        mask = None
        if masked:
            kpos = j * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
            kv_seg = ks_ref[keys] if st.has_segments else None
            mask = _tile_mask(rows, kpos, q_seg, kv_seg, st)
        return online_softmax_step(carry, s, v_ref[keys, :], mask)

    lo, full, hi = _kv_tile_range(q_first, q_first + bq - 1, st, bk)
    carry = online_softmax_init(bq, q.shape[-1])
    carry = lax.fori_loop(lo, full, functools.partial(body, masked=False), carry)
    acc, m, l = lax.fori_loop(full, hi, functools.partial(body, masked=True), carry)
    seen = l > 0
    l_safe = jnp.where(seen, l, 1.0)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, (m + jnp.log2(l_safe)) * LN2, -jnp.inf)


def _forward_gpu(q, k, v, q_seg, kv_seg, offset, st: _Static):
    b, t, h, d = q.shape
    g = h // k.shape[3 - st.kv_seq_axis]
    bq = min(st.blocks.block_q, round_up(t, 16))
    bk = min(st.blocks.block_k, round_up(st.s, 16))
    tp, sp = round_up(t, bq), round_up(st.s, bk)
    ax = st.kv_seq_axis
    qp, kp, vp = _padded(q, 1, tp), _padded(k, ax, sp), _padded(v, ax, sp)
    qsp, ksp = _padded(q_seg, 1, tp), _padded(kv_seg, 1, sp)
    kernel = functools.partial(_fwd_kernel, st=st, bq=bq, bk=bk)
    whole_kv = _kv_spec(st, sp, d, lambda b_, h_, i: (b_, h_ // g, 0))
    out, lse = pl.pallas_call(
        kernel,
        grid=(b, h, tp // bq),
        in_specs=[
            pl.BlockSpec((1,), lambda b_, h_, i: (0,)),
            pl.BlockSpec((None, bq, None, d), lambda b_, h_, i: (b_, i, h_, 0)),
            whole_kv,
            whole_kv,
            pl.BlockSpec((None, bq), lambda b_, h_, i: (b_, i)),
            pl.BlockSpec((None, sp), lambda b_, h_, i: (b_, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, bq, None, d), lambda b_, h_, i: (b_, i, h_, 0)),
            pl.BlockSpec((None, None, bq), lambda b_, h_, i: (b_, h_, i)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, tp, h, d), q.dtype),
            jax.ShapeDtypeStruct((b, h, tp), jnp.float32),
        ],
        interpret=st.interpret,
        compiler_params=None
        if st.interpret
        else gpu_compiler_params(st.blocks.num_warps, st.blocks.num_stages),
        name="flash_attention_fwd",
    )(offset, qp, kp, vp, qsp, ksp)
    return out[:, :t], lse[:, :, :t]


# ----------------------------------------------------------------------------------------------
# GPU backward. dK/dV: grid (batch, KV head, key tile), looping over the G query heads of the
# group and the query tiles that see this key tile. dQ: grid (batch, query head, query tile),
# looping over key tiles as the forward does. delta = rowsum(dO * O) comes from XLA.


def _q_tile_range(k_first, k_last, offset, st: _Static, bq: int, nq: int):
    """Query tiles [lo, hi) that can see any key in positions [k_first, k_last]."""
    lo = jnp.maximum(0, lax.div(jnp.maximum(k_first - offset, 0), bq)) if st.causal else 0
    hi = nq
    if st.window is not None:  # query position < k_last + window
        hi = jnp.minimum(nq, lax.div(jnp.maximum(k_last + st.window - offset, 0) + bq - 1, bq))
    return lo, jnp.maximum(hi, lo)


def _dkv_kernel(
    off_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qs_ref, ks_ref, dk_ref, dv_ref,
    *, st: _Static, bq, bk, g, nq,
):  # fmt: skip
    kvh, j = pl.program_id(1), pl.program_id(2)
    offset = off_ref[0]
    kpos = j * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    k, v = k_ref[...], v_ref[...]
    kv_seg = ks_ref[...] if st.has_segments else None
    scale = st.sm_scale * LOG2E
    lo, hi = _q_tile_range(j * bk, j * bk + bk - 1, offset, st, bq, nq)

    def q_tile(i, carry, head):
        dk, dv = carry
        rows_sl = pl.ds(i * bq, bq)
        q = q_ref[rows_sl, head, :]
        do = do_ref[rows_sl, head, :]
        lse2 = lse_ref[head, rows_sl] * LOG2E
        rows = i * bq + offset + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
        q_seg = qs_ref[rows_sl] if st.has_segments else None
        mask = _tile_mask(rows, kpos, q_seg, kv_seg, st)
        p = jnp.where(mask, jnp.exp2(_dot(q, k, trans_b=True) * scale - lse2[:, None]), 0.0)
        dv = dv + _dot(p.astype(do.dtype).T, do)
        dp = _dot(do, v, trans_b=True)
        ds = p * (dp - delta_ref[head, rows_sl][:, None])
        dk = dk + _dot(ds.astype(q.dtype).T, q)
        return dk, dv

    def head_loop(gi, carry):
        head = kvh * g + gi
        return lax.fori_loop(lo, hi, functools.partial(q_tile, head=head), carry)

    d = k.shape[-1]
    zeros = jnp.zeros((bk, d), jnp.float32)
    dk, dv = lax.fori_loop(0, g, head_loop, (zeros, zeros))
    dk_ref[...] = (dk * st.sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(
    off_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qs_ref, ks_ref, dq_ref,
    *, st: _Static, bq, bk,
):  # fmt: skip
    i = pl.program_id(2)
    q_first = i * bq + off_ref[0]
    rows = q_first + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
    q, do = q_ref[...], do_ref[...]
    lse2 = lse_ref[...] * LOG2E
    delta = delta_ref[...]
    q_seg = qs_ref[...] if st.has_segments else None
    scale = st.sm_scale * LOG2E

    def body(j, dq):
        keys = pl.ds(j * bk, bk)
        kpos = j * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
        kv_seg = ks_ref[keys] if st.has_segments else None
        mask = _tile_mask(rows, kpos, q_seg, kv_seg, st)
        k = k_ref[keys, :]
        p = jnp.where(mask, jnp.exp2(_dot(q, k, trans_b=True) * scale - lse2[:, None]), 0.0)
        dp = _dot(do, v_ref[keys, :], trans_b=True)
        ds = p * (dp - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k)

    lo, _, hi = _kv_tile_range(q_first, q_first + bq - 1, st, bk)
    dq = lax.fori_loop(lo, hi, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * st.sm_scale).astype(dq_ref.dtype)


def _backward_gpu(q, k, v, q_seg, kv_seg, offset, out, lse, do, st: _Static):
    b, t, h, d = q.shape
    ax = st.kv_seq_axis
    kh = k.shape[3 - ax]
    g = h // kh
    bq = min(st.blocks.block_q_bwd, round_up(t, 16))
    bk = min(st.blocks.block_k_bwd, round_up(st.s, 16))
    tp, sp = round_up(t, bq), round_up(st.s, bk)
    nq = tp // bq
    delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), do.astype(jnp.float32))
    # Padded query rows get lse = +inf, so their probabilities are exactly zero.
    lse = jnp.where(jnp.isfinite(lse), lse, jnp.inf)
    qp, dop = _padded(q, 1, tp), _padded(do, 1, tp)
    lsep = jnp.pad(lse, ((0, 0), (0, 0), (0, tp - t)), constant_values=jnp.inf)
    deltap = _padded(delta, 2, tp)
    kp, vp = _padded(k, ax, sp), _padded(v, ax, sp)
    qsp, ksp = _padded(q_seg, 1, tp), _padded(kv_seg, 1, sp)
    kv_tile = _kv_spec(st, bk, d, lambda b_, kv, j: (b_, kv, j))
    whole_kv = _kv_spec(st, sp, d, lambda b_, h_, i: (b_, h_ // g, 0))
    off_spec = pl.BlockSpec((1,), lambda *_: (0,))
    params = (
        None if st.interpret else gpu_compiler_params(st.blocks.num_warps, st.blocks.num_stages)
    )
    full_q = pl.BlockSpec((None, tp, h, d), lambda b_, x, y: (b_, 0, 0, 0))
    full_rows = pl.BlockSpec((None, h, tp), lambda b_, x, y: (b_, 0, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, st=st, bq=bq, bk=bk, g=g, nq=nq),
        grid=(b, kh, sp // bk),
        in_specs=[
            off_spec,
            full_q,
            kv_tile,
            kv_tile,
            full_q,
            full_rows,
            full_rows,
            pl.BlockSpec((None, tp), lambda b_, kv, j: (b_, 0)),
            pl.BlockSpec((None, bk), lambda b_, kv, j: (b_, j)),
        ],
        out_specs=[kv_tile, kv_tile],
        out_shape=[jax.ShapeDtypeStruct(kp.shape, k.dtype)] * 2,
        interpret=st.interpret,
        compiler_params=params,
        name="flash_attention_dkv",
    )(offset, qp, kp, vp, dop, lsep, deltap, qsp, ksp)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, st=st, bq=bq, bk=bk),
        grid=(b, h, nq),
        in_specs=[
            off_spec,
            pl.BlockSpec((None, bq, None, d), lambda b_, h_, i: (b_, i, h_, 0)),
            whole_kv,
            whole_kv,
            pl.BlockSpec((None, bq, None, d), lambda b_, h_, i: (b_, i, h_, 0)),
            pl.BlockSpec((None, None, bq), lambda b_, h_, i: (b_, h_, i)),
            pl.BlockSpec((None, None, bq), lambda b_, h_, i: (b_, h_, i)),
            pl.BlockSpec((None, bq), lambda b_, h_, i: (b_, i)),
            pl.BlockSpec((None, sp), lambda b_, h_, i: (b_, 0)),
        ],
        out_specs=pl.BlockSpec((None, bq, None, d), lambda b_, h_, i: (b_, i, h_, 0)),
        out_shape=jax.ShapeDtypeStruct(qp.shape, q.dtype),
        interpret=st.interpret,
        compiler_params=params,
        name="flash_attention_dq",
    )(offset, qp, kp, vp, dop, lsep, deltap, qsp, ksp)
    keys = slice(0, st.s)
    if ax == 1:
        return dq[:, :t], dk[:, keys], dv[:, keys]
    return dq[:, :t], dk[:, :, keys], dv[:, :, keys]
