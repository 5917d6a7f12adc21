"""Pallas attention kernels, each beside a pure-jnp reference (`reference.py`).

Imports only jax: a kernel knows nothing of models.
"""

from pallas_kernels.flash_attention import BlockSizes, flash_attention
from pallas_kernels.paged_attention import paged_attention
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
    "paged_attention",
    "paged_attention_reference",
    "ragged_paged_attention",
    "ragged_paged_attention_reference",
]
