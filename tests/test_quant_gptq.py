"""GPTQ: lower output error than round-to-nearest, no worse than Qwix's GPTQ, and Hessians that
are the inputs' x^T x."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.config import ModelConfig
from jaxllm.model import Transformer, random_params
from jaxllm.quant.gptq import collect_hessians, gptq_quantize, output_error
from jaxllm.quant.qtensor import quantize


def _correlated_inputs(n, d, seed=0):
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((d, d)) / np.sqrt(d) + np.eye(d)
    return (rng.standard_normal((n, d)) @ mix * (1 + 4 * rng.random(d))).astype(np.float32)


@pytest.mark.parametrize("bits,group,symmetric", [(4, 32, True), (4, 32, False), (8, None, True)])
def test_gptq_beats_round_to_nearest_on_the_output(bits, group, symmetric):
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((64, 128)) * 0.05).astype(np.float32)
    x = _correlated_inputs(512, 128)
    qw = gptq_quantize(w, x.T @ x, bits, group, symmetric=symmetric)
    rtn = quantize(w, bits, group, symmetric=symmetric)
    assert (qw.offset is None) == symmetric
    assert qw.values.dtype == rtn.values.dtype and qw.values.shape == rtn.values.shape
    assert output_error(w, qw, x) < 0.9 * output_error(w, rtn, x)


@pytest.mark.slow  # Qwix's GPTQ is an eager loop over columns: 30 s for this 32 x 64 matrix
def test_gptq_is_no_worse_than_qwix_gptq():
    gptq_core = pytest.importorskip("qwix.contrib.gptq_core")
    from qwix._src.core import qarray

    rng = np.random.default_rng(2)
    w = (rng.standard_normal((32, 64)) * 0.05).astype(np.float32)
    x = _correlated_inputs(256, 64, seed=3)
    h = x.T @ x
    how = qarray.HowToQuantize(qtype=jnp.int4, channelwise_axes=[0], tiled_axes={1: 32})
    theirs, _ = gptq_core.quantize_weight(jnp.asarray(w), jnp.asarray(h), how)
    their_err = float(np.sum((x @ (w - np.asarray(qarray.dequantize(theirs))).T) ** 2))
    ours = output_error(w, gptq_quantize(w, h, 4, 32), x)
    assert ours <= 1.1 * their_err


def test_hessians_are_the_inputs_gram_matrices():
    cfg = ModelConfig.from_yaml("tiny")
    model = Transformer(cfg, random_params(cfg))
    ids = [3, 5, 7, 11, 13, 17]
    hs = collect_hessians(model, [ids, ids[:4]])
    assert len(hs) == 4 * cfg.num_layers + 1  # and the untied head
    x = model.layers[0].attn_norm(model.embed(jnp.asarray([ids])))[0]
    x4 = x[:4]
    want = np.asarray(x.T @ x + x4.T @ x4)
    np.testing.assert_allclose(np.asarray(hs["layers.0.attn.qkv"]), want, rtol=1e-4, atol=1e-5)
    assert all(type(layer.attn.qkv).__name__ == "Linear" for layer in model.layers)
