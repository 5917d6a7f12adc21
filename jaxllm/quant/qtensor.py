"""Quantized weight matrices: a pytree of integer codes and per-group scales.

A weight W [out, in] (the model's transposed layout) is cut along `in` into groups of `group`
inputs (group = in: one scale per output channel). Per group:

    int8:            W = scale * q                 q int8   in [-127, 127]
    int4 symmetric:  W = scale * (u - 8)           u nibble in [0, 15]
    int4 asymmetric: W = scale * u + offset        u nibble in [0, 15]   (GGUF Q4_1's d, m)

Asymmetric int4 may double-quantize its group scales (llama.cpp's k-quants, QLoRA): then
`scale` holds uint8 codes c and `offset` int8 codes k, and each super-block of groups (a whole
row by default) has a float16 super-scale for each, so scale = c * scale_super and
offset = k * offset_super (`group_params`): 4 + 16/32 bits per weight plus the super-scales
instead of 4 + 32/32.

int4 codes are packed two to a byte (XLA:CPU stores an `int4` array one byte per element):
within each group, byte j holds element j in its low nibble and element j + group/2 in its
high one. That is GGUF's Q4_0/Q4_1 block layout for group 32, so those blocks load as they are.

Axes: out O, in I, groups N = I / group.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.errors import JaxLLMError

INT4_SCALE_DTYPE = jnp.float16  # GGUF Q4_1's d and m
SUPER_SCALE_DTYPE = jnp.float16
SCALE_CODE_MAX = 255  # uint8 scale codes c in [1, 255]: a group's scale is never zero
OFFSET_CODE_MAX = 127  # int8 offset codes k in [-127, 127]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """values: int8 [O, I] (8 bits) or uint8 [O, I/2] (4 bits, packed);
    scale [O, N]; offset [O, N] or None (asymmetric int4 only).
    Double-quantized scales: scale uint8 codes [O, N], offset int8 codes [O, N], and
    scale_super, offset_super float16 [O, S] for S super-blocks of N / S groups each."""

    values: jax.Array
    scale: jax.Array
    offset: jax.Array | None
    bits: int = dataclasses.field(metadata=dict(static=True))
    group: int = dataclasses.field(metadata=dict(static=True))
    scale_super: jax.Array | None = None
    offset_super: jax.Array | None = None

    @property
    def shape(self) -> tuple[int, int]:
        o, n = self.values.shape
        return (o, n * 2) if self.bits == 4 else (o, n)

    @property
    def nbytes(self) -> int:
        arrays = (self.values, self.scale, self.offset, self.scale_super, self.offset_super)
        return int(sum(a.size * a.dtype.itemsize for a in arrays if a is not None))


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


def _per_group(super_scale: jax.Array, n_groups: int) -> jax.Array:
    """float16 [O, S] super-scales -> float32 [O, N], each repeated over its super-block."""
    return jnp.repeat(super_scale.astype(jnp.float32), n_groups // super_scale.shape[1], axis=1)


def group_params(w: QuantizedWeight) -> tuple[jax.Array, jax.Array | None]:
    """float32 (scale [O, N], offset [O, N] or None): the grid of every group, decoding
    double-quantized scale codes against their super-scales."""
    if w.scale_super is None:
        offset = None if w.offset is None else w.offset.astype(jnp.float32)
        return w.scale.astype(jnp.float32), offset
    n = w.scale.shape[1]
    scale = w.scale.astype(jnp.float32) * _per_group(w.scale_super, n)
    return scale, w.offset.astype(jnp.float32) * _per_group(w.offset_super, n)


def dequantize(w: QuantizedWeight, dtype=jnp.float32) -> jax.Array:
    """float [O, I]."""
    return _dequantize(w, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=1)  # one program, not an XLA compile per eager op
def _dequantize(w: QuantizedWeight, dtype: jnp.dtype) -> jax.Array:
    o, i = w.shape
    q = codes(w).astype(jnp.float32).reshape(o, i // w.group, w.group)
    if w.bits == 4 and w.offset is None:
        q = q - 8.0
    scale, offset = group_params(w)
    out = q * scale[..., None]
    if offset is not None:
        out = out + offset[..., None]
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


def check_scale_bits(scale_bits: int | None, bits: int, symmetric: bool, name: str) -> None:
    """JaxLLMError unless scale_bits is None or 8 with asymmetric int4 weights."""
    if scale_bits is not None and (scale_bits != 8 or bits != 4 or symmetric):
        raise JaxLLMError(
            f"{name}: scale_bits={scale_bits} needs to be 8, with asymmetric int4 weights; got "
            f"bits={bits}, symmetric={symmetric}"
        )


def super_block_count(n_groups: int, scale_block: int | None, name: str = "weight") -> int:
    """Super-blocks per row for `scale_block` groups each (None: one per row), or JaxLLMError."""
    if scale_block is None:
        return 1
    if scale_block <= 0 or n_groups % scale_block:
        raise JaxLLMError(
            f"{name} has {n_groups} groups per row, which super-block size {scale_block} "
            "(groups per super-block) does not divide"
        )
    return n_groups // scale_block


def super_scales(w: jax.Array, group: int, blocks: int) -> tuple[jax.Array, jax.Array]:
    """float16 (scale_super, offset_super) [O, S] for w [O, I] in S super-blocks per row.

    offset_super is the super-block's largest |group min| / 127, rounded up, so every min's
    code fits in int8; scale_super is its largest group range / (15 * 255), measured from the
    min rounded down to an offset code, rounded up, so every range fits in a uint8 code.
    """
    o, i = w.shape
    ws = w.astype(jnp.float32).reshape(o, blocks, i // (group * blocks), group)
    lo, hi = jnp.min(ws, axis=-1), jnp.max(ws, axis=-1)  # [O, S, N/S]
    amin = jnp.max(jnp.abs(lo), axis=-1, keepdims=True)
    offset_super = _round_f16(jnp.where(amin > 0, amin / OFFSET_CODE_MAX, 1.0), jnp.inf)
    floor_min = jnp.floor(lo / offset_super.astype(jnp.float32)) * offset_super.astype(jnp.float32)
    span = jnp.max((hi - floor_min) / 15.0, axis=-1, keepdims=True)
    scale_super = _round_f16(jnp.where(span > 0, span / SCALE_CODE_MAX, 1.0), jnp.inf)
    return scale_super[..., 0], offset_super[..., 0]


def _group_floor(w: jax.Array, group: int, scale_super: jax.Array, offset_super: jax.Array):
    """w [O, I]'s groups [O, N, group] in float32, the super-scales per group [O, N], each
    group's offset code just below its min (clipped to the code range) and its max [O, N]."""
    o, i = w.shape
    n = i // group
    ws = w.astype(jnp.float32).reshape(o, n, group)
    s_sup, o_sup = _per_group(scale_super, n), _per_group(offset_super, n)
    lo, hi = jnp.min(ws, axis=-1), jnp.max(ws, axis=-1)
    k_lo = jnp.clip(jnp.floor(lo / o_sup), -OFFSET_CODE_MAX, OFFSET_CODE_MAX)
    return ws, s_sup, o_sup, k_lo, hi


def double_quantized_params(
    w: jax.Array, group: int, scale_super: jax.Array, offset_super: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(scale codes uint8, offset codes int8) [O, N] of w [O, I]'s groups on the super-scales
    [O, S]: of the offset code below and above the group's min and the scale code below and
    above its range from that lower offset, the pair whose round-to-nearest weights have the
    smallest squared error. The lower offset and upper scale cover the group, so no weight
    is further than scale/2 + offset_super + 15 * scale_super from its grid point."""
    ws, s_sup, o_sup, k_lo, hi = _group_floor(w, group, scale_super, offset_super)
    c_lo = jnp.clip(jnp.floor((hi - k_lo * o_sup) / 15.0 / s_sup), 1, SCALE_CODE_MAX)
    best = None
    for dk, dc in ((0, 1), (0, 0), (1, 0), (1, 1)):
        k = jnp.clip(k_lo + dk, -OFFSET_CODE_MAX, OFFSET_CODE_MAX)
        c = jnp.clip(c_lo + dc, 1, SCALE_CODE_MAX)
        s, m = (c * s_sup)[..., None], (k * o_sup)[..., None]
        err = jnp.sum((jnp.clip(jnp.round((ws - m) / s), 0, 15) * s + m - ws) ** 2, axis=-1)
        if best is None:
            best = (err, c, k)
        else:
            take = err < best[0]
            best = tuple(jnp.where(take, new, old) for new, old in zip((err, c, k), best))
    return best[1].astype(jnp.uint8), best[2].astype(jnp.int8)


def covering_double_quantized_params(
    w: jax.Array, group: int, scale_super: jax.Array, offset_super: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(scale codes uint8, offset codes int8) [O, N] of the smallest grid on the super-scales
    [O, S] that covers each group of w [O, I]: the offset code just below the group's min and
    the scale code just above its range from there, so no weight is clipped (unless a code
    saturates: a group wider than its super-scales allow) and every weight lies within
    half a step of the grid. The float16-scale grid's choice (`asymmetric_params`) on the
    code lattice; GPTQ takes it, since a clipped weight's error exceeds what its sweep
    assumes and compensates."""
    _, s_sup, o_sup, k, hi = _group_floor(w, group, scale_super, offset_super)
    c = jnp.clip(jnp.ceil((hi - k * o_sup) / 15.0 / s_sup), 1, SCALE_CODE_MAX)
    return c.astype(jnp.uint8), k.astype(jnp.int8)


def quantize_double(
    w: jax.Array,
    group: int,
    scale_super: jax.Array,
    offset_super: jax.Array,
    params: tuple[jax.Array, jax.Array] | None = None,
) -> QuantizedWeight:
    """Asymmetric int4 of w [O, I] with double-quantized group scales: `params` (scale and
    offset codes [O, N], by default `double_quantized_params`) decoded, then the weights
    rounded to nearest against those stored values."""
    c, k = (
        params
        if params is not None
        else double_quantized_params(w, group, scale_super, offset_super)
    )
    n = w.shape[1] // group
    scale = c.astype(jnp.float32) * _per_group(scale_super, n)
    offset = k.astype(jnp.float32) * _per_group(offset_super, n)
    qw = quantize_asymmetric_with(w, scale, offset, group)
    return QuantizedWeight(qw.values, c, k, 4, group, scale_super, offset_super)


def quantize(
    w: jax.Array | np.ndarray,
    bits: int,
    group: int | None = None,
    name: str = "weight",
    symmetric: bool = True,
    scale_bits: int | None = None,
    scale_block: int | None = None,
) -> QuantizedWeight:
    """Round-to-nearest quantization of w [O, I]; |w - dequantize| <= scale / 2.

    Symmetric: int8 or int4 codes around zero. Asymmetric (int4 only): codes over each
    group's [min, max], GGUF Q4_1's form. Scales are float32 for int8 and float16 for int4,
    and the codes are rounded against the stored scale, so the bound holds for the values
    the model actually uses. scale_bits=8 (asymmetric int4 only): double-quantized scales
    (`quantize_double`) with one super-scale per `scale_block` groups (None: per row); the
    bound is then scale/2 + offset_super + 15 * scale_super.
    """
    if bits not in (4, 8):
        raise JaxLLMError(f"bits={bits} is not 4 or 8")
    if not symmetric and bits != 4:
        raise JaxLLMError(f"{name}: asymmetric quantization is int4 only, got bits={bits}")
    w = jnp.asarray(w)
    g = check_groups(w.shape, group, name)
    if bits == 4 and g % 2:
        raise JaxLLMError(f"{name}: int4 needs an even group size, got {g}")
    blocks = None
    if scale_bits is not None:
        check_scale_bits(scale_bits, bits, symmetric, name)
        blocks = super_block_count(w.shape[1] // g, scale_block, name)
    return _rtn(w, bits, g, symmetric, blocks)


# One program per (shape, scheme): op by op, each of the ~45 ops of a double-quantized int4
# weight was its own XLA compile per shape, and loading SmolLM2 as int4-g32 took 33 s.
@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _rtn(w: jax.Array, bits: int, g: int, symmetric: bool, blocks: int | None) -> QuantizedWeight:
    if blocks is not None:
        return quantize_double(w, g, *super_scales(w, g, blocks))
    if not symmetric:
        return quantize_asymmetric_with(w, *asymmetric_params(w, g), g)
    scale = rtn_scale(w, bits, g, jnp.float32 if bits == 8 else INT4_SCALE_DTYPE)
    return quantize_with_scale(w, scale, bits, g)
