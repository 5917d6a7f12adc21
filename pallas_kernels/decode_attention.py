"""One decode step of one attention layer in one kernel: RoPE on the new token's query and key,
the key and value written into the KV cache in place, and attention over the cache.

At batch 1 a decode layer's attention is small work split over several launches (XLA: the
cache writes of k and of v, the scores and softmax, the weighted sum of values: ~8 µs a
layer of Llama-3.2-1B on an H100, where each launch costs ~1.3 µs at least). Here each
program takes one query head of one sequence: it rotates its query row and the key, streams
its KV head's cache in blocks of `block_s` keys with an online softmax, and (the KV head's
first program) stores the key and value at `slot`. The new key and value enter the softmax
from registers: a program that reads the slot while it is written masks it, so none depends
on the write. The G programs of a KV head read the same cache, the later ones from L2. Every
product is 2-D ([block, D/2] x [1, D/2] for the scores, [block, 1] x [block, D] for the
values), which Triton lays out well: a first kernel with one program per KV head and
[G, block, D/2] products ran at 13.7 µs at the best launch tried against 3.4 µs for this one
(H200, Llama-3.2-1B's shapes, 256 slots).

Layouts: qkv [B, K, G + 2, D] (the qkv product of one token per sequence: G query heads, then
the key, then the value, per KV head), cos/sin [B, D/2] (the token's RoPE angles), k_cache /
v_cache [B, K, S, D] (head-major, the static cache), kv_valid [B, S] (nonzero = the query may
attend that slot; the new token's own slot always counts), slot: the cache slot of the new
token, shared by the batch (the static generator's left-padded layout).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common import gpu_compiler_params, resolve_platform

BLOCK_S = 256


@dataclasses.dataclass(frozen=True)
class DecodeLaunch:
    """How the kernel is launched. `block_s`: cache slots per step of the online softmax."""

    block_s: int = BLOCK_S
    num_warps: int = 4
    num_stages: int = 1


# The fastest launch of int8_probe's sweep on an H200 (Llama-3.2-1B: G=4, D=64, 256 slots):
# 3.4 µs; 128-slot blocks 4.3 µs, 64-slot blocks 5.3 µs.
default_launch = DecodeLaunch()


def supports(group: int, head_dim: int, slots: int, block_s: int | None = None) -> bool:
    """Whether the kernel takes G query heads per KV head, head_dim D and S cache slots: Triton
    loads and stores power-of-two shapes only ([1, D/2], [block, D/2], [block, D]). G is a
    grid axis, so any count should do, but only powers of two have run on a GPU."""
    bs = min(block_s or default_launch.block_s, slots)

    def pow2(n: int) -> bool:
        return n > 0 and n & (n - 1) == 0

    return (
        pow2(group) and head_dim % 2 == 0 and pow2(head_dim // 2) and pow2(bs) and slots % bs == 0
    )


def _rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE of x [..., D] in float32, rounded to x's dtype (as the model's)."""
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def decode_attention_reference(
    qkv: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    kv_valid: jax.Array,
    slot: jax.Array,
    *,
    sm_scale: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The oracle, op by op as the model's decode step does it: -> (out [B, K, G, D] in qkv's
    dtype, k_cache, v_cache updated at `slot`)."""
    g = qkv.shape[2] - 2
    cs = (cos[:, None, None, :], sin[:, None, None, :])
    q = _rope(qkv[:, :, :g], *cs)  # [B, K, G, D]
    k = _rope(qkv[:, :, g], cos[:, None], sin[:, None])  # [B, K, D]
    k_cache = lax.dynamic_update_slice_in_dim(k_cache, k[:, :, None].astype(k_cache.dtype), slot, 2)
    v_cache = lax.dynamic_update_slice_in_dim(
        v_cache, qkv[:, :, g + 1, None].astype(v_cache.dtype), slot, 2
    )
    valid = (kv_valid != 0) | (jnp.arange(k_cache.shape[2]) == slot)[None]  # [B, S]
    qf = q.astype(jnp.float32) * sm_scale
    kf = k_cache.astype(qkv.dtype).astype(jnp.float32)
    scores = jnp.einsum("bkgd,bksd->bkgs", qf, kf, precision=lax.Precision.HIGHEST)
    scores = jnp.where(valid[:, None, None], scores, -jnp.inf)
    e = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    vf = v_cache.astype(qkv.dtype).astype(jnp.float32)
    out = jnp.einsum("bkgs,bksd->bkgd", e, vf, precision=lax.Precision.HIGHEST)
    out = out / jnp.sum(e, axis=-1, keepdims=True)
    return out.astype(qkv.dtype), k_cache, v_cache


def decode_attention(
    qkv: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    kv_valid: jax.Array,
    slot: jax.Array,
    *,
    sm_scale: float,
    block_s: int | None = None,
    launch: DecodeLaunch | None = None,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """As `decode_attention_reference`. The caches are written in place where the calling
    program owns their buffers (a jitted loop carrying them, donated arguments); elsewhere XLA
    copies them first. `launch` defaults to `default_launch`; `block_s` overrides its block."""
    launch = launch or default_launch
    if block_s is not None:
        launch = dataclasses.replace(launch, block_s=block_s)
    b, kh, g2, d = qkv.shape
    s = k_cache.shape[2]
    if k_cache.shape != (b, kh, s, d) or v_cache.shape != k_cache.shape:
        raise ValueError(f"decode_attention: caches must be [B={b}, K={kh}, S, D={d}], got "
                         f"{k_cache.shape} and {v_cache.shape}")  # fmt: skip
    if d % 2 or cos.shape != (b, d // 2) or sin.shape != cos.shape:
        raise ValueError(f"decode_attention: cos/sin must be [B={b}, D/2={d // 2}], got "
                         f"{cos.shape}, {sin.shape}")  # fmt: skip
    if kv_valid.shape != (b, s):
        raise ValueError(f"decode_attention: kv_valid must be [B={b}, S={s}], got {kv_valid.shape}")
    bs = min(launch.block_s, s)
    if s % bs:
        raise ValueError(f"decode_attention: the cache's {s} slots are not a multiple of {bs}")
    _, interpret = resolve_platform("gpu", interpret)
    if not interpret and not supports(g2 - 2, d, s, bs):  # the interpreter takes any shape
        raise ValueError(f"decode_attention: Triton needs powers of two: G={g2 - 2} query heads "
                         f"per KV head, D/2={d // 2}, a block of {bs} slots")  # fmt: skip
    return _call(
        jnp.reshape(jnp.asarray(slot, jnp.int32), (1,)),
        qkv,
        cos.astype(jnp.float32),
        sin.astype(jnp.float32),
        kv_valid.astype(jnp.int32),
        k_cache,
        v_cache,
        float(sm_scale),
        dataclasses.replace(launch, block_s=bs),
        interpret,
    )


def _kernel(
    slot_ref, qkv_ref, cos_ref, sin_ref, valid_ref, kc_ref, vc_ref, out_ref, kc_out, vc_out,
    *, block_s: int, sm_scale: float,
):  # fmt: skip
    """One query head r = program_id(2): qkv_ref [G + 2, D], valid [S, 1], caches [S, D] ->
    out_ref [1, D]. The program of row 0 writes the new key and value. The others may read
    that slot while it is written: they mask it and take the new key and value from
    registers, as it does."""
    g = qkv_ref.shape[0] - 2
    s, d = kc_ref.shape
    h = d // 2
    r = pl.program_id(2)
    dt, cdt, f32 = qkv_ref.dtype, kc_ref.dtype, jnp.float32
    slot = slot_ref[0]
    cos, sin = cos_ref[...], sin_ref[...]  # [1, h]

    def rope(row):  # halves kept apart: a Triton value cannot be sliced
        a = qkv_ref[pl.ds(row, 1), pl.ds(0, h)].astype(f32)
        b = qkv_ref[pl.ds(row, 1), pl.ds(h, h)].astype(f32)
        return (a * cos - b * sin).astype(dt), (b * cos + a * sin).astype(dt)

    q1, q2 = rope(r)  # [1, h]
    k1, k2 = rope(g)
    v = qkv_ref[pl.ds(g + 1, 1), :]  # [1, D]

    @pl.when(r == 0)
    def _():
        kc_out[pl.ds(slot, 1), pl.ds(0, h)] = k1.astype(cdt)
        kc_out[pl.ds(slot, 1), pl.ds(h, h)] = k2.astype(cdt)
        vc_out[pl.ds(slot, 1), :] = v.astype(cdt)

    def widen(x):  # a cache value as the reference reads it: the cache dtype, then qkv's
        return x.astype(cdt).astype(dt).astype(f32)

    q1 = q1.astype(f32) * sm_scale
    q2 = q2.astype(f32) * sm_scale
    # The new key first, from registers: its score starts the running max, so every later
    # block's rescale is finite.
    m = jnp.sum(q1 * widen(k1), axis=1, keepdims=True) + jnp.sum(q2 * widen(k2), axis=1,
                                                                  keepdims=True)  # fmt: skip
    l = jnp.ones((1, 1), f32)
    acc = widen(v)  # [1, D]

    def block(i, carry):
        m, l, acc = carry
        start = pl.multiple_of(i * block_s, block_s)
        keys = pl.ds(start, block_s)
        kb1 = widen(kc_ref[keys, pl.ds(0, h)])  # [bs, h]
        kb2 = widen(kc_ref[keys, pl.ds(h, h)])
        scores = jnp.sum(kb1 * q1, axis=1, keepdims=True) + jnp.sum(kb2 * q2, axis=1,
                                                                     keepdims=True)  # fmt: skip
        idx = start + lax.broadcasted_iota(jnp.int32, (block_s, 1), 0)
        ok = (valid_ref[keys, :] != 0) & (idx != slot)  # [bs, 1]
        scores = jnp.where(ok, scores, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(scores, axis=0, keepdims=True))
        alpha = jnp.exp(m - m_new)
        p = jnp.where(ok, jnp.exp(scores - m_new), 0.0)  # [bs, 1]
        vb = widen(vc_ref[keys, :])  # [bs, D]
        acc = acc * alpha + jnp.sum(p * vb, axis=0, keepdims=True)
        return m_new, l * alpha + jnp.sum(p, axis=0, keepdims=True), acc

    m, l, acc = lax.fori_loop(0, s // block_s, block, (m, l, acc))
    out_ref[...] = (acc / l).astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnums=(7, 8, 9))
def _call(slot, qkv, cos, sin, valid, k_cache, v_cache, sm_scale, launch, interpret):
    b, kh, g2, d = qkv.shape
    s = k_cache.shape[2]
    cache_spec = pl.BlockSpec((None, None, s, d), lambda i, j, r: (i, j, 0, 0))
    row_spec = pl.BlockSpec((1, d // 2), lambda i, j, r: (i, 0))
    kernel = functools.partial(_kernel, block_s=launch.block_s, sm_scale=sm_scale)
    params = None if interpret else gpu_compiler_params(launch.num_warps, launch.num_stages)
    return pl.pallas_call(
        kernel,
        grid=(b, kh, g2 - 2),
        in_specs=[
            pl.BlockSpec((1,), lambda i, j, r: (0,)),
            pl.BlockSpec((None, None, g2, d), lambda i, j, r: (i, j, 0, 0)),
            row_spec,
            row_spec,
            pl.BlockSpec((None, s, 1), lambda i, j, r: (i, 0, 0)),
            cache_spec,
            cache_spec,
        ],
        out_specs=[
            pl.BlockSpec((None, None, 1, d), lambda i, j, r: (i, j, r, 0)),
            cache_spec,
            cache_spec,
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, kh, g2 - 2, d), qkv.dtype),
            jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
            jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype),
        ],
        input_output_aliases={5: 1, 6: 2},
        interpret=interpret,
        compiler_params=params,
        name="decode_attention",
    )(slot, qkv, cos, sin, valid[:, :, None], k_cache, v_cache)  # valid as a column: [B, S, 1]
