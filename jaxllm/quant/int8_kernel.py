"""When `qlinear` sends a weight-only int8 product to the Pallas kernel
(`pallas_kernels/quant_matmul.py`) instead of dequantizing the weight for XLA's dot.

The kernel reads the int8 codes once and widens them in registers; XLA may or may not fuse the
convert into its GEMV. It is used for few rows (decode) and per-channel int8 weights, on GPU by
default. The mode is read when a function is traced, so a benchmark that compares the two paths
builds (jits) its generator under each mode:

    with int8_kernel_mode("never"):   # XLA: dequantize, then dot
        ...

Programs shared between callers (the generator's, the engine's step) are jitted once per value
of these settings (`trace_key`, jaxllm/keyed_jit.py), so a mode change is never hidden by a
program compiled under another.

Axes: leading batch axes ..., in I, out O.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import jax

from jaxllm.errors import JaxLLMError
from jaxllm.quant.qtensor import QuantizedWeight
from pallas_kernels import quant_matmul

MODES = ("auto", "always", "never")
# auto: on GPU; always: on any backend (interpreted on CPU: for tests); never: XLA only.
_mode = "auto"


_fuse = True  # take the neighbouring norm / SwiGLU / residual add into the kernel (fused.py)


def trace_key() -> tuple:
    """The settings here that a traced program depends on (see jaxllm/keyed_jit.py), with the
    kernel's launch choice (a benchmark may swap `quant_matmul.default_config` to time other
    launches)."""
    return _mode, _fuse, quant_matmul.default_config


@contextlib.contextmanager
def int8_fusion(enabled: bool) -> Iterator[None]:
    """Fuse (default) or not the ops beside the kernel's products for everything traced inside
    the block (jaxllm/quant/fused.py); off, a benchmark measures what fusion gains."""
    global _fuse
    before = _fuse
    _fuse = bool(enabled)
    try:
        yield
    finally:
        _fuse = before


def fusion_enabled() -> bool:
    return _fuse


def set_int8_kernel_mode(mode: str) -> None:
    global _mode
    if mode not in MODES:
        raise JaxLLMError(f"int8 kernel mode {mode!r} is not one of {MODES}")
    _mode = mode


def int8_kernel_mode_now() -> str:
    return _mode


@contextlib.contextmanager
def int8_kernel_mode(mode: str) -> Iterator[None]:
    """Use `mode` for everything traced inside the block."""
    before = _mode
    set_int8_kernel_mode(mode)
    try:
        yield
    finally:
        set_int8_kernel_mode(before)


def uses_int8_kernel(x: jax.Array, w: QuantizedWeight, backend: str | None = None) -> bool:
    """Whether x [..., I] @ W^T goes to the kernel under the current mode on `backend`
    (default: jax's)."""
    if _mode == "never" or (_mode == "auto" and (backend or jax.default_backend()) != "gpu"):
        return False
    if _mode == "auto" and not quant_matmul.compiles_on_gpu():
        return False
    o, i = w.shape
    rows = math.prod(x.shape[:-1])
    return (
        w.bits == 8
        and w.group == i
        and w.offset is None
        and x.dtype.name in ("bfloat16", "float16", "float32")
        and quant_matmul.supports(rows, o, i)
    )


def int8_kernel_qlinear(x: jax.Array, w: QuantizedWeight) -> jax.Array:
    """x [..., I] @ W^T -> [..., O] in x's dtype (no checks: see `uses_int8_kernel`)."""
    x2 = x.reshape(-1, x.shape[-1])
    y = quant_matmul.int8_matmul(x2, w.values, w.scale)
    return y.reshape(*x.shape[:-1], y.shape[-1])
