"""What every kernel needs: the platform choice, interpret modes and small integer helpers."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

# Finite: a tile whose every key is masked must not turn the running max into -inf - -inf.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


def resolve_platform(platform: str | None, interpret: bool | None) -> tuple[str, bool]:
    """(kernel family, interpret?) for a call.

    `platform` picks the lowering: "gpu" (the portable GPU kernels) or "tpu" (Mosaic TPU
    kernels with scalar prefetch). None follows the default backend; on CPU it is "gpu" run
    by the Pallas interpreter, since CPU has no Pallas compiler.
    """
    backend = jax.default_backend()
    if platform is None:
        platform = "tpu" if backend == "tpu" else "gpu"
    if platform not in ("gpu", "tpu"):
        raise ValueError(f"platform must be 'gpu', 'tpu' or None, got {platform!r}")
    if interpret is None:
        interpret = backend == "cpu" or (platform == "tpu") != (backend == "tpu")
    return platform, bool(interpret)


def gpu_compiler_params(num_warps: int, num_stages: int):
    """Triton launch parameters, or None where this jax has no Triton backend."""
    try:
        from jax.experimental.pallas import triton as pltriton
    except ImportError:  # the Triton backend is deprecated from jax 0.11 and may go
        return None
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def triton_ir(f, *args) -> list[str]:
    """The Triton IR (text) of each Pallas call in `f(*args)` lowered for CUDA: on any machine,
    since jax runs the Triton lowering when it lowers, not when it compiles. `args`: arrays or
    `jax.ShapeDtypeStruct`s. For tests and offline inspection (benchmarks/kernel_sass.py); it
    hooks a private jax function, so it raises ImportError where that has moved."""
    import jax._src.pallas.triton.lowering as lowering

    modules = []
    original = getattr(lowering, "lower_jaxpr_to_triton_module", None)
    if original is None:
        raise ImportError("jax._src.pallas.triton.lowering has no lower_jaxpr_to_triton_module")

    def capture(*a, **kw):
        result = original(*a, **kw)
        modules.append(result.module.operation.get_asm())
        return result

    lowering.lower_jaxpr_to_triton_module = capture
    try:
        jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))
    finally:
        lowering.lower_jaxpr_to_triton_module = original
    return modules


def tpu_interpret_params():
    """TPU interpreter that raises on out-of-bounds reads and fills fresh memory with NaN."""
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.InterpretParams(out_of_bounds_reads="raise", uninitialized_memory="nan")


def online_softmax_init(rows: int, d: int):
    """(acc [rows, D], running max m [rows], running sum l [rows]) before any key tile."""
    return (
        jnp.zeros((rows, d), jnp.float32),
        jnp.full((rows,), MASK_VALUE, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )


def online_softmax_step(carry, s, v, valid=None, v_scale=None):
    """Fold one key tile into the running (acc, m, l), in base 2.

    s: [rows, keys] float32 scores already multiplied by sm_scale * log2(e); v: [keys, D];
    valid: bool broadcastable to s, or None when every key is visible. Masked keys get exactly
    zero weight, so a tile with no visible key leaves the carry's output unchanged.
    v_scale: [1, keys] float32 per-key scales of an int8 value tile (v holds its codes, cast
    to the dot's dtype): sum_k p_k (v_k * scale_k) is computed as sum_k (p_k * scale_k) v_k, so
    the tile is never scaled element by element.
    """
    acc, m, l = carry
    if valid is not None:
        s = jnp.where(valid, s, MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    p = jnp.exp2(s - m_new[:, None])
    if valid is not None:
        p = jnp.where(valid, p, 0.0)
    alpha = jnp.exp2(m - m_new)
    weights = p
    if v_scale is not None:
        weights = p * v_scale
        if valid is not None:  # a hidden slot's scale may be anything, NaN included
            weights = jnp.where(valid, weights, 0.0)
    pv = lax.dot_general(
        weights.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
    )
    return acc * alpha[:, None] + pv, m_new, l * alpha + jnp.sum(p, axis=1)


def cdiv(a, b):
    return (a + b - 1) // b


def round_up(a: int, b: int) -> int:
    return cdiv(a, b) * b


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def check_gqa(h: int, kh: int, what: str) -> int:
    if kh <= 0 or h % kh:
        raise ValueError(f"{what}: query heads ({h}) must be a multiple of KV heads ({kh})")
    return h // kh
