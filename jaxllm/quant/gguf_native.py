"""GGUF's Q8_0, Q4_0 and Q4_1 blocks loaded as they are into `QuantizedWeight`s.

A ggml block covers 32 consecutive inputs of one row (output) and is, in bytes:

    Q8_0: d f16, q int8[32]            w = d * q
    Q4_0: d f16, qs u8[16]             w = d * (u - 8)
    Q4_1: d f16, m f16, qs u8[16]      w = d * u + m

with qs[j] holding nibble j (low) and j + 16 (high): the packed int4 layout of
`jaxllm.quant.qtensor` for group 32. So the codes are copied byte for byte, d and m become the
float16 scale and offset, and the model's layout changes (llama.cpp's rotary row order, the
fused QKV and gate/up matrices) are row permutations and concatenations of whole blocks: no
value passes through a float on the way.

Axes: rows (outputs) O, inputs I, blocks N = I / 32.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jaxllm.checkpoints.gguf_loader import PERMUTED_ARCHS, open_gguf, unpermute_rotary
from jaxllm.config import ModelConfig
from jaxllm.quant.qtensor import QuantizedWeight

BLOCK = 32
NATIVE_TYPES = ("Q8_0", "Q4_0", "Q4_1")


def block_weight(tensor) -> QuantizedWeight | None:
    """The tensor's blocks as a QuantizedWeight [O, I] (numpy arrays), or None for types
    without a native form here."""
    kind = tensor.tensor_type.name
    if kind not in NATIVE_TYPES:
        return None
    data = np.asarray(tensor.data)  # [O, bytes per row] uint8
    rows = data.shape[0]
    size = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}[kind]
    blocks = data.reshape(rows, -1, size)
    d = np.ascontiguousarray(blocks[:, :, 0:2]).view(np.float16)[..., 0]  # [O, N]
    if kind == "Q8_0":
        q = np.ascontiguousarray(blocks[:, :, 2:]).view(np.int8).reshape(rows, -1)
        return QuantizedWeight(q, d, None, 8, BLOCK)
    if kind == "Q4_0":
        qs = np.ascontiguousarray(blocks[:, :, 2:]).reshape(rows, -1)
        return QuantizedWeight(qs, d, None, 4, BLOCK)
    m = np.ascontiguousarray(blocks[:, :, 2:4]).view(np.float16)[..., 0]
    qs = np.ascontiguousarray(blocks[:, :, 4:]).reshape(rows, -1)
    return QuantizedWeight(qs, d, m, 4, BLOCK)


def _map_rows(w: QuantizedWeight, fn) -> QuantizedWeight:
    """Apply a row rearrangement `fn` ([O, ...] -> [O', ...]) to codes, scales and offsets."""
    offset = None if w.offset is None else fn(w.offset)
    return QuantizedWeight(fn(w.values), fn(w.scale), offset, w.bits, w.group)


def _concat_rows(parts: list[QuantizedWeight]) -> QuantizedWeight | None:
    """Stack weights along the rows; None unless all share one block type."""
    kinds = {(p.bits, p.group, p.offset is None, p.scale.dtype) for p in parts}
    if len(kinds) != 1:
        return None
    first = parts[0]
    offset = None if first.offset is None else np.concatenate([p.offset for p in parts])
    return QuantizedWeight(
        np.concatenate([p.values for p in parts]),
        np.concatenate([p.scale for p in parts]),
        offset,
        first.bits,
        first.group,
    )


def _fused_qkv(q, k, v, cfg: ModelConfig) -> QuantizedWeight | None:
    """Rows in the model's [K, G + 2, D] order: each KV head's G query heads, its key, its value."""
    kh, g, d = cfg.num_kv_heads, cfg.group_size, cfg.head_dim
    parts = [
        _map_rows(q, lambda a: a.reshape(kh, g * d, -1)),
        _map_rows(k, lambda a: a.reshape(kh, d, -1)),
        _map_rows(v, lambda a: a.reshape(kh, d, -1)),
    ]
    if len({(p.bits, p.offset is None, p.scale.dtype) for p in parts}) != 1:
        return None

    def fuse(get):
        return np.concatenate([get(p) for p in parts], axis=1).reshape(kh * (g + 2) * d, -1)

    offset = None if parts[0].offset is None else fuse(lambda p: p.offset)
    return QuantizedWeight(
        fuse(lambda p: p.values), fuse(lambda p: p.scale), offset, q.bits, q.group
    )


def native_weights(path: str | Path, cfg: ModelConfig) -> dict[str, QuantizedWeight]:
    """Every matrix of the GGUF file that has a native form, by the model's layer names
    (`layers.{i}.attn.qkv`, ..., `embed`, `lm_head`), as jax arrays."""
    reader = open_gguf(path)
    tensors = {t.name: t for t in reader.tensors}
    permuted = cfg.architecture in PERMUTED_ARCHS
    out: dict[str, QuantizedWeight | None] = {}

    def get(name: str) -> QuantizedWeight | None:
        return block_weight(tensors[name]) if name in tensors else None

    def qk(name: str, heads: int) -> QuantizedWeight | None:
        w = get(name)
        if w is None or not permuted:
            return w
        return _map_rows(w, lambda a: unpermute_rotary(a, heads))

    for i in range(cfg.num_layers):
        b, n = f"blk.{i}.", f"layers.{i}."
        q = qk(b + "attn_q.weight", cfg.num_heads)
        k = qk(b + "attn_k.weight", cfg.num_kv_heads)
        v = get(b + "attn_v.weight")
        out[n + "attn.qkv"] = None if None in (q, k, v) else _fused_qkv(q, k, v, cfg)
        out[n + "attn.o"] = get(b + "attn_output.weight")
        gate, up = get(b + "ffn_gate.weight"), get(b + "ffn_up.weight")
        out[n + "mlp.gate_up"] = None if None in (gate, up) else _concat_rows([gate, up])
        out[n + "mlp.down"] = get(b + "ffn_down.weight")
    out["embed"] = get("token_embd.weight")
    if not cfg.tie_word_embeddings:
        out["lm_head"] = get("output.weight")
    return {name: _map_rows(w, jnp.asarray) for name, w in out.items() if w is not None}
