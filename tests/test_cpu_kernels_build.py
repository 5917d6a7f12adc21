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
    import platform

    from jaxllm.quant import ggml_exact

    path = cpu_kernels._build(ggml_exact._SOURCES, ggml_exact._FLAGS, "libjaxllm_ggml")
    assert path is not None, "ggml_exact.cc did not build: see the [jaxllm] message"
    lanes = ctypes.cdll.LoadLibrary(str(path)).JaxllmGgmlLanes()
    assert ggml_exact.available() == (lanes > 0)
    if platform.machine() == "x86_64" and "avx2" in open("/proc/cpuinfo").read():
        assert lanes in (808, 1616), lanes
