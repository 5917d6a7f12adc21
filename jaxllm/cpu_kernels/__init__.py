"""Native CPU kernels: few-row products with weight matrices (decode on XLA:CPU), the
engine's ragged paged attention, the w8a8 int8 products (`qmatvec.cc`, `int8_gemm.cc`) and a
whole w8a8 decoder layer over the engine's pages (`layer.cc`, called by
`jaxllm.quant.cpu_layer`).

`linear(x, w)` computes x @ w^T for w [out, in]. On the CPU backend, with float32 x, float32
or bfloat16 weights and at most 16 rows, it calls `matvec.cc` through the XLA FFI: the kernel
streams the weights on every core, where XLA:CPU's own dot uses one. Elsewhere (GPU/TPU,
bfloat16 activations, prefill-sized inputs) it is the einsum, which is also the oracle in its
tests. bfloat16 weights under float32 x multiply x rounded to bfloat16 with float32
accumulation, in both paths.

The kernel is compiled on first use with the system C++ compiler into the jaxllm cache,
keyed by source, flags and CPU. Without a compiler, or with JAXLLM_CPU_KERNELS=0, the einsum
is used everywhere. It targets this machine's CPU (`-march=native`); JAXLLM_CPU_MARCH names
another target (`x86-64-v3`, say, for a library shared by a cluster's mixed hosts). Its
vectors are as wide as the target's float registers (`lanes()`: 16 with AVX-512, 8 with AVX,
4 otherwise). Gradients are the einsum's (custom VJP), so training code may call
`linear` as well.

Programs sharded over several devices trace under `einsum_only()`: the kernel has no
sharding rule, so XLA would gather whole weights onto every device to call it.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

MAX_ROWS = 16
# Weight dtype -> (FFI target, library symbol) of the few-row product.
_MATVEC_TARGETS = {
    jnp.dtype(jnp.float32): ("jaxllm_matvec", "JaxllmMatVec"),
    jnp.dtype(jnp.bfloat16): ("jaxllm_matvec_bf16", "JaxllmMatVecBF16"),
}
_SOURCES = [
    Path(__file__).with_name(n)
    for n in (
        "matvec.cc",
        "paged_attention.cc",
        "qmatvec.cc",
        "int8_gemm.cc",
        "int8_gemm.h",
        "argmax.cc",
        "layer.cc",
        "paged_attention.h",
        "w8a8.h",
        "pool.h",
        "vec.h",
    )
]
# Page dtype -> (FFI target, library symbol) of the paged attention kernel.
_ATTENTION_TARGETS = {
    jnp.dtype(jnp.float32): ("jaxllm_paged_attention", "JaxllmPagedAttention"),
    jnp.dtype(jnp.float16): ("jaxllm_paged_attention_f16", "JaxllmPagedAttentionF16"),
    jnp.dtype(jnp.bfloat16): ("jaxllm_paged_attention_bf16", "JaxllmPagedAttentionBF16"),
    # bfloat16 pages held as uint16 bits (`jaxllm.quant.kv_bits.Bfloat16Bits`)
    jnp.dtype(jnp.uint16): ("jaxllm_paged_attention_bf16_bits", "JaxllmPagedAttentionBF16Bits"),
    # int8 pages with a float32 scale per token per KV head (`jaxllm.quant.kv.QuantizedKV`)
    jnp.dtype(jnp.int8): ("jaxllm_paged_attention_s8", "JaxllmPagedAttentionS8"),
}
PAGED_DTYPES = (
    jnp.dtype(jnp.float32),
    jnp.dtype(jnp.float16),
    jnp.dtype(jnp.bfloat16),
    jnp.dtype(jnp.int8),
)
_FLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-std=c++17", "-w", "-pthread"]
_lock = threading.Lock()
_state: dict[str, object] = {}
_einsum_only = contextvars.ContextVar("jaxllm_einsum_only", default=False)


@contextlib.contextmanager
def einsum_only():
    """While active (at trace time), `linear` and the paged attention choose XLA's ops."""
    token = _einsum_only.set(True)
    try:
        yield
    finally:
        _einsum_only.reset(token)


def einsum_only_now() -> bool:
    return _einsum_only.get()


def _cpu_signature() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return f"{platform.machine()}|{line}"
    except OSError:
        pass
    return platform.machine()


def _build(
    sources: list[Path] = _SOURCES, flags: list[str] = _FLAGS, stem: str = "libjaxllm_matvec"
) -> Path | None:
    """Compile `sources` (headers count towards the cache key) into a shared library in the
    cache, keyed by their text, the compiler, the flags and the CPU; None without a compiler
    or when the build fails."""
    compiler = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if compiler is None:
        return None
    from jaxllm.checkpoints.registry import cache_dir

    include = jax.ffi.include_dir()
    key = hashlib.sha256(
        b"".join(src.read_bytes() for src in sources)
        + " ".join([compiler, *flags, include]).encode()
        + _cpu_signature().encode()
    ).hexdigest()[:16]
    out = cache_dir() / "cpu_kernels" / f"{stem}_{key}.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_out = Path(tmp) / out.name
        units = [str(src) for src in sources if src.suffix == ".cc"]
        cmd = [compiler, *flags, f"-I{include}", *units, "-o", str(tmp_out)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(
                f"[jaxllm] CPU kernel build failed; using XLA's dot: {proc.stderr[-400:]}",
                file=sys.stderr,
            )
            return None
        os.replace(tmp_out, out)
    return out


def _flags() -> list[str]:
    march = os.environ.get("JAXLLM_CPU_MARCH", "native")
    return [f"-march={march}" if f == "-march=native" else f for f in _FLAGS]


def available() -> bool:
    """True when the kernel is built, loaded and registered (builds it on the first call),
    and not switched off by `einsum_only()`."""
    if _einsum_only.get():
        return False
    with _lock:
        if "ok" not in _state:
            _state["ok"] = False
            if os.environ.get("JAXLLM_CPU_KERNELS", "1") != "0":
                path = _build(flags=_flags())
                if path is not None:
                    lib = ctypes.cdll.LoadLibrary(str(path))
                    for target, symbol in _MATVEC_TARGETS.values():
                        jax.ffi.register_ffi_target(
                            target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu"
                        )
                    for target, symbol in _ATTENTION_TARGETS.values():
                        jax.ffi.register_ffi_target(
                            target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu"
                        )
                    # the quantized products of jaxllm.quant.matmul
                    for name in (
                        "JaxllmQMatVec8",
                        "JaxllmQMatVec4",
                        "JaxllmW8A8Dot",
                        "JaxllmArgmax",  # greedy sampling
                        "JaxllmW8A8Layer",  # a whole w8a8 layer (jaxllm.quant.cpu_layer)
                    ):
                        jax.ffi.register_ffi_target(
                            name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu"
                        )
                    _state["lib"] = lib
                    _state["ok"] = True
        return bool(_state["ok"])


def lanes() -> int:
    """The float lanes of the built kernels' vectors (16, 8 or 4); 0 when they are not
    available."""
    return int(_state["lib"].JaxllmLanes()) if available() else 0


def einsum_linear(x: jax.Array, w: jax.Array) -> jax.Array:
    """The reference: x [..., in] @ w [out, in]^T. Weights narrower than x (bfloat16 weights
    of a float32 model) multiply x rounded to their dtype, accumulate in float32 and give x's
    dtype: the full-rate bf16 dot where the hardware has one (2x float32's on AVX512-BF16)."""
    if w.dtype != x.dtype and jnp.dtype(w.dtype).itemsize < jnp.dtype(x.dtype).itemsize:
        y = jnp.einsum("...i,oi->...o", x.astype(w.dtype), w, preferred_element_type=jnp.float32)
        return y.astype(x.dtype)
    return jnp.einsum("...i,oi->...o", x, w)


def native_linear(x: jax.Array, w: jax.Array) -> jax.Array:
    """The FFI kernel (no shape or platform checks: see `linear`). bfloat16 weights multiply
    x rounded to bfloat16, as `einsum_linear` does."""
    if w.dtype == jnp.bfloat16:
        x = x.astype(jnp.bfloat16).astype(jnp.float32)
    out = jax.ShapeDtypeStruct(x.shape[:-1] + (w.shape[0],), jnp.float32)
    target = _MATVEC_TARGETS[jnp.dtype(w.dtype)][0]
    return jax.ffi.ffi_call(target, out, vmap_method="sequential")(x, w)


@jax.custom_vjp
def _linear_with_grad(x: jax.Array, w: jax.Array) -> jax.Array:
    return native_linear(x, w)


def _fwd(x, w):
    return native_linear(x, w), (x, w)


def _bwd(res, g):
    x, w = res
    gx = jnp.einsum("...o,oi->...i", g, w.astype(g.dtype)).astype(x.dtype)
    return gx, jnp.einsum("...o,...i->oi", g, x.astype(g.dtype)).astype(w.dtype)


_linear_with_grad.defvjp(_fwd, _bwd)


def uses_native(x: jax.Array, w: jax.Array) -> bool:
    rows = 1
    for d in x.shape[:-1]:
        rows *= d
    return (
        rows <= MAX_ROWS
        and x.dtype == jnp.float32
        and w.dtype in _MATVEC_TARGETS
        and w.ndim == 2
        and jax.default_backend() == "cpu"
        and available()
    )


def linear(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., in] @ w [out, in]^T -> [..., out]."""
    if uses_native(x, w):
        return _linear_with_grad(x, w)
    return einsum_linear(x, w)


def uses_native_argmax(logits: jax.Array) -> bool:
    return (
        logits.dtype == jnp.float32
        and logits.ndim >= 1
        and logits.shape[-1] > 0
        and jax.default_backend() == "cpu"
        and available()
    )


def argmax(logits: jax.Array) -> jax.Array:
    """`argmax.cc`: the first index of the maximum of each row, NaN counting as the maximum
    (jnp.argmax's answer). logits float32 [..., V] -> int32 [...]. Call only where
    `uses_native_argmax`; jnp.argmax is its oracle."""
    out = jax.ShapeDtypeStruct(logits.shape[:-1], jnp.int32)
    return jax.ffi.ffi_call("JaxllmArgmax", out, vmap_method="sequential")(logits)


def paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    kv_lens: jax.Array,
    block_tables: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: jax.Array,
    *,
    sm_scale: float,
) -> jax.Array:
    """`ragged_paged_attention` on CPU through `paged_attention.cc` (G <= 16, page size <= 256,
    head_dim a multiple of 16 up to 256). q [T, H, D], pages [K, P, page, D] -> [T, H, D]. The
    pages are read as they are stored (float32, float16 or bfloat16: `PAGED_DTYPES`,
    bfloat16 held as uint16 bits: `Bfloat16Bits`, or int8 codes with their scales:
    `QuantizedKV`), q and the result in float32. Call only where `available()`; the jnp
    reference is its oracle."""
    from jaxllm.quant.kv import QuantizedKV
    from jaxllm.quant.kv_bits import Bfloat16Bits

    scales = ()
    if isinstance(k_pages, QuantizedKV) and isinstance(v_pages, QuantizedKV):
        scales = (k_pages.scale.astype(jnp.float32), v_pages.scale.astype(jnp.float32))
        k_pages, v_pages = k_pages.values, v_pages.values
    if isinstance(k_pages, Bfloat16Bits) and isinstance(v_pages, Bfloat16Bits):
        k_pages, v_pages = k_pages.bits, v_pages.bits  # the uint16 target reads them as bf16
    t, h, d = q.shape
    kh = k_pages.shape[0]
    if k_pages.dtype != v_pages.dtype or k_pages.dtype not in _ATTENTION_TARGETS:
        raise ValueError(
            f"paged_attention: pages of {k_pages.dtype}/{v_pages.dtype}; the kernel reads "
            f"{', '.join(str(t) for t in PAGED_DTYPES)}"
        )
    target = _ATTENTION_TARGETS[jnp.dtype(k_pages.dtype)][0]
    out = jax.ShapeDtypeStruct((t, kh, h // kh, d), jnp.float32)
    res = jax.ffi.ffi_call(target, out, vmap_method="sequential")(
        q.reshape(t, kh, h // kh, d).astype(jnp.float32),
        k_pages,
        v_pages,
        *scales,
        kv_lens.astype(jnp.int32),
        block_tables.astype(jnp.int32),
        cu_q_lens.astype(jnp.int32),
        jnp.reshape(jnp.asarray(num_seqs, jnp.int32), (1,)),
        scale=np.float32(sm_scale),
    )
    return res.reshape(t, h, d).astype(q.dtype)
