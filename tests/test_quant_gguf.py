"""GGUF Q8_0 / Q4_0 / Q4_1 blocks loaded natively: the same values as gguf's own
dequantization, and a model that computes what the dequantized float model computes."""

from __future__ import annotations

import gguf
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.checkpoints.gguf_loader import load_gguf, open_gguf
from jaxllm.model import Transformer
from jaxllm.quant.apply import linear_slots, quantize_model
from jaxllm.quant.gguf_native import block_weight, native_weights
from jaxllm.quant.layers import QuantizedEmbedding, QuantizedLinear
from jaxllm.quant.qtensor import dequantize
from tests.test_hf_checkpoints import full_logits, write_gguf

NATIVE = [gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0]
NATIVE.append(gguf.GGMLQuantizationType.Q4_1)


@pytest.mark.parametrize("qtype", NATIVE, ids=lambda q: q.name)
def test_native_blocks_equal_gguf_dequantization(tmp_path, qtype):
    path = tmp_path / "m.gguf"
    write_gguf(path, "tiny-llama", qtype)
    seen = 0
    for t in open_gguf(path).tensors:
        w = block_weight(t)
        if t.tensor_type != qtype:
            continue
        want = gguf.quants.dequantize(t.data, t.tensor_type)
        np.testing.assert_array_equal(np.asarray(dequantize(w)), want)
        seen += 1
    assert seen == 2 * 7 + 1  # every layer matrix and the output head


@pytest.mark.parametrize(
    "qtype",
    [pytest.param(q, marks=[] if q.name == "Q4_1" else pytest.mark.slow) for q in NATIVE],
    ids=lambda q: q.name,
)
def test_native_model_matches_the_dequantized_float_model(tmp_path, qtype):
    path = tmp_path / "m.gguf"
    write_gguf(path, "tiny-llama", qtype)
    cfg, params, _, factors = load_gguf(path)
    want = full_logits(cfg, params, factors)  # gguf's dequantization, in float32
    model = Transformer(cfg, params, rope_factors=factors)
    native = native_weights(path, cfg)
    quantize_model(model, "gguf", native=native)
    kinds = {type(getattr(p, a)) for _, p, a in linear_slots(model)}
    assert kinds == {QuantizedLinear}
    bits = {getattr(p, a).bits for _, p, a in linear_slots(model)}
    assert bits == {8 if qtype == gguf.GGMLQuantizationType.Q8_0 else 4}
    t = want.shape[0]
    mask = jnp.tril(jnp.ones((t, t), bool))[None]
    from tests.test_hf_checkpoints import TINY_INPUT_IDS

    got, _ = model(jnp.asarray([TINY_INPUT_IDS]), jnp.arange(t)[None], mask)
    np.testing.assert_allclose(np.asarray(got[0]), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.slow
def test_smollm2_runs_as_its_q4_1_blocks(smollm2):
    from flax import nnx

    from jaxllm.generate import Generator

    model = nnx.clone(smollm2.model)
    quantize_model(model, "gguf", native=native_weights(smollm2.source, smollm2.config))
    assert all(isinstance(getattr(p, a), QuantizedLinear) for _, p, a in linear_slots(model))
    assert isinstance(model.embed, QuantizedEmbedding) and model.embed.bits == 8
    assert {getattr(p, a).offset is not None for _, p, a in linear_slots(model)} == {True}
    ids = smollm2.encode("The capital of France is Paris, and the capital of Italy is")
    want, got = smollm2.logits(ids), Generator(model).logits(ids)
    assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()
