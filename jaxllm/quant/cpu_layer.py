"""The CPU engine's w8a8 decoder layer in one native call (`cpu_kernels/layer.cc`).

With w8a8 weights an engine step's layer is five native kernel calls (four int8 products and
the paged attention) with about fifteen small XLA ops between them: the norms, the
per-channel scales, RoPE, the cache scatters, SwiGLU and the residual adds. On XLA:CPU those
cost about a quarter of a step, and the kernels ran slower beside XLA's own threads. The
fused call runs the same layer on the kernels' thread pool, skips the bucket's padding rows,
and writes the step's keys and values into the pages in place (the pages are aliased to its
outputs, and the engine donates them). `Block.paged` is its oracle: the products and their
codes are the same kernels', the norms and SiLU are computed in another order, so results
agree to rounding (a rounding can move an activation code by one).

Axes: T packed tokens, E embed, K KV heads, G queries per KV head, D head_dim, M MLP width.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import cpu_kernels
from jaxllm.quant.kv import QuantizedKV
from jaxllm.quant.kv_bits import Bfloat16Bits
from jaxllm.quant.layers import QuantizedEmbedding, QuantizedLinear
from jaxllm.quant.matmul import native_w8a8

_PAGE_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.float16))
_unfused = contextvars.ContextVar("jaxllm_unfused_layers", default=False)


@contextlib.contextmanager
def unfused() -> Iterator[None]:
    """While active (at trace time), engine steps run `Block.paged` op by op."""
    token = _unfused.set(True)
    try:
        yield
    finally:
        _unfused.reset(token)


def enabled() -> bool:
    """The fused layer is allowed: not `unfused()`, and JAXLLM_FUSED_LAYER is not 0. Part of
    `keyed_jit.trace_settings`, so a shared step program is traced again when it changes."""
    return not _unfused.get() and os.environ.get("JAXLLM_FUSED_LAYER", "1") != "0"


def _w8a8_group(lin: Any) -> int | None:
    """The activation group of a plain w8a8 `QuantizedLinear` (per-channel int8 weights, no
    bias or smoothing), else None."""
    if type(lin) is not QuantizedLinear or lin.activation_bits != 8 or not _plain_int8(lin):
        return None
    return lin.activation_group


def block_group(block: Any) -> int | None:
    """The activation group every product of `block` shares, where the fused layer can run it."""
    attn, mlp = block.attn, block.mlp
    if getattr(mlp, "shards", 1) != 1:
        return None
    groups = {_w8a8_group(lin) for lin in (attn.qkv, attn.o, mlp.gate_up, mlp.down)}
    if len(groups) != 1:
        return None
    (group,) = groups
    if group is None:
        return None
    for norm in (block.attn_norm, block.mlp_norm):
        if norm.weight[...].dtype != jnp.float32:
            return None
    return group


def _page_arrays(pages: Any) -> tuple[jax.Array, ...] | None:
    """(k, v, k_scales, v_scales) as the kernel takes them (scales empty but for int8)."""
    k, v = pages
    if isinstance(k, QuantizedKV) and isinstance(v, QuantizedKV):
        scales = (k.scale, v.scale)
        if k.values.dtype != jnp.int8 or any(s.dtype != jnp.float32 for s in scales):
            return None
        return k.values, v.values, *scales
    none = jnp.zeros((0,), jnp.float32)
    if isinstance(k, Bfloat16Bits) and isinstance(v, Bfloat16Bits):
        return k.bits, v.bits, none, none
    if isinstance(k, jax.Array) and isinstance(v, jax.Array) and k.dtype == v.dtype:
        return (k, v, none, none) if k.dtype in _PAGE_DTYPES else None
    return None


def applies(model: Any, x: jax.Array, pages: Any) -> bool:
    """Whether `Transformer.forward_paged` runs its layers fused: on CPU with the kernels
    built, the `xla` attention backend, float32 activations, every layer w8a8 with one
    activation group, float32/float16/bfloat16/int8 pages, and shapes the kernel takes.
    `enabled()` says whether it may."""
    from jaxllm.attention import resolve_backend

    cfg = model.config
    if not enabled() or x.dtype != jnp.float32:
        return False
    if jax.default_backend() != "cpu" or resolve_backend(model.attention) != "xla":
        return False
    if not pages or any(_page_arrays(p) is None for p in pages):
        return False
    e, d, m = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    page_size = _page_arrays(pages[0])[0].shape[2]
    if e % 16 or m % 16 or d % 16 or d > 256 or cfg.group_size > 16 or page_size > 256:
        return False
    for layer in model.layers:
        group = block_group(layer)
        if group is None or e % group or m % group or (cfg.num_heads * d) % group:
            return False
    return cpu_kernels.available()


def paged_block(
    block: Any,
    x: jax.Array,
    rope: tuple[jax.Array, jax.Array],
    pages: Any,
    meta: Any,
) -> tuple[jax.Array, Any]:
    """`Block.paged` in one call (only where `applies`): x [T, E] float32, `rope` the step's
    `rope_tables` ([1, T, D/2] each), pages (k, v) [K, P, page, D], meta a `PagedMeta`.
    Returns the layer's output [T, E] (zero in padding rows) and the updated pages."""
    attn, mlp = block.attn, block.mlp
    k, v, ks, vs = _page_arrays(pages)
    t, e = x.shape

    def codes_scale(lin):
        return lin.values[...], lin.scale[...][:, 0].astype(jnp.float32)

    cos, sin = (a.reshape(t, -1).astype(jnp.float32) for a in rope)
    out_types = (
        jax.ShapeDtypeStruct((t, e), jnp.float32),
        jax.ShapeDtypeStruct(k.shape, k.dtype),
        jax.ShapeDtypeStruct(v.shape, v.dtype),
        jax.ShapeDtypeStruct(ks.shape, ks.dtype),
        jax.ShapeDtypeStruct(vs.shape, vs.dtype),
    )
    aliases = {13: 1, 14: 2, 15: 3, 16: 4}
    y, k, v, ks, vs = jax.ffi.ffi_call("JaxllmW8A8Layer", out_types, input_output_aliases=aliases)(
        x,
        block.attn_norm.weight[...],
        *codes_scale(attn.qkv),
        *codes_scale(attn.o),
        block.mlp_norm.weight[...],
        *codes_scale(mlp.gate_up),
        *codes_scale(mlp.down),
        cos,
        sin,
        k,
        v,
        ks,
        vs,
        meta.slot_mapping.astype(jnp.int32),
        meta.kv_lens.astype(jnp.int32),
        meta.block_tables.astype(jnp.int32),
        meta.cu_q_lens.astype(jnp.int32),
        jnp.reshape(jnp.asarray(meta.num_seqs, jnp.int32), (1,)),
        eps=np.float32(block.attn_norm.eps),
        sm_scale=np.float32(attn.head_dim**-0.5),
        group=np.int64(attn.qkv.activation_group),
    )
    if isinstance(pages[0], QuantizedKV):
        return y, (QuantizedKV(k, ks), QuantizedKV(v, vs))
    if isinstance(pages[0], Bfloat16Bits):
        return y, (Bfloat16Bits(k), Bfloat16Bits(v))
    return y, (k, v)


def head(model: Any, x: jax.Array, valid_rows: jax.Array) -> jax.Array:
    """`model.head` for an engine step whose layers ran fused: x [R, E] -> float32 logits
    [R, V]. Where the output head is a plain w8a8 product (the w8a8 recipe's tied int8
    embedding, or a w8a8 `lm_head`), only the first `valid_rows` rows are computed and the
    rest (the step's padding draws) are zero; otherwise it is `model.head(x)`."""
    lin = model.lm_head if model.lm_head is not None else model.embed
    if type(lin) not in (QuantizedEmbedding, QuantizedLinear) or lin.activation_bits != 8:
        return model.head(x)
    if not _plain_int8(lin):
        return model.head(x)
    e = x.shape[-1]
    group = getattr(lin, "activation_group", None)  # the embedding's: one scale per row
    groups = 1 if group is None or group >= e else e // group  # as `qlinear` chooses
    xn = model.final_norm(x)
    return native_w8a8(xn, lin.values[...], groups, lin.scale[...][:, 0], valid_rows)


def _plain_int8(lin: Any) -> bool:
    """Per-channel int8 codes without bias, smoothing, offsets or super-scales (a
    `QuantizedLinear`, or a `QuantizedEmbedding`, which has neither bias nor smoothing)."""
    return (
        getattr(lin, "bias", None) is None
        and getattr(lin, "inv_smooth", None) is None
        and lin.offset is None
        and lin.scale_super is None
        and lin.bits == 8
        and lin.group == lin.values.shape[1]
    )
