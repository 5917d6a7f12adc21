"""Hugging Face model directories: config.json + *.safetensors (Llama, Mistral, Qwen2)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from jaxllm.config import ModelConfig
from jaxllm.errors import JaxLLMError

# HF name (after "model.layers.{i}.") -> (our name, transpose to x @ W orientation)
_LAYER_NAMES = {
    "input_layernorm.weight": ("attn_norm", False),
    "self_attn.q_proj.weight": ("wq", True),
    "self_attn.k_proj.weight": ("wk", True),
    "self_attn.v_proj.weight": ("wv", True),
    "self_attn.o_proj.weight": ("wo", True),
    "self_attn.q_proj.bias": ("bq", False),
    "self_attn.k_proj.bias": ("bk", False),
    "self_attn.v_proj.bias": ("bv", False),
    "post_attention_layernorm.weight": ("mlp_norm", False),
    "mlp.gate_proj.weight": ("w_gate", True),
    "mlp.up_proj.weight": ("w_up", True),
    "mlp.down_proj.weight": ("w_down", True),
}


def _read_tensors(directory: Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise JaxLLMError(f"no *.safetensors files in {str(directory)!r}")
    out = {}
    for f in files:
        try:
            with safe_open(str(f), framework="numpy") as st:
                for key in st.keys():
                    out[key] = st.get_tensor(key)
        except JaxLLMError:
            raise
        except Exception as e:
            raise JaxLLMError(f"{str(f)!r} is not a readable safetensors file: {e}") from None
    return out


def _to_f32(x: np.ndarray) -> np.ndarray:
    if x.dtype.name == "bfloat16" or x.dtype == np.dtype("V2"):
        x = x.view(np.uint16).astype(np.uint32) << 16
        return x.view(np.float32)
    return x.astype(np.float32)


def load_hf_dir(path: str | Path, name: str = "") -> tuple[ModelConfig, dict[str, Any]]:
    """Returns (config, canonical params)."""
    directory = Path(path)
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise JaxLLMError(f"{str(directory)!r} has no config.json")
    cfg = ModelConfig.from_hf_config(json.loads(cfg_path.read_text()), name=name or directory.name)
    raw = _read_tensors(directory)
    prefix = "model."

    def take(key: str) -> np.ndarray:
        if key not in raw:
            raise JaxLLMError(f"checkpoint in {str(directory)!r} has no tensor {key!r}")
        return _to_f32(raw[key])

    layers = []
    for i in range(cfg.num_layers):
        p = {}
        for hf_name, (ours, transpose) in _LAYER_NAMES.items():
            key = f"{prefix}layers.{i}.{hf_name}"
            if key not in raw:
                if ours.startswith("b"):
                    continue
                take(key)  # raises
            x = take(key)
            p[ours] = np.ascontiguousarray(x.T) if transpose else x
        layers.append(p)
    params: dict[str, Any] = {
        "embed": take(prefix + "embed_tokens.weight"),
        "layers": layers,
        "final_norm": take(prefix + "norm.weight"),
    }
    if "lm_head.weight" in raw and not cfg.tie_word_embeddings:
        params["lm_head"] = np.ascontiguousarray(take("lm_head.weight").T)
    elif not cfg.tie_word_embeddings:
        cfg = cfg.replace(tie_word_embeddings=True)
    if cfg.attention_bias and "bq" not in layers[0]:
        cfg = cfg.replace(attention_bias=False)
    return cfg, params
