"""Convert multi-head attention weights to grouped-query attention (GQA paper's uptraining init).

Each group's K and V projection is the mean of the original heads in that group. One head per
group (num_kv_heads == num_heads) is the identity; one group is multi-query attention.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxllm.config import ModelConfig
from jaxllm.errors import JaxLLMError


def _pool(w: np.ndarray, heads: int, groups: int, head_dim: int) -> np.ndarray:
    """w [..., heads * head_dim] -> [..., groups * head_dim], averaging consecutive heads."""
    lead = w.shape[:-1]
    w = w.reshape(*lead, groups, heads // groups, head_dim).mean(axis=-2)
    return w.reshape(*lead, groups * head_dim).astype(np.float32)


def mha_to_gqa(
    params: dict[str, Any], cfg: ModelConfig, num_kv_heads: int
) -> tuple[dict[str, Any], ModelConfig]:
    """Canonical params of an MHA model (num_kv_heads == num_heads) -> a GQA model's."""
    if cfg.num_kv_heads != cfg.num_heads:
        raise JaxLLMError(
            f"mha_to_gqa needs an MHA model; this one has num_kv_heads={cfg.num_kv_heads} "
            f"!= num_heads={cfg.num_heads}"
        )
    if num_kv_heads < 1 or cfg.num_heads % num_kv_heads:
        raise JaxLLMError(
            f"num_kv_heads={num_kv_heads} must be >= 1 and divide num_heads={cfg.num_heads}"
        )
    h, d = cfg.num_heads, cfg.head_dim
    layers = []
    for p in params["layers"]:
        q = dict(p)
        for name in ("wk", "wv", "bk", "bv"):
            if name in p:
                q[name] = _pool(p[name], h, num_kv_heads, d)
        layers.append(q)
    return {**params, "layers": layers}, cfg.replace(num_kv_heads=num_kv_heads)
