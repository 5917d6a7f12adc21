"""GGUF reader: metadata -> ModelConfig, tensors -> canonical float params (see model.py).

Every tensor type the `gguf` package can dequantize is accepted (F32, F16, BF16, Q8_0, Q4_0,
Q4_1, Q5_0, Q5_1, K-quants). llama.cpp stores the rows of Q and K in its own rotary order
(adjacent pairs); we undo that so the model uses HF's rotate-half RoPE.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from jaxllm.checkpoints.gguf_file import GGUFFile
from jaxllm.config import ModelConfig
from jaxllm.errors import JaxLLMError

GGUF_MAGIC = b"GGUF"
# Architectures whose Q/K rows llama.cpp's converter permutes for its rotary layout.
PERMUTED_ARCHS = ("llama", "mistral")


def open_gguf(path: str | Path) -> GGUFFile:
    """The parsed header of `path`, or JaxLLMError if it is missing, not GGUF or cut short."""
    path = Path(path)
    if not path.is_file():
        raise JaxLLMError(f"model file {str(path)!r} does not exist")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise JaxLLMError(
            f"{str(path)!r} is not a GGUF file (first bytes {magic!r}, expected {GGUF_MAGIC!r})"
        )
    try:
        return GGUFFile(path)
    except Exception as e:  # struct.error, ValueError, ... on a damaged file
        raise JaxLLMError(f"{str(path)!r} is a damaged or truncated GGUF file: {e}") from None


def dequantize_tensor(t: Any) -> np.ndarray:
    """float32 numpy array in numpy order ([rows, cols] = ggml's [cols, rows])."""
    import gguf

    qtype = t.tensor_type
    if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return np.asarray(t.data, dtype=np.float32)
    try:
        return np.asarray(gguf.quants.dequantize(t.data, qtype), dtype=np.float32)
    except NotImplementedError:
        raise JaxLLMError(
            f"tensor {t.name} has GGUF type {qtype.name}, which cannot be dequantized here"
        ) from None


def unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Invert llama.cpp's Q/K row permutation. w [n_heads * D, ...] (rows are outputs)."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's permutation (for writing GGUF files in tests)."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_gguf(
    path: str | Path, name: str = ""
) -> tuple[ModelConfig, dict[str, Any], dict[str, Any], np.ndarray | None]:
    """Returns (config, canonical params, metadata, rope factors or None)."""
    reader = open_gguf(path)
    meta = reader.metadata
    tensors = {t.name: t for t in reader.tensors}
    cfg = ModelConfig.from_gguf_metadata(meta, set(tensors), name=name or Path(path).stem)
    permuted = cfg.architecture in PERMUTED_ARCHS

    def get(tname: str) -> np.ndarray:
        if tname not in tensors:
            raise JaxLLMError(f"GGUF file {str(path)!r} has no tensor {tname!r}")
        return dequantize_tensor(tensors[tname])

    def qk(tname: str, heads: int) -> np.ndarray:
        w = get(tname)
        return unpermute_rotary(w, heads) if permuted else w

    layers = []
    for i in range(cfg.num_layers):
        b = f"blk.{i}."
        p = {
            "attn_norm": get(b + "attn_norm.weight"),
            "wq": qk(b + "attn_q.weight", cfg.num_heads).T,
            "wk": qk(b + "attn_k.weight", cfg.num_kv_heads).T,
            "wv": get(b + "attn_v.weight").T,
            "wo": get(b + "attn_output.weight").T,
            "mlp_norm": get(b + "ffn_norm.weight"),
            "w_gate": get(b + "ffn_gate.weight").T,
            "w_up": get(b + "ffn_up.weight").T,
            "w_down": get(b + "ffn_down.weight").T,
        }
        if cfg.attention_bias:
            p["bq"] = qk(b + "attn_q.bias", cfg.num_heads)
            p["bk"] = qk(b + "attn_k.bias", cfg.num_kv_heads)
            p["bv"] = get(b + "attn_v.bias")
        layers.append({k: np.ascontiguousarray(v) for k, v in p.items()})
    params: dict[str, Any] = {
        "embed": get("token_embd.weight"),
        "layers": layers,
        "final_norm": get("output_norm.weight"),
    }
    if not cfg.tie_word_embeddings:
        params["lm_head"] = np.ascontiguousarray(get("output.weight").T)
    expected = (cfg.vocab_size, cfg.hidden_size)
    if params["embed"].shape != expected:
        raise JaxLLMError(
            f"token_embd.weight has shape {params['embed'].shape}, expected {expected}"
        )
    rope_factors = get("rope_freqs.weight") if "rope_freqs.weight" in tensors else None
    return cfg, params, meta, rope_factors
