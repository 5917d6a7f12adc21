"""A jitted function per value of the settings its trace reads.

Some choices are made while a function is traced, from module state rather than from its
arguments: whether a weight-only int8 product goes to the Pallas kernel and whether its
neighbours are fused into it (`jaxllm.quant.int8_kernel.trace_key`); whether the native CPU
kernels are off (`cpu_kernels.einsum_only`); whether the CPU engine fuses its w8a8 layers
(`jaxllm.quant.cpu_layer.enabled`); the fused decode-attention kernel's launch
(`pallas_kernels.decode_attention.default_launch`). jit's cache keys on the function and its
arguments only, so a program shared between callers (the generator's programs, the engine's
step) would keep what it was first traced with. `KeyedJit` holds one `jax.jit` per value of
those settings and picks it at call time.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax


def trace_settings() -> tuple:
    from jaxllm import cpu_kernels
    from jaxllm.quant import cpu_layer
    from jaxllm.quant.int8_kernel import trace_key
    from pallas_kernels import decode_attention

    return (*trace_key(), cpu_kernels.einsum_only_now(), cpu_layer.enabled(),
            decode_attention.default_launch)  # fmt: skip


class _Traced:
    """fn under one value of the settings. Equal for equal (fn, settings): jax also caches
    traces by the function, by equality, so equal programs (the generator's bound methods of
    equal `GeneratorPrograms`) share traces under the same settings and only those."""

    def __init__(self, fn: Callable, key: tuple):
        functools.update_wrapper(self, fn)  # name (compile logs), signature (static args)
        if not hasattr(self, "__name__"):  # a functools.partial: its function's name
            self.__name__ = getattr(getattr(fn, "func", None), "__name__", "traced")
        self.fn, self.key = fn, key

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Traced) and (self.fn, self.key) == (other.fn, other.key)

    def __hash__(self) -> int:
        return hash((self.fn, self.key))


class KeyedJit:
    """`jax.jit(fn, **jit_kwargs)`, once per value of `trace_settings()` when called."""

    def __init__(self, fn: Callable, **jit_kwargs: Any):
        self.fn = fn
        self.jit_kwargs = jit_kwargs
        self.jitted: dict[tuple, Callable] = {}

    def current(self) -> Callable:
        """The jitted function for the settings now."""
        key = trace_settings()
        f = self.jitted.get(key)
        if f is None:
            f = self.jitted[key] = jax.jit(_Traced(self.fn, key), **self.jit_kwargs)
        return f

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.current()(*args, **kwargs)

    def lower(self, *args: Any, **kwargs: Any) -> Any:
        return self.current().lower(*args, **kwargs)
