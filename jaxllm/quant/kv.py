"""int8 KV cache: one float32 scale per token per KV head, dequantized where it is read.

A cache entry (static cache k or v [B, K, S, D], or paged k or v [K, pages, page, D]) is
either a float array or a `QuantizedKV` of int8 values of the same shape and scales of that
shape without D. The helpers below take either, so the model has one code path.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxllm.quant.kv_bits import Bfloat16Bits, to_bits


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedKV:
    """values int8 [..., D]; scale float32 [...]: x ~= values * scale[..., None]."""

    values: jax.Array
    scale: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape

    @property
    def dtype(self):
        return self.values.dtype

    @property
    def nbytes(self) -> int:
        return int(self.values.nbytes + self.scale.nbytes)

    def reshape(self, *shape) -> QuantizedKV:
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], tuple) else shape
        return QuantizedKV(self.values.reshape(shape), self.scale.reshape(shape[:-1]))


def zeros_kv(shape: tuple[int, ...], dtype) -> jax.Array | QuantizedKV:
    """A zeroed cache entry; int8 gives a `QuantizedKV`."""
    if jnp.dtype(dtype) == jnp.int8:
        return QuantizedKV(jnp.zeros(shape, jnp.int8), jnp.zeros(shape[:-1], jnp.float32))
    return jnp.zeros(shape, dtype)


def quantize_kv(x: jax.Array) -> QuantizedKV:
    """x [..., D] -> int8 codes with a symmetric absmax scale per vector; error <= scale / 2."""
    x32 = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x32), axis=-1)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    q = jnp.clip(jnp.round(x32 / scale[..., None]), -127, 127).astype(jnp.int8)
    return QuantizedKV(q, scale)


def read_kv(entry: jax.Array | QuantizedKV, dtype=jnp.float32) -> jax.Array:
    """The float values of a cache entry (inside a jitted step XLA fuses this into the
    attention's multiply-reduce)."""
    if isinstance(entry, QuantizedKV):
        return (entry.values.astype(jnp.float32) * entry.scale[..., None]).astype(dtype)
    if isinstance(entry, Bfloat16Bits):
        return entry.values()
    return entry


def update_slice(
    entry: jax.Array | QuantizedKV, new: jax.Array, index: tuple
) -> jax.Array | QuantizedKV:
    """`dynamic_update_slice` of new [..., D] into a cache entry at `index` (one per axis)."""
    if isinstance(entry, QuantizedKV):
        q = quantize_kv(new)
        return QuantizedKV(
            jax.lax.dynamic_update_slice(entry.values, q.values, index),
            jax.lax.dynamic_update_slice(entry.scale, q.scale, index[:-1]),
        )
    return jax.lax.dynamic_update_slice(entry, new.astype(entry.dtype), index)


def scatter_slots(
    entry: jax.Array | QuantizedKV, new: jax.Array, slots: jax.Array
) -> jax.Array | QuantizedKV:
    """Paged write: entry [K, pages, page, D], new [K, T, D] into flat slots [T] (page *
    page_size + offset); out-of-range slots are padding and dropped."""
    kh, n_pages, page, d = entry.shape
    if isinstance(entry, QuantizedKV):
        q = quantize_kv(new)
        values = entry.values.reshape(kh, n_pages * page, d).at[:, slots].set(q.values, mode="drop")
        scale = entry.scale.reshape(kh, n_pages * page).at[:, slots].set(q.scale, mode="drop")
        return QuantizedKV(values.reshape(entry.shape), scale.reshape(entry.shape[:-1]))
    if isinstance(entry, Bfloat16Bits):  # scattered in place as uint16 (see kv_bits)
        bits = entry.bits.reshape(kh, n_pages * page, d)
        bits = bits.at[:, slots].set(to_bits(new), mode="drop")
        return Bfloat16Bits(bits.reshape(entry.shape))
    flat = (
        entry.reshape(kh, n_pages * page, d).at[:, slots].set(new.astype(entry.dtype), mode="drop")
    )
    return flat.reshape(entry.shape)


def gather_pages(pages: jax.Array | QuantizedKV, tables: jax.Array) -> jax.Array:
    """pages [K, num_pages, page, D], tables [N, P] -> float32 [N, K, P * page, D]; int8 pages
    are dequantized after the gather, so only the pages a sequence uses are touched."""
    k, _, page, d = pages.shape
    n, p = tables.shape
    if isinstance(pages, QuantizedKV):
        values = jnp.moveaxis(pages.values[:, tables], 0, 1).reshape(n, k, p * page, d)
        scale = jnp.moveaxis(pages.scale[:, tables], 0, 1).reshape(n, k, p * page)
        return values.astype(jnp.float32) * scale[..., None]
    if isinstance(pages, Bfloat16Bits):  # only the gathered pages are taken as bfloat16
        bits = jnp.moveaxis(pages.bits[:, tables], 0, 1).reshape(n, k, p * page, d)
        return Bfloat16Bits(bits).values().astype(jnp.float32)
    return jnp.moveaxis(pages[:, tables], 0, 1).reshape(n, k, p * page, d).astype(jnp.float32)


def kv_bytes_per_element(dtype, head_dim: int) -> float:
    """Bytes one cached K or V element costs, scales included."""
    dtype = jnp.dtype(dtype)
    if dtype == jnp.int8:
        return 1.0 + 4.0 / head_dim
    return float(dtype.itemsize)
