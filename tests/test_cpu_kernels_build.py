"""The native CPU kernels build wherever a C++ compiler is: every other native-kernel test
skips when `available()` is False, so a source that stopped compiling would otherwise pass
the suite silently (the library falls back to XLA's ops)."""

from __future__ import annotations

import os
import shutil

import jax
import pytest

from jaxllm import cpu_kernels


def _compiler() -> bool:
    return shutil.which(os.environ.get("CXX", "g++")) is not None or bool(shutil.which("c++"))


def _x86_flags() -> set[str] | None:
    import platform

    if platform.machine() != "x86_64":
        return None
    for line in open("/proc/cpuinfo").read().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return None


@pytest.mark.skipif(
    jax.default_backend() != "cpu"
    or os.environ.get("JAXLLM_CPU_KERNELS", "1") == "0"
    or not _compiler(),
    reason="no C++ compiler, or the kernels are switched off",
)
def test_native_kernels_build_and_register():
    assert cpu_kernels.available(), "the CPU kernels did not build: see the [jaxllm] message"


@pytest.mark.skipif(jax.default_backend() != "cpu" or not _compiler(), reason="no C++ compiler")
def test_ggml_exact_kernels_build():
    """`jaxllm.quant.ggml_exact` (recipe gguf-llamacpp) builds too; it runs where ggml's AVX2
    or AVX512 paths are what this compiler targets, and says so otherwise."""
    import ctypes

    from jaxllm.quant import ggml_exact

    path = cpu_kernels._build(ggml_exact._SOURCES, ggml_exact._FLAGS, "libjaxllm_ggml")
    assert path is not None, "ggml_exact.cc did not build: see the [jaxllm] message"
    lanes = ctypes.cdll.LoadLibrary(str(path)).JaxllmGgmlLanes()
    assert ggml_exact.available() == (lanes > 0)
    if "avx2" in (_x86_flags() or ()):
        assert lanes in (808, 1616), lanes


@pytest.mark.skipif(
    jax.default_backend() != "cpu"
    or os.environ.get("JAXLLM_CPU_KERNELS", "1") == "0"
    or os.environ.get("JAXLLM_CPU_MARCH", "native") != "native"
    or not _compiler(),
    reason="no C++ compiler, the kernels are switched off, or built for another target",
)
def test_native_vectors_are_as_wide_as_the_machines_registers():
    """vec.h picks its width from the target: a 16-float vector on an AVX2 machine (the
    width before) was kept in memory by GCC and ran the few-row product 5x slower."""
    flags = _x86_flags()
    if flags is None:
        assert cpu_kernels.lanes() in (4, 8, 16)
    else:
        want = 16 if "avx512f" in flags else 8 if "avx" in flags else 4
        assert cpu_kernels.lanes() == want


@pytest.mark.slow
@pytest.mark.skipif(
    jax.default_backend() != "cpu" or not _compiler() or _x86_flags() is None,
    reason="x86-64 with a C++ compiler only",
)
def test_kernels_built_for_four_lane_vectors_match_their_oracles():
    """JAXLLM_CPU_MARCH=x86-64-v2 builds the 4-lane vectors (SSE4.1; the width NEON gets), a
    build the machines here never pick themselves: the native product, quantized product,
    w8a8 and paged-attention tests run against their references in it."""
    import subprocess
    import sys

    env = dict(os.environ, JAXLLM_CPU_MARCH="x86-64-v2")
    env.pop("PYTEST_XDIST_WORKER", None)
    check = "from jaxllm import cpu_kernels; assert cpu_kernels.lanes() == 4, cpu_kernels.lanes()"
    r = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    tests = [
        "tests/test_cpu_kernels.py",
        "tests/test_quant.py::test_native_quantized_matvec_matches_dequantized_einsum",
        "tests/test_quant.py::test_per_token_int8_product_is_exact_integer_arithmetic",
        "tests/test_quant.py::test_grouped_int8_matmul_is_the_per_group_integer_product",
        "tests/test_engine.py::test_cpu_paged_attention_matches_reference",
        "tests/test_paged_int8.py::test_native_cpu_kernel_over_int8_pages_matches_dequantized_pool",
        "tests/test_kv_bits.py::test_native_kernel_reads_held_pages_as_bfloat16",
        "tests/test_cpu_layer.py::test_fused_layer_matches_block_paged",
    ]
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow", *tests],
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout, r.stdout[-2000:]
