"""The quantization pass: rewrites a built `Transformer` in place, before anything is jitted.

Each `Linear` becomes a `QuantizedLinear` and the embedding a `QuantizedEmbedding`; the float
weights are dropped, so `nnx.split(model)` (what the generator and engine jit over) holds the
integer codes and scales only. A KV recipe sets `model.kv_cache_dtype`, which the generator
and engine use for their caches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import jax
import jax.numpy as jnp

from jaxllm.errors import JaxLLMError
from jaxllm.model import Embedding, Linear, Transformer
from jaxllm.quant.config import QuantConfig, load_recipe
from jaxllm.quant.ggml_dot import check_block_weight
from jaxllm.quant.layers import (
    BlockQ8Embedding,
    BlockQ8Linear,
    QuantizedEmbedding,
    QuantizedLinear,
)
from jaxllm.quant.qtensor import QuantizedWeight, check_groups, quantize

# (name, float weight [out, in], bits, group, symmetric) -> quantized weight; round-to-nearest
# by default. Double-quantized int4 scales add the keywords scale_bits and scale_block.
Quantizer = Callable[..., QuantizedWeight]


def rtn_quantizer(
    name: str, w: jax.Array, bits: int, group: int | None, symmetric: bool = True, **scales
) -> QuantizedWeight:
    return quantize(w, bits, group, name=name, symmetric=symmetric, **scales)


def scale_options(cfg: QuantConfig, bits: int) -> dict:
    """The quantizer's double-quantization keywords for a part with `bits`-bit weights."""
    if cfg.scale_bits is None or bits != 4:
        return {}
    return dict(scale_bits=cfg.scale_bits, scale_block=cfg.scale_block)


def linear_slots(model: Transformer) -> Iterator[tuple[str, object, str]]:
    """(name, parent module, attribute) of every linear layer, in the order data meets them."""
    for i, layer in enumerate(model.layers):
        for parent, attr, short in (
            (layer.attn, "qkv", "attn.qkv"),
            (layer.attn, "o", "attn.o"),
            (layer.mlp, "gate_up", "mlp.gate_up"),
            (layer.mlp, "down", "mlp.down"),
        ):
            yield f"layers.{i}.{short}", parent, attr
    if model.lm_head is not None:
        yield "lm_head", model, "lm_head"


def quantize_model(
    model: Transformer,
    recipe: str | QuantConfig,
    quantizer: Quantizer | None = None,
    native: Mapping[str, QuantizedWeight] | None = None,
    act_absmax: Mapping[str, jax.Array] | None = None,
) -> Transformer:
    """Apply `recipe` to `model` (in place; also returned).

    `quantizer` replaces round-to-nearest for the linear layers and the embedding (GPTQ
    passes its own).
    `native`: for the `gguf` method, the file's own blocks by layer name
    (`jaxllm.quant.gguf_native.native_weights`); layers without one stay float.
    `act_absmax`: per layer, max |x| per input channel on calibration text, for SmoothQuant
    (`jaxllm.quant.smoothquant.input_absmax`).
    """
    cfg = load_recipe(recipe)
    if cfg.method == "gguf" and native is None:
        raise JaxLLMError(f"recipe {cfg.name!r} needs the GGUF file's blocks (native=...)")
    if cfg.smoothquant is not None and act_absmax is None:
        raise JaxLLMError(f"recipe {cfg.name!r} needs activation statistics (act_absmax=...)")
    quantizer = quantizer or rtn_quantizer
    for name, parent, attr in linear_slots(model):
        lin = getattr(parent, attr)
        if not isinstance(lin, Linear):
            continue  # already quantized
        inv_smooth = None
        if cfg.method == "gguf" and name in native:
            qw = native[name]
        elif cfg.weight_bits is not None and cfg.method != "gguf":
            w = lin.weight[...]
            if cfg.smoothquant is not None:
                from jaxllm.quant.smoothquant import smoothing_factors

                s = smoothing_factors(act_absmax[name], w, cfg.smoothquant)
                w, inv_smooth = w * s[None, :], 1.0 / s
            scales = scale_options(cfg, cfg.weight_bits)
            qw = quantizer(name, w, cfg.weight_bits, cfg.group_size, cfg.symmetric, **scales)
        else:
            continue
        act_group = cfg.activation_group if cfg.activation_bits else None
        if act_group is not None:
            check_groups(qw.shape, act_group, f"{name} (activation groups)")
        bias = lin.bias[...] if lin.bias is not None else None
        if cfg.gguf_activations == "q8":
            check_block_weight(qw, name)
            setattr(parent, attr, BlockQ8Linear(qw, bias))
            continue
        layer = QuantizedLinear(qw, bias, cfg.activation_bits, inv_smooth, act_group)
        setattr(parent, attr, layer)
    if isinstance(model.embed, Embedding):
        if cfg.method == "gguf" and "embed" in native:
            block_q8 = cfg.gguf_activations == "q8" and model.lm_head is None
            if block_q8:
                check_block_weight(native["embed"], "embed")
            kind = BlockQ8Embedding if block_q8 else QuantizedEmbedding
            model.embed = kind(native["embed"], model.dtype)
        elif cfg.embed_bits is not None:
            group = cfg.group_size if cfg.embed_bits == 4 else None
            sym = cfg.symmetric or cfg.embed_bits == 8
            scales = scale_options(cfg, cfg.embed_bits)
            qw = quantizer("embed", model.embed.table[...], cfg.embed_bits, group, sym, **scales)
            # A tied head multiplies with the embedding: it takes the activation recipe too.
            act = cfg.activation_bits if model.lm_head is None and group is None else None
            model.embed = QuantizedEmbedding(qw, model.dtype, act)
    if cfg.kv_bits == 8:
        model.kv_cache_dtype = jnp.int8
    if cfg.kv_dtype is not None:
        model.kv_cache_dtype = jnp.dtype(cfg.kv_dtype)
    if cfg.attention_f16:
        from jaxllm.quant import f16_attention

        model.attention = f16_attention.NAME
    if cfg.gguf_activations == "q8" and cfg.attention_f16:
        from jaxllm.quant import ggml_exact

        if ggml_exact.supports(model):
            model.numerics = ggml_exact.NAME  # Transformer.__call__: llama.cpp's arithmetic
    model.quant_config = cfg
    return model


def quantize_for_llm(
    model: Transformer, recipe: str | QuantConfig, tokenizer, source: str = "", log=print
) -> Transformer:
    """`LLM(quantization=...)`: the pass, with GPTQ's calibration or the GGUF file's own blocks
    when the recipe asks."""
    cfg = load_recipe(recipe)
    quantizer, native, act_absmax = None, None, None
    if cfg.method == "gptq" and cfg.weight_bits is not None:
        from jaxllm.quant.gptq import default_calibration, gptq_quantizer

        quantizer = gptq_quantizer(model, default_calibration(tokenizer, model.config), log=log)
    if cfg.smoothquant is not None:
        from jaxllm.quant.gptq import default_calibration
        from jaxllm.quant.smoothquant import input_absmax

        act_absmax = input_absmax(model, default_calibration(tokenizer, model.config))
    if cfg.method == "gguf":
        from jaxllm.quant.gguf_native import native_weights

        if not str(source).endswith(".gguf"):
            raise JaxLLMError(f"recipe {cfg.name!r} needs a GGUF model; {source!r} is not one")
        native = native_weights(source, model.config)
    return quantize_model(model, cfg, quantizer, native, act_absmax)
