"""AQT-style quantization: recipes, quantized weights, the pass that rewrites a model before
jit, an int8 KV cache, GPTQ, native GGUF blocks and QAT.

Public names load lazily: `jaxllm.model` imports `jaxllm.quant.kv`, and the pass imports the
model.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "quantize_model": "jaxllm.quant.apply",
    "QuantConfig": "jaxllm.quant.config",
    "available_recipes": "jaxllm.quant.config",
    "load_recipe": "jaxllm.quant.config",
    "QuantizedWeight": "jaxllm.quant.qtensor",
    "dequantize": "jaxllm.quant.qtensor",
    "quantize": "jaxllm.quant.qtensor",
    "QuantizedKV": "jaxllm.quant.kv",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'jaxllm.quant' has no attribute {name!r}")
