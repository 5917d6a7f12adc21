"""Llama-family decoder in Flax NNX: RMSNorm, RoPE, grouped-query attention, SwiGLU.

Axes, everywhere in this file: batch B, positions T, cache slots S, embed E, KV heads K,
query heads per KV head G (so heads H = K * G), head_dim D, MLP width M, vocab V.

Weights come in a *canonical* tree of numpy arrays (what the checkpoint readers produce,
`x @ W` orientation, HF rotate-half RoPE layout):

    embed [V, E], final_norm [E], lm_head [E, V] (absent when tied),
    layers[i]: attn_norm [E], wq [E, H*D], wk [E, K*D], wv [E, K*D], (bq, bk, bv),
               wo [H*D, E], mlp_norm [E], w_gate [E, M], w_up [E, M], w_down [M, E]

The model fuses Q/K/V into one [E, K, G+2, D] projection, so each KV head's queries come out
next to it: attention reads K/V once per group and never repeats them per query head.
Weights are held transposed, [out, in], the layout XLA:CPU's few-row dots read fastest.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.attention import decode_attention_applies
from jaxllm.config import ModelConfig
from jaxllm.cpu_kernels import linear
from jaxllm.quant import cpu_layer, fused
from jaxllm.quant import kv as kvq
from pallas_kernels.decode_attention import decode_attention

KVCache = tuple[tuple[jax.Array, jax.Array], ...]  # per layer: k, v each [B, K, S, D]
PagedCache = tuple[tuple[jax.Array, jax.Array], ...]  # per layer: k, v [K, pages, page, D]
AttentionFn = Callable[..., jax.Array]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedMeta:
    """Where an engine step's packed tokens go and what they attend to (S sequence slots)."""

    slot_mapping: jax.Array  # [T] int32 flat cache slot of each token; out of range = padding
    kv_lens: jax.Array  # [S] int32 tokens cached per sequence, this step's included
    block_tables: jax.Array  # [S, P] int32 pages of each sequence
    cu_q_lens: jax.Array  # [S + 1] int32 offsets of each sequence's tokens in the step
    num_seqs: jax.Array  # [] int32 sequence slots in use
    # The same step split for the CPU path (`jaxllm.engine.cpu_attention`); padding rows = T.
    dec_rows: jax.Array  # [N] rows of one-token (decode) sequences
    dec_seq: jax.Array  # [N] their sequence slots
    pre_rows: jax.Array  # [C, R] rows of each multi-token (prefill) sequence
    pre_seq: jax.Array  # [C] their sequence slots


class Buffer(nnx.Variable):
    """A constant array that is part of the model but not trained (RoPE frequencies)."""


def _param(x: np.ndarray, dtype: Any) -> nnx.Param:
    return nnx.Param(jnp.asarray(x, dtype=dtype))


class Linear(nnx.Module):
    """y = x @ W + b, with W stored transposed as [out, in] (PyTorch's layout).

    Few-row products (decode) on CPU go to the native kernel in cpu_kernels/, which uses
    every core; XLA's dot elsewhere. On CPU XLA's dot also reads [out, in] faster than
    [in, out]: 23 against 28 ms for a batch-1 pass over SmolLM2's matrices.
    """

    def __init__(self, weight: np.ndarray, *, dtype: Any, bias: np.ndarray | None = None):
        self.weight = _param(np.ascontiguousarray(weight.T), dtype)  # [out, in]
        self.bias = _param(bias, dtype) if bias is not None else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = linear(x, self.weight[...])
        if self.bias is not None:
            y = y + self.bias[...]
        return y


class Embedding(nnx.Module):
    """Token embedding [V, E]; `attend` is the tied output head (x @ table^T)."""

    def __init__(self, table: np.ndarray, *, dtype: Any):
        self.table = _param(table, dtype)
        self.out_dtype = jnp.dtype(dtype)  # the activations' dtype, whatever the table's

    def __call__(self, ids: jax.Array) -> jax.Array:
        """ids [B, T] -> [B, T, E] in `out_dtype`."""
        return jnp.take(self.table[...], ids, axis=0).astype(self.out_dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """x [B, T, E] -> logits [B, T, V] in float32."""
        return linear(x, self.table[...]).astype(jnp.float32)


class RMSNorm(nnx.Module):
    def __init__(self, weight: np.ndarray, *, eps: float, dtype: Any):
        self.weight = _param(weight, dtype)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * x32.astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig, factors: np.ndarray | None = None) -> np.ndarray:
    """Inverse frequencies [D/2] of rotate-half RoPE, with llama3 scaling if configured.

    `factors` (GGUF's `rope_freqs.weight`) divide the plain frequencies when given.
    """
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    if factors is not None:
        return (inv / np.asarray(factors, np.float64)).astype(np.float32)
    rs = cfg.rope_scaling
    if rs is not None and rs.rope_type == "linear":
        inv = inv / rs.factor  # positions divided by the factor
    elif rs is not None:
        low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
        high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
        wavelen = 2 * math.pi / inv
        smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
            rs.high_freq_factor - rs.low_freq_factor
        )
        scaled = np.where(wavelen > low_wavelen, inv / rs.factor, inv)
        mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        inv = np.where(mid, (1 - smooth) * inv / rs.factor + smooth * inv, scaled)
    return inv.astype(np.float32)


def rope_tables(positions: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin of each position's angles: positions [B, T] int -> two [B, T, D/2]."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, tables: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotate-half RoPE. x [B, T, ..., D]; `tables`: `rope_tables` of its positions [B, T],
    computed once per forward and shared by every layer (XLA:CPU otherwise evaluates the sin
    and cos inside each layer's q and k fusions: ~2.5% of an engine step)."""
    cos, sin = tables
    lead = cos.shape[:2] + (1,) * (x.ndim - 3) + cos.shape[-1:]
    cos, sin = cos.reshape(lead), sin.reshape(lead)
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, p: dict[str, np.ndarray], *, dtype: Any):
        e, k, g, d = cfg.hidden_size, cfg.num_kv_heads, cfg.group_size, cfg.head_dim
        self.kv_heads, self.group, self.head_dim = k, g, d
        w = np.concatenate(
            [p["wq"].reshape(e, k, g, d), p["wk"].reshape(e, k, 1, d), p["wv"].reshape(e, k, 1, d)],
            axis=2,
        )
        bias = None
        if "bq" in p:
            bias = np.concatenate(
                [p["bq"].reshape(k, g, d), p["bk"].reshape(k, 1, d), p["bv"].reshape(k, 1, d)],
                axis=1,
            ).reshape(-1)
        self.qkv = Linear(w.reshape(e, -1), dtype=dtype, bias=bias)
        self.o = Linear(p["wo"], dtype=dtype)

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        inv_freq: jax.Array,
        mask: jax.Array | None,
        kv: tuple[jax.Array, jax.Array] | None,
        cache_index: jax.Array | None,
        attention_fn: AttentionFn,
        norm: RMSNorm | None = None,
        residual: jax.Array | None = None,
        rope: tuple[jax.Array, jax.Array] | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """x [B, T, E] -> ([B, T, E], new (k, v)). With `norm`, x is normalised first; with
        `residual`, it is added to the output (both fused into the products where the int8
        GEMV runs them: jaxllm/quant/fused.py). `rope`: `rope_tables(positions, inv_freq)`,
        shared by the layers."""
        b, t, _ = x.shape
        k_, g, d = self.kv_heads, self.group, self.head_dim
        qkv = fused.norm_linear(norm, self.qkv, x).reshape(b, t, k_, g + 2, d)
        tables = rope_tables(positions, inv_freq) if rope is None else rope
        if t == 1 and decode_attention_applies(attention_fn, g, kv, cache_index, mask):
            out, k, v = decode_attention(
                qkv[:, 0], tables[0][:, 0], tables[1][:, 0], kv[0], kv[1], mask[:, -1],
                cache_index, sm_scale=d**-0.5,
            )  # fmt: skip
            return fused.linear_residual(self.o, out.reshape(b, 1, -1), residual), (k, v)
        q = apply_rope(qkv[:, :, :, :g], tables)  # [B, T, K, G, D]
        # K/V are kept head-major, [B, K, S, D]: the layout the score and value dots read,
        # so no per-step transpose of the whole cache.
        k = apply_rope(qkv[:, :, :, g], tables).transpose(0, 2, 1, 3)
        v = qkv[:, :, :, g + 1].transpose(0, 2, 1, 3)
        if kv is not None:  # an int8 cache (`QuantizedKV`) is written quantized, read float
            idx = (0, 0, cache_index, 0)
            k = kvq.update_slice(kv[0], k, idx)
            v = kvq.update_slice(kv[1], v, idx)
        q_offset = 0 if cache_index is None else cache_index
        k_in, v_in = kvq.read_kv(k, q.dtype), kvq.read_kv(v, q.dtype)
        out = attention_fn(q, k_in, v_in, mask, sm_scale=d**-0.5, q_offset=q_offset)
        return fused.linear_residual(self.o, out.reshape(b, t, k_ * g * d), residual), (k, v)

    def paged(
        self,
        x: jax.Array,
        positions: jax.Array,
        inv_freq: jax.Array,
        pages: tuple[jax.Array, jax.Array],
        meta: PagedMeta,
        paged_attention_fn: Callable[..., jax.Array],
        norm: RMSNorm | None = None,
        residual: jax.Array | None = None,
        rope: tuple[jax.Array, jax.Array] | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """Packed tokens x [T, E] of many sequences over a paged cache; `norm`, `residual`
        [T, E] as in `__call__`; `rope`: `rope_tables(positions[None], inv_freq)`, shared
        by the layers.

        pages: k, v [K, num_pages, page_size, D]. This step's K/V are written at
        `meta.slot_mapping` (flat page * page_size + offset; out-of-range = padding, dropped).
        """
        t = x.shape[0]
        k_, g, d = self.kv_heads, self.group, self.head_dim
        qkv = fused.norm_linear(norm, self.qkv, x[None]).reshape(1, t, k_, g + 2, d)
        tables = rope_tables(positions[None], inv_freq) if rope is None else rope
        q = apply_rope(qkv[:, :, :, :g], tables)[0]  # [T, K, G, D]
        k = apply_rope(qkv[:, :, :, g], tables)[0]  # [T, K, D]
        v = qkv[0, :, :, g + 1]
        kp = kvq.scatter_slots(pages[0], k.transpose(1, 0, 2), meta.slot_mapping)
        vp = kvq.scatter_slots(pages[1], v.transpose(1, 0, 2), meta.slot_mapping)
        out = paged_attention_fn(q.reshape(t, k_ * g, d), kp, vp, meta, sm_scale=d**-0.5)
        res = None if residual is None else residual[None]
        return fused.linear_residual(self.o, out.reshape(1, t, k_ * g * d), res)[0], (kp, vp)


class MLP(nnx.Module):
    """SwiGLU. `shards` > 1 lays the fused gate/up rows out as [shards, 2, M / shards], so a
    tensor-parallel split of the rows into `shards` chunks gives each shard the gate and up
    rows of the same M / shards channels (see jaxllm/parallel.py)."""

    def __init__(self, p: dict[str, np.ndarray], *, dtype: Any, shards: int = 1):
        self.width = p["w_gate"].shape[1]
        self.shards = shards
        e, m = p["w_gate"].shape[0], self.width // shards
        gate_up = np.concatenate(
            [p["w_gate"].reshape(e, shards, 1, m), p["w_up"].reshape(e, shards, 1, m)], axis=2
        ).reshape(e, 2 * self.width)
        self.gate_up = Linear(gate_up, dtype=dtype)
        self.down = Linear(p["w_down"], dtype=dtype)

    def __call__(
        self, x: jax.Array, norm: RMSNorm | None = None, residual: jax.Array | None = None
    ) -> jax.Array:
        """x [..., E] -> [..., E]; `norm`, `residual` as in `Attention.__call__`."""
        if self.shards == 1:
            act = fused.norm_swiglu(norm, self.gate_up, x)
        else:
            h = self.gate_up(x if norm is None else norm(x))
            h = h.reshape(*h.shape[:-1], self.shards, 2, self.width // self.shards)
            gate, up = (h[..., i, :].reshape(*h.shape[:-3], self.width) for i in (0, 1))
            act = jax.nn.silu(gate) * up
        return fused.linear_residual(self.down, act, residual)


class Block(nnx.Module):
    def __init__(
        self, cfg: ModelConfig, p: dict[str, np.ndarray], *, dtype: Any, mlp_shards: int = 1
    ):
        eps = cfg.rms_norm_eps
        self.attn_norm = RMSNorm(p["attn_norm"], eps=eps, dtype=dtype)
        self.attn = Attention(cfg, p, dtype=dtype)
        self.mlp_norm = RMSNorm(p["mlp_norm"], eps=eps, dtype=dtype)
        self.mlp = MLP(p, dtype=dtype, shards=mlp_shards)

    def paged(self, x, positions, inv_freq, pages, meta, paged_attention_fn, rope=None):
        x, pages = self.attn.paged(
            x, positions, inv_freq, pages, meta, paged_attention_fn, self.attn_norm, x, rope
        )
        return self.mlp(x[None], self.mlp_norm, x[None])[0], pages

    def __call__(self, x, positions, inv_freq, mask, kv, cache_index, attention_fn, rope=None):
        x, kv = self.attn(
            x, positions, inv_freq, mask, kv, cache_index, attention_fn, self.attn_norm, x, rope
        )
        return self.mlp(x, self.mlp_norm, x), kv


class Transformer(nnx.Module):
    """The decoder. Layers are unrolled (a Python loop over per-layer weights): a batch-1
    decode step read weights 15-30% faster that way than as a scan over stacked layers, and
    the whole prefill+decode compile stays a few seconds."""

    def __init__(
        self,
        cfg: ModelConfig,
        params: dict[str, Any],
        *,
        dtype: Any = jnp.float32,
        attention: str = "xla",
        rope_factors: np.ndarray | None = None,
        mlp_shards: int = 1,
        weight_dtype: Any = None,
    ):
        """mlp_shards: the tensor-axis size the MLP's gate/up rows are laid out for.
        weight_dtype: store the matrices (linear layers, embedding / tied head) in this dtype
        (None: `dtype`). bfloat16 under a float32 model halves the weight bytes and runs each
        product as bf16 x bf16 with float32 accumulation; norms, rope, softmax, the residual
        stream and the logits stay float32."""
        self.config = cfg
        self.dtype = jnp.dtype(dtype)
        self.attention = attention
        tied = "lm_head" not in params
        self.embed = Embedding(params["embed"], dtype=dtype)
        self.layers = nnx.List(
            [Block(cfg, p, dtype=dtype, mlp_shards=mlp_shards) for p in params["layers"]]
        )
        self.final_norm = RMSNorm(params["final_norm"], eps=cfg.rms_norm_eps, dtype=dtype)
        self.lm_head = None if tied else Linear(params["lm_head"], dtype=dtype)
        self.inv_freq = Buffer(jnp.asarray(rope_inv_freq(cfg, rope_factors)))
        # GGUF's rope_freqs as given (a static tuple): `jaxllm.quant.ggml_exact` divides
        # each angle by them, as llama.cpp does, instead of using inv_freq
        self.rope_factors = None if rope_factors is None else tuple(map(float, rope_factors))
        self.weight_dtype = jnp.dtype(weight_dtype or dtype)
        if self.weight_dtype != self.dtype:
            self.embed.table = _param(self.embed.table[...], self.weight_dtype)
            linears = [self.lm_head] if self.lm_head is not None else []
            for layer in self.layers:
                linears += [layer.attn.qkv, layer.attn.o, layer.mlp.gate_up, layer.mlp.down]
            for lin in linears:
                lin.weight = _param(lin.weight[...], self.weight_dtype)

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        mask: jax.Array | None,
        cache: KVCache | None = None,
        cache_index: jax.Array | None = None,
        last_only: bool = False,
    ) -> tuple[jax.Array, KVCache]:
        """tokens, positions [B, T]; mask [B, T, S] (S = T without a cache).

        With a cache, this step's K/V are written at slots [cache_index, cache_index + T).
        Returns float32 logits [B, T, V] ([B, 1, V] when last_only) and the new cache.
        """
        from jaxllm.attention import get_attention_fn

        if getattr(self, "numerics", None) == "ggml":  # the gguf-llamacpp recipe on CPU
            from jaxllm.quant import ggml_exact

            if ggml_exact.available():
                return ggml_exact.forward(self, tokens, positions, mask, cache, cache_index,
                                          last_only)  # fmt: skip
        attention_fn = get_attention_fn(self.attention)
        inv_freq = self.inv_freq[...]
        rope = rope_tables(positions, inv_freq)
        x = self.embed(tokens)
        new_cache = []
        for i, layer in enumerate(self.layers):
            kv = cache[i] if cache is not None else None
            x, kv = layer(x, positions, inv_freq, mask, kv, cache_index, attention_fn, rope)
            new_cache.append(kv)
        if last_only:
            x = x[:, -1:]
        return self.head(x), tuple(new_cache)

    def head(self, x: jax.Array) -> jax.Array:
        """Final norm and output head (the tied embedding or `lm_head`): x [..., E] -> logits
        [..., V] in float32."""
        x = self.final_norm(x)
        if self.lm_head is None:
            return self.embed.attend(x)
        return self.lm_head(x).astype(jnp.float32)

    def forward_paged(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        pages: PagedCache,
        meta: PagedMeta,
        logits_index: jax.Array,
        num_logits: jax.Array | None = None,
    ) -> tuple[jax.Array, PagedCache]:
        """One engine step: packed tokens [T] and positions [T] of many sequences.

        Returns float32 logits [S, V] at the packed rows `logits_index` [S] (each sequence's
        last token this step) and the updated pages. `num_logits`: rows of `logits_index`
        from it on are padding, whose logits may come back zero.
        """
        from jaxllm.attention import get_paged_attention_fn

        fn = get_paged_attention_fn(self.attention)
        inv_freq = self.inv_freq[...]
        rope = rope_tables(positions[None], inv_freq)
        x = self.embed(tokens[None])[0]
        fused = cpu_layer.applies(self, x, pages)  # w8a8 on CPU: a layer per native call
        new_pages = []
        for i, layer in enumerate(self.layers):
            if fused:
                x, kv = cpu_layer.paged_block(layer, x, rope, pages[i], meta)
            else:
                x, kv = layer.paged(x, positions, inv_freq, pages[i], meta, fn, rope)
            new_pages.append(kv)
        x = x[logits_index]
        if fused and num_logits is not None:  # the head skips the padding rows
            return cpu_layer.head(self, x, num_logits), tuple(new_pages)
        return self.head(x[None])[0], tuple(new_pages)


def default_cache_dtype(model: Any) -> Any:
    """The KV cache dtype a model asks for: a KV recipe's `kv_cache_dtype`, else its own."""
    return getattr(model, "kv_cache_dtype", None) or model.dtype


def init_pages(
    cfg: ModelConfig, num_pages: int, page_size: int, dtype: Any = jnp.float32
) -> PagedCache:
    """Zeroed paged KV cache: per layer, k and v [K, num_pages, page_size, D] (int8: a
    `QuantizedKV` with scales [K, num_pages, page_size])."""
    shape = (cfg.num_kv_heads, num_pages, page_size, cfg.head_dim)
    return tuple(
        (kvq.zeros_kv(shape, dtype), kvq.zeros_kv(shape, dtype)) for _ in range(cfg.num_layers)
    )


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype: Any = jnp.float32) -> KVCache:
    """Zeroed KV cache: per layer, k and v [B, K, S, D] (int8: a `QuantizedKV` with scales
    [B, K, S])."""
    shape = (batch, cfg.num_kv_heads, length, cfg.head_dim)
    return tuple(
        (kvq.zeros_kv(shape, dtype), kvq.zeros_kv(shape, dtype)) for _ in range(cfg.num_layers)
    )


def random_params(cfg: ModelConfig, seed: int = 0, scale: float = 0.02) -> dict[str, Any]:
    """Canonical params with random weights (for configs that ship shapes only, and tests)."""
    rng = np.random.default_rng(seed)
    e, h, k, d, m = (
        cfg.hidden_size,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
        cfg.intermediate_size,
    )

    def w(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * scale).astype(np.float32)

    def norm():
        return (1.0 + 0.1 * rng.standard_normal(e)).astype(np.float32)

    layers = []
    for _ in range(cfg.num_layers):
        p = {
            "attn_norm": norm(),
            "wq": w(e, h * d),
            "wk": w(e, k * d),
            "wv": w(e, k * d),
            "wo": w(h * d, e),
            "mlp_norm": norm(),
            "w_gate": w(e, m),
            "w_up": w(e, m),
            "w_down": w(m, e),
        }
        if cfg.attention_bias:
            p.update(bq=w(h * d), bk=w(k * d), bv=w(k * d))
        layers.append(p)
    params: dict[str, Any] = {"embed": w(cfg.vocab_size, e), "layers": layers, "final_norm": norm()}
    if not cfg.tie_word_embeddings:
        params["lm_head"] = w(e, cfg.vocab_size)
    return params
