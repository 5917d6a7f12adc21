"""Pallas kernels (attention, the weight-only int8 matmul), each beside a pure-jnp reference
(`reference.py`; the int8 one in its own module).

Imports only jax: a kernel knows nothing of models.
"""

from pallas_kernels.flash_attention import BlockSizes, flash_attention
from pallas_kernels.paged_attention import paged_attention
from pallas_kernels.quant_matmul import int8_matmul, int8_matmul_reference
from pallas_kernels.ragged_paged_attention import ragged_paged_attention
from pallas_kernels.reference import (
    attention_reference,
    flash_attention_reference,
    paged_attention_reference,
    ragged_paged_attention_reference,
)

__all__ = [
    "BlockSizes",
    "attention_reference",
    "flash_attention",
    "flash_attention_reference",
    "int8_matmul",
    "int8_matmul_reference",
    "paged_attention",
    "paged_attention_reference",
    "ragged_paged_attention",
    "ragged_paged_attention_reference",
]
