"""GPTQ of a tied embedding / head table: Hessians of the head's inputs, a lower objective than
round-to-nearest on the same grid, codes that round-trip, and the pass that uses it."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.model import Transformer, random_params
from jaxllm.quant.apply import quantize_model
from jaxllm.quant.config import QuantConfig
from jaxllm.quant.gptq import collect_hessians, gptq_quantize, gptq_quantizer
from jaxllm.quant.gptq_table import hessian_error, table_hessian
from jaxllm.quant.layers import QuantizedEmbedding
from jaxllm.quant.qtensor import codes, dequantize, quantize, quantize_asymmetric_with

WINDOWS = [[(7 * i + 3 * k) % 250 + 3 for i in range(48)] for k in range(4)]


@pytest.fixture(scope="module")
def tied_model(tiny_config):
    cfg = dataclasses.replace(tiny_config, tie_word_embeddings=True)
    params = random_params(cfg)
    assert "lm_head" not in params
    return Transformer(cfg, params)


def test_head_hessian_is_the_gram_of_the_final_hidden_states(tied_model):
    ids = WINDOWS[0]
    h = np.asarray(collect_hessians(tied_model, [ids])["embed"], np.float64)
    t = len(ids)
    mask = jnp.tril(jnp.ones((t, t), bool))[None]
    logits, _ = tied_model(jnp.asarray([ids]), jnp.arange(t)[None], mask)
    # Oracle: logits = X T^T with a full-rank table T [V, E], so X is its least-squares solve.
    table = np.asarray(tied_model.embed.table[...], np.float64)
    x = np.linalg.lstsq(table, np.asarray(logits[0], np.float64).T, rcond=None)[0].T
    np.testing.assert_allclose(h, x.T @ x, rtol=2e-3, atol=2e-3 * np.abs(h).max())


@pytest.mark.parametrize("alpha", [0.0, 1.0])
@pytest.mark.parametrize("symmetric", [False, True])
def test_table_gptq_beats_round_to_nearest_and_round_trips(tied_model, alpha, symmetric):
    gram = np.asarray(collect_hessians(tied_model, WINDOWS)["embed"])
    h = table_hessian(gram, sum(map(len, WINDOWS)), alpha)
    table = np.asarray(tied_model.embed.table[...])
    qw = gptq_quantize(table, h, 4, 32, symmetric=symmetric)
    rtn = quantize(table, 4, 32, symmetric=symmetric)
    assert hessian_error(table, qw, h) < hessian_error(table, rtn, h)
    # The stored codes are exactly what rounding the dequantized table on its own grid gives,
    # and every value lies on the scheme's 16-level grid of its group.
    dq = dequantize(qw)
    if symmetric:
        again = quantize(np.asarray(dq), 4, 32, symmetric=True)  # absmax may shrink the scale
        np.testing.assert_allclose(np.asarray(dequantize(again)), np.asarray(dq), atol=1e-6)
    else:
        again = quantize_asymmetric_with(dq, qw.scale, qw.offset, 32)
        np.testing.assert_array_equal(np.asarray(codes(again)), np.asarray(codes(qw)))
    scale = np.repeat(np.asarray(qw.scale, np.float32), 32, axis=1)
    steps = (np.asarray(dq) - (np.repeat(np.asarray(qw.offset, np.float32), 32, axis=1)
             if not symmetric else 0.0)) / scale  # fmt: skip
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-3)
    lo, hi = (0, 15) if not symmetric else (-8, 7)
    assert np.round(steps).min() >= lo and np.round(steps).max() <= hi


def test_gptq_pass_quantizes_the_tied_table_better_than_rtn(tied_model):
    from flax import nnx

    quantizer = gptq_quantizer(tied_model, WINDOWS, log=lambda *a: None, table_alpha=1.0)
    # Only the table (int4-g32's embedding part): the linear layers' GPTQ has its own tests.
    recipe = QuantConfig(name="table-only", embed_bits=4, group_size=32, symmetric=False)
    model = quantize_model(nnx.clone(tied_model), recipe, quantizer)
    assert isinstance(model.embed, QuantizedEmbedding)
    table = np.asarray(tied_model.embed.table[...])
    gram = np.asarray(collect_hessians(tied_model, WINDOWS)["embed"])
    h = table_hessian(gram, sum(map(len, WINDOWS)), 1.0)
    rtn = quantize(table, 4, 32, symmetric=False)
    assert hessian_error(table, model.embed.qweight, h) < hessian_error(table, rtn, h)


def test_gptq_keeps_round_to_nearest_for_weights_already_on_the_grid(tied_model):
    # Weights that are int4-g32 values already (as SmolLM2's Q4_1 layers are) round to
    # themselves; the quantizer keeps that over GPTQ's regridded result.
    rng = np.random.default_rng(0)
    name = "layers.0.mlp.down"  # [hidden 64, intermediate 128]
    w = np.asarray(
        dequantize(quantize(rng.standard_normal((64, 128)) * 0.05, 4, 32, symmetric=False))
    )
    h = np.asarray(collect_hessians(tied_model, WINDOWS)[name])
    got = gptq_quantizer(tied_model, WINDOWS, log=lambda *a: None)(name, w, 4, 32, False)
    err = hessian_error(w, got, h)
    assert err <= hessian_error(w, quantize(w, 4, 32, symmetric=False), h)
    assert err <= hessian_error(w, gptq_quantize(w, h, 4, 32, symmetric=False), h)
    # Round to nearest reproduces the grid up to the float16 rounding of the scale recomputed
    # from the group's range (an ulp or two, times at most 15 steps up the grid).
    ulp = np.spacing(np.asarray(got.scale, np.float16)).astype(np.float32)
    bound = 2 * 15 * np.repeat(ulp, 32, axis=1)
    assert np.all(np.abs(np.asarray(dequantize(got)) - w) <= bound)


def test_choose_alpha_scores_held_out_halves(tied_model):
    from flax import nnx

    from jaxllm.quant.evaluate import perplexity
    from jaxllm.quant.gptq_table import choose_alpha

    best, scores = choose_alpha(tied_model, WINDOWS, [0.3, 1e6], 4, 32, False, log=lambda s: None)
    assert best == min(scores, key=scores.get)
    # Oracle: with alpha huge the table Hessian is a multiple of I, under which GPTQ is
    # round-to-nearest; the score is then RTN's perplexity over both held-out halves.
    m = nnx.clone(tied_model)
    m.embed = QuantizedEmbedding(quantize(m.embed.table[...], 4, 32, symmetric=False), m.dtype)
    halves = [WINDOWS[2:], WINDOWS[:2]]
    nll = [np.log(perplexity(m, h)) * sum(len(w) - 1 for w in h) for h in halves]
    want = np.exp(sum(nll) / sum(len(w) - 1 for w in WINDOWS))
    np.testing.assert_allclose(scores[1e6], want, rtol=1e-4)
