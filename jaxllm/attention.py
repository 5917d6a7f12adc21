"""Attention backends: the score/softmax/value step the model calls.

Every backend takes q [B, T, K, G, D], k/v [B, K, S, D], mask [B, T, S] (True = attend) and
`sm_scale`, and returns [B, T, K, G, D]. `xla` is the pure-jnp reference; the Pallas kernels
register here as `flash` and `paged`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

from jaxllm.errors import JaxLLMError
from pallas_kernels.reference import attention_reference

_BACKENDS: dict[str, Callable[..., jax.Array]] = {"xla": attention_reference}


def register_attention(name: str, fn: Callable[..., jax.Array]) -> None:
    _BACKENDS[name] = fn


def available_backends() -> tuple[str, ...]:
    return ("auto", *_BACKENDS)


def resolve_backend(name: str) -> str:
    """`auto` is the reference on CPU; Pallas kernels take over on GPU/TPU once registered."""
    if name == "auto":
        return "xla"
    if name not in _BACKENDS:
        raise JaxLLMError(
            f"unknown attention backend {name!r}; available: {', '.join(available_backends())}"
        )
    return name


def get_attention_fn(name: str) -> Callable[..., jax.Array]:
    return _BACKENDS[resolve_backend(name)]
