"""bfloat16 KV pages held as their uint16 bit patterns, for XLA:CPU.

XLA:CPU has no bfloat16 scatter: it widens the scatter's whole operand to float32 and
narrows the result back. The engine writes each step's new K/V rows into the page pool with a
scatter, so a bfloat16 pool was converted in full twice per layer and step (for SmolLM2-135M
at the default pool size, about 1.6 GB of pages per step). A bitcast to uint16 around the
scatter does not help either: XLA:CPU copies the pool for a bitcast-convert. Held as uint16,
the pool is scattered in place like any 16-bit integer array, and the readers take the bits
as they are: the native CPU attention reads them as bfloat16 in registers, and the jnp path
bitcasts only the pages it gathers.

Axes: pages [K, num_pages, page_size, D] (KV heads, pages, slots per page, head_dim).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Bfloat16Bits:
    """bfloat16 values stored as uint16 `bits` of the same shape."""

    bits: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return self.bits.shape

    @property
    def dtype(self):
        return jnp.dtype(jnp.bfloat16)

    @property
    def nbytes(self) -> int:
        return int(self.bits.nbytes)

    def reshape(self, *shape) -> Bfloat16Bits:
        return Bfloat16Bits(self.bits.reshape(*shape))

    def values(self) -> jax.Array:
        """The bfloat16 array (XLA:CPU copies it: take it of gathered pages, not the pool)."""
        return jax.lax.bitcast_convert_type(self.bits, jnp.bfloat16)


def to_bits(x: jax.Array) -> jax.Array:
    """uint16 bit patterns of x rounded to bfloat16."""
    return jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.uint16)


def page_storage(pages: Any) -> Any:
    """The engine's page pool as it is held: on CPU, every bfloat16 array becomes
    `Bfloat16Bits`; elsewhere (and for other dtypes) the pool is unchanged, since GPU and TPU
    scatter bfloat16 natively and their kernels read bfloat16 pages."""
    if jax.default_backend() != "cpu":
        return pages

    def hold(x):
        return Bfloat16Bits(to_bits(x)) if x.dtype == jnp.bfloat16 else x

    return jax.tree.map(hold, pages)
