"""Pallas attention kernels, each beside a pure-jnp reference (`reference.py`).

Imports only jax: a kernel knows nothing of models.
"""

from pallas_kernels.reference import attention_reference

__all__ = ["attention_reference"]
