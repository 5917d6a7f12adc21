"""The `gguf-llamacpp` forward: a GGUF model computed with llama.cpp's CPU arithmetic, bit for
bit (jaxllm/cpu_kernels/ggml_exact.cc).

Each operation of llama.cpp's Llama graph (no flash attention, float16 KV cache) runs as one
native call that repeats ggml's float32 roundings in ggml's order: RMSNorm with its double
sum, the Q8_1/Q8_0 activation blocks and block products of Q4_1/Q4_0/Q8_0 weights, RoPE
with its angle recurrence, the float16 attention with ggml's vector exp, SwiGLU. Residual
adds and the embedding lookup are single roundings, the same in XLA. The static generator
runs this forward (`LLM`'s default for the recipe on CPU); a prompt is one ggml batch and
each new token one more, as llama.cpp evaluates them.

Why bit for bit: with 8-bit activation blocks, one float32 rounding that differs flips a
code, the flip grows through the layers, and greedy tokens part at the next near-tie
(benchmarks/results/gguf_agreement_cpu.md). CPU only; elsewhere the recipe keeps the
approximate jnp path (`ggml_dot.py`, `f16_attention.py`).
"""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.checkpoints.gguf_loader import PERMUTED_ARCHS
from jaxllm.errors import JaxLLMError
from jaxllm.quant import kv as kvq
from jaxllm.quant.ggml_dot import check_block_weight
from jaxllm.quant.qtensor import QuantizedWeight

_SOURCES = [Path(__file__).parent.parent / "cpu_kernels" / n for n in ("ggml_exact.cc", "pool.h")]
# -ffp-contract=off: only the FMAs written as std::fma; every other product is rounded.
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-shared", "-fPIC", "-std=c++17",
          "-w", "-pthread"]  # fmt: skip
_TARGETS = (
    "JaxllmGgmlBlockDot",
    "JaxllmGgmlRmsNorm",
    "JaxllmGgmlRope",
    "JaxllmGgmlSwiglu",
    "JaxllmGgmlAttention",
)
NAME = "ggml"
_lock = threading.Lock()
_state: dict[str, bool] = {}


def available() -> bool:
    """True on CPU once the kernels are built and registered (built on the first call)."""
    if jax.default_backend() != "cpu":
        return False
    with _lock:
        if "ok" not in _state:
            from jaxllm import cpu_kernels

            path = cpu_kernels._build(_SOURCES, _FLAGS, "libjaxllm_ggml")
            _state["ok"] = False
            if path is not None:
                lib = ctypes.cdll.LoadLibrary(str(path))
                if lib.JaxllmGgmlLanes() == 0:  # ggml's vector paths on this CPU: not emulated
                    return False
                _state["ok"] = True
                for name in _TARGETS:
                    fn = jax.ffi.pycapsule(getattr(lib, name))
                    jax.ffi.register_ffi_target(name, fn, platform="cpu")
        return _state["ok"]


def _call(name: str, like: jax.Array, *args, **attrs) -> jax.Array:
    out = jax.ShapeDtypeStruct(like.shape, jnp.float32)
    return jax.ffi.ffi_call(name, out, vmap_method="sequential")(*args, **attrs)


def rms_norm(x: jax.Array, norm) -> jax.Array:
    """ggml_rms_norm then ggml_mul by the weight: x [..., E] float32 -> [..., E]."""
    w = norm.weight[...].astype(jnp.float32)
    return _call("JaxllmGgmlRmsNorm", x, x, w, eps=np.float32(norm.eps))


def block_dot(x: jax.Array, w: QuantizedWeight) -> jax.Array:
    """x [..., I] @ W^T for a GGUF Q4_1, Q4_0 or Q8_0 weight W [O, I] -> float32 [..., O]; the
    kernel reads W's stored bytes (4-bit codes packed as GGUF packs them)."""
    check_block_weight(w)
    if w.scale_super is not None:
        raise JaxLLMError("the native GGUF product needs float scales, not scale codes")
    if w.bits == 8:
        kind = 0
    else:
        kind = 1 if w.offset is not None else 2
    o, _ = w.shape
    data = jax.lax.bitcast_convert_type(w.values, jnp.uint8) if w.bits == 8 else w.values
    d = w.scale.astype(jnp.float32)
    m = w.offset.astype(jnp.float32) if w.offset is not None else jnp.zeros((0,), jnp.float32)
    out = jax.ShapeDtypeStruct(x.shape[:-1] + (o,), jnp.float32)
    call = jax.ffi.ffi_call("JaxllmGgmlBlockDot", out, vmap_method="sequential")
    return call(x, data, d, m, kind=np.int32(kind))


def rope(
    x: jax.Array, positions: jax.Array, base: float, factors: np.ndarray | None = None
) -> jax.Array:
    """x [B, T, ..., D] (rotate-half rows) rotated at positions [B, T]; `factors` [D/2]:
    GGUF's rope_freqs, dividing each pair's angle."""
    ff = np.zeros((0,), np.float32) if factors is None else np.asarray(factors, np.float32)
    pos = positions.astype(jnp.int32)
    return _call("JaxllmGgmlRope", x, x, pos, jnp.asarray(ff), base=np.float32(base))


def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    return _call("JaxllmGgmlSwiglu", gate, gate, up)


def attention(q, k, v, mask, *, interleaved: bool) -> jax.Array:
    """q [B, T, K, G, D] float32 over float16 k, v [B, K, S, D] with mask [B, T, S]."""
    scale = np.float32(q.shape[-1] ** -0.5)
    m = mask.astype(jnp.uint8)
    return _call(
        "JaxllmGgmlAttention", q, q, k, v, m, scale=scale, interleaved=np.int32(interleaved)
    )


def supports(model) -> bool:
    """Whether `forward` can run `model`: every product a GGUF block weight (`BlockQ8Linear`,
    `BlockQ8Embedding`; a float32 table may serve the lookup of an untied model), float32
    activations, RoPE without scaling (GGUF's rope_freqs factors are fine), one MLP shard,
    and no bias but QKV's."""
    from jaxllm.model import Embedding, rope_inv_freq
    from jaxllm.quant.layers import BlockQ8Embedding, BlockQ8Linear

    cfg = model.config
    if model.dtype != jnp.float32:
        return False
    # the lookup is exact either way; a tied head must be a block weight too
    float_table = isinstance(model.embed, Embedding) and model.embed.table.dtype == jnp.float32
    if not isinstance(model.embed, BlockQ8Embedding) and not (
        float_table and model.lm_head is not None
    ):
        return False
    if cfg.rope_scaling is not None or cfg.head_dim % 2:
        return False
    factors = getattr(model, "rope_factors", None)
    plain = rope_inv_freq(cfg, None if factors is None else np.asarray(factors))
    if not np.array_equal(np.asarray(model.inv_freq[...]), plain):
        return False
    unbiased = [] if model.lm_head is None else [model.lm_head]
    for layer in model.layers:
        if layer.mlp.shards != 1 or not isinstance(layer.attn.qkv, BlockQ8Linear):
            return False
        unbiased += [layer.attn.o, layer.mlp.gate_up, layer.mlp.down]
    return all(isinstance(lin, BlockQ8Linear) and lin.bias is None for lin in unbiased)


def forward(model, tokens, positions, mask, cache=None, cache_index=None, last_only=False):
    """`Transformer.__call__` with llama.cpp's arithmetic (same arguments and results)."""
    if not available():
        raise JaxLLMError("the gguf-llamacpp forward needs the CPU backend and a C++ compiler")
    cfg = model.config
    k_, g, d = cfg.num_kv_heads, cfg.group_size, cfg.head_dim
    interleaved = cfg.architecture in PERMUTED_ARCHS  # GGUF's Q/K rows, un-permuted on load
    factors = getattr(model, "rope_factors", None)
    x = model.embed(tokens).astype(jnp.float32)
    b, t, _ = x.shape
    if mask is None:
        mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool))[None], (b, t, t))
    new_cache = []
    for i, layer in enumerate(model.layers):
        attn, mlp = layer.attn, layer.mlp
        qkv = block_dot(rms_norm(x, layer.attn_norm), attn.qkv.qweight)
        if attn.qkv.bias is not None:
            qkv = qkv + attn.qkv.bias[...]
        qkv = qkv.reshape(b, t, k_, g + 2, d)
        q = rope(qkv[:, :, :, :g], positions, cfg.rope_theta, factors)
        k = rope(qkv[:, :, :, g], positions, cfg.rope_theta, factors).transpose(0, 2, 1, 3)
        v = qkv[:, :, :, g + 1].transpose(0, 2, 1, 3)
        if cache is not None:
            idx = (0, 0, cache_index, 0)
            k = kvq.update_slice(cache[i][0], k, idx)
            v = kvq.update_slice(cache[i][1], v, idx)
        out = attention(q, k.astype(jnp.float16), v.astype(jnp.float16), mask,
                        interleaved=interleaved)  # fmt: skip
        x = x + block_dot(out.reshape(b, t, -1), attn.o.qweight)
        h = block_dot(rms_norm(x, layer.mlp_norm), mlp.gate_up.qweight)
        width = h.shape[-1] // 2
        x = x + block_dot(swiglu(h[..., :width], h[..., width:]), mlp.down.qweight)
        new_cache.append((k, v))
    if last_only:
        x = x[:, -1:]
    x = rms_norm(x, model.final_norm)
    head = model.embed if model.lm_head is None else model.lm_head
    return block_dot(x, head.qweight), tuple(new_cache)
