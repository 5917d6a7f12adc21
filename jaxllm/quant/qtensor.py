"""Quantized weight matrices: a pytree of integer codes and per-group scales.

A weight W [out, in] (the model's transposed layout) is cut along `in` into groups of `group`
inputs (group = in: one scale per output channel). Per group:

    int8:            W = scale * q                 q int8   in [-127, 127]
    int4 symmetric:  W = scale * (u - 8)           u nibble in [0, 15]
    int4 asymmetric: W = scale * u + offset        u nibble in [0, 15]   (GGUF Q4_1's d, m)

int4 codes are packed two to a byte (XLA:CPU stores an `int4` array one byte per element):
within each group, byte j holds element j in its low nibble and element j + group/2 in its
high one. That is GGUF's Q4_0/Q4_1 block layout for group 32, so those blocks load as they are.

Axes: out O, in I, groups N = I / group.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.errors import JaxLLMError

INT4_SCALE_DTYPE = jnp.float16  # 2 bytes per 32 weights keeps int4-g32 under 0.3x of bf16


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """values: int8 [O, I] (8 bits) or uint8 [O, I/2] (4 bits, packed);
    scale [O, N]; offset [O, N] or None (asymmetric int4 only)."""

    values: jax.Array
    scale: jax.Array
    offset: jax.Array | None
    bits: int = dataclasses.field(metadata=dict(static=True))
    group: int = dataclasses.field(metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, int]:
        o, n = self.values.shape
        return (o, n * 2) if self.bits == 4 else (o, n)

    @property
    def nbytes(self) -> int:
        arrays = [self.values, self.scale] + ([self.offset] if self.offset is not None else [])
        return int(sum(a.size * a.dtype.itemsize for a in arrays))


def check_groups(shape: tuple[int, ...], group: int | None, name: str = "weight") -> int:
    """The group size for a [O, I] weight (I when `group` is None), or JaxLLMError."""
    if len(shape) != 2:
        raise JaxLLMError(f"{name} has shape {tuple(shape)}; only 2-D [out, in] can be quantized")
    n_in = shape[1]
    g = n_in if group is None else group
    if g <= 0 or n_in % g:
        raise JaxLLMError(f"{name} has {n_in} inputs, which group size {g} does not divide")
    return g


def pack_int4(u: jax.Array, group: int) -> jax.Array:
    """Nibbles u [O, I] (uint8 in [0, 15]) -> bytes [O, I/2] in the group-halves layout."""
    o, i = u.shape
    u = u.astype(jnp.uint8).reshape(o, i // group, 2, group // 2)
    return (u[:, :, 0] | (u[:, :, 1] << 4)).reshape(o, i // 2)


def unpack_int4(b: jax.Array, group: int) -> jax.Array:
    """Bytes [O, I/2] -> nibbles [O, I] (uint8 in [0, 15]); the inverse of `pack_int4`."""
    o, h = b.shape
    b = b.reshape(o, 2 * h // group, group // 2)
    return jnp.concatenate([b & 15, b >> 4], axis=-1).reshape(o, 2 * h)


def codes(w: QuantizedWeight) -> jax.Array:
    """The integer codes [O, I]: q for int8, u for int4 (both as stored, before any shift)."""
    return unpack_int4(w.values, w.group) if w.bits == 4 else w.values


def dequantize(w: QuantizedWeight, dtype=jnp.float32) -> jax.Array:
    """float [O, I]."""
    o, i = w.shape
    q = codes(w).astype(jnp.float32).reshape(o, i // w.group, w.group)
    if w.bits == 4 and w.offset is None:
        q = q - 8.0
    out = q * w.scale.astype(jnp.float32)[..., None]
    if w.offset is not None:
        out = out + w.offset.astype(jnp.float32)[..., None]
    return out.reshape(o, i).astype(dtype)


def rtn_scale(w: jax.Array, bits: int, group: int, scale_dtype) -> jax.Array:
    """Symmetric absmax scale [O, N] of each group, rounded to the stored dtype."""
    o, i = w.shape
    amax = jnp.max(jnp.abs(w.astype(jnp.float32).reshape(o, i // group, group)), axis=-1)
    qmax = 127.0 if bits == 8 else 7.0
    # An all-zero group gets scale 1 (its codes are all zero either way).
    return jnp.where(amax > 0, amax / qmax, 1.0).astype(scale_dtype)


def quantize_with_scale(w: jax.Array, scale: jax.Array, bits: int, group: int) -> QuantizedWeight:
    """Round-to-nearest codes of w [O, I] for a given symmetric scale [O, N]."""
    o, i = w.shape
    ws = w.astype(jnp.float32).reshape(o, i // group, group)
    q = jnp.round(ws / scale.astype(jnp.float32)[..., None]).reshape(o, i)
    if bits == 8:
        return QuantizedWeight(jnp.clip(q, -127, 127).astype(jnp.int8), scale, None, 8, group)
    u = (jnp.clip(q, -8, 7) + 8).astype(jnp.uint8)
    return QuantizedWeight(pack_int4(u, group), scale, None, 4, group)


def _round_f16(x: jax.Array, direction: float) -> jax.Array:
    """x rounded to float16, then stepped towards `direction` (-inf or inf) if it went past."""
    r = x.astype(INT4_SCALE_DTYPE)
    past = (r.astype(jnp.float32) > x) if direction < 0 else (r.astype(jnp.float32) < x)
    return jnp.where(past, jnp.nextafter(r, jnp.asarray(direction, r.dtype)), r)


def asymmetric_params(w: jax.Array, group: int) -> tuple[jax.Array, jax.Array]:
    """float16 (scale, offset) [O, N] of each group for codes u in [0, 15]: offset is the
    group's minimum rounded down and scale its range / 15 rounded up, so every weight lies in
    [offset, offset + 15 * scale] and rounding never clips."""
    o, i = w.shape
    ws = w.astype(jnp.float32).reshape(o, i // group, group)
    offset = _round_f16(jnp.min(ws, axis=-1), -jnp.inf)
    span = (jnp.max(ws, axis=-1) - offset.astype(jnp.float32)) / 15.0
    scale = _round_f16(jnp.where(span > 0, span, 1.0), jnp.inf)
    return scale, offset


def quantize_asymmetric_with(
    w: jax.Array, scale: jax.Array, offset: jax.Array, group: int
) -> QuantizedWeight:
    """int4 codes u = round((w - offset) / scale) in [0, 15]; W = scale * u + offset."""
    o, i = w.shape
    ws = w.astype(jnp.float32).reshape(o, i // group, group)
    u = jnp.round(
        (ws - offset.astype(jnp.float32)[..., None]) / scale.astype(jnp.float32)[..., None]
    )
    u = jnp.clip(u, 0, 15).astype(jnp.uint8).reshape(o, i)
    return QuantizedWeight(pack_int4(u, group), scale, offset, 4, group)


def quantize(
    w: jax.Array | np.ndarray,
    bits: int,
    group: int | None = None,
    name: str = "weight",
    symmetric: bool = True,
) -> QuantizedWeight:
    """Round-to-nearest quantization of w [O, I]; |w - dequantize| <= scale / 2.

    Symmetric: int8 or int4 codes around zero. Asymmetric (int4 only): codes over each
    group's [min, max], GGUF Q4_1's form. Scales are float32 for int8 and float16 for int4,
    and the codes are rounded against the stored scale, so the bound holds for the values
    the model actually uses.
    """
    if bits not in (4, 8):
        raise JaxLLMError(f"bits={bits} is not 4 or 8")
    if not symmetric and bits != 4:
        raise JaxLLMError(f"{name}: asymmetric quantization is int4 only, got bits={bits}")
    w = jnp.asarray(w)
    g = check_groups(w.shape, group, name)
    if bits == 4 and g % 2:
        raise JaxLLMError(f"{name}: int4 needs an even group size, got {g}")
    if not symmetric:
        return quantize_asymmetric_with(w, *asymmetric_params(w, g), g)
    scale = rtn_scale(w, bits, g, jnp.float32 if bits == 8 else INT4_SCALE_DTYPE)
    return quantize_with_scale(w, scale, bits, g)
