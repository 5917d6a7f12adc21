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
