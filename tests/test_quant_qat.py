"""QAT: straight-through gradients, a few optax steps lower the distillation loss, orbax
resume equals an uninterrupted run; the per-layer report against hand-computed errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm.config import ModelConfig
from jaxllm.model import Transformer, random_params
from jaxllm.quant.apply import quantize_model
from jaxllm.quant.qat import fake_quant, kl_loss, qat_finetune, teacher_log_probs, wrap_fake_quant
from jaxllm.quant.qtensor import dequantize, quantize
from jaxllm.quant.report import layer_report


def test_fake_quant_forward_is_the_quantizer_and_gradient_passes_straight_through():
    w = jnp.asarray(np.random.default_rng(0).standard_normal((8, 64)), jnp.float32)
    c = jnp.asarray(np.random.default_rng(1).standard_normal((8, 64)), jnp.float32)
    np.testing.assert_array_equal(
        np.asarray(fake_quant(w, 4, 32)), np.asarray(dequantize(quantize(w, 4, 32)))
    )
    grad = jax.grad(lambda w: jnp.sum(fake_quant(w, 4, 32) * c))(w)
    np.testing.assert_array_equal(np.asarray(grad), np.asarray(c))
    # Double-quantized int4 scales: the forward is that quantizer too (w + (dq - w) is dq up
    # to float32 rounding).
    double = dict(symmetric=False, scale_bits=8)
    np.testing.assert_allclose(
        np.asarray(fake_quant(w, 4, 32, **double)),
        np.asarray(dequantize(quantize(w, 4, 32, **double))),
        rtol=1e-6, atol=1e-7,
    )  # fmt: skip


@pytest.fixture(scope="module")
def tiny():
    cfg = ModelConfig.from_yaml("tiny")
    rng = np.random.default_rng(2)
    windows = [rng.integers(3, cfg.vocab_size, 32).tolist() for _ in range(2)]
    return cfg, random_params(cfg, scale=0.1), windows


def _loss(model, params_model, recipe, windows):
    teacher = teacher_log_probs(params_model, windows)
    wrap_fake_quant(model, recipe)
    loss = nnx.jit(kl_loss)  # one program, not an XLA compile per eager op of the forward
    return float(np.mean([loss(model, jnp.asarray([w]), t) for w, t in zip(windows, teacher)]))


def test_a_few_optax_steps_lower_the_loss(tiny):
    cfg, params, windows = tiny
    teacher_model = Transformer(cfg, params)
    before = _loss(Transformer(cfg, params), teacher_model, "int4-g32", windows)
    trained = Transformer(cfg, params)
    qat_finetune(trained, "int4-g32", windows, steps=6, learning_rate=3e-4, log=lambda *a: None)
    after = _loss(nnx.clone(trained), teacher_model, "int4-g32", windows)
    assert after < 0.9 * before, (before, after)


@pytest.mark.slow
def test_resumed_training_equals_an_uninterrupted_run(tiny, tmp_path):
    cfg, params, windows = tiny
    straight = Transformer(cfg, params)
    qat_finetune(straight, "int4-g32", windows, steps=6, learning_rate=3e-4, log=lambda *a: None)
    # Interrupted after 4 steps, then resumed to 6: the same weights as the straight run.
    half = Transformer(cfg, params)
    qat_finetune(half, "int4-g32", windows, steps=4, learning_rate=3e-4, ckpt_dir=tmp_path,
                 save_every=4, log=lambda *a: None)  # fmt: skip
    resumed = Transformer(cfg, params)
    qat_finetune(resumed, "int4-g32", windows, steps=6, learning_rate=3e-4, ckpt_dir=tmp_path,
                 save_every=4, log=lambda *a: None)  # fmt: skip
    for a, b in zip(jax.tree.leaves(nnx.state(straight, nnx.Param)),
                    jax.tree.leaves(nnx.state(resumed, nnx.Param))):  # fmt: skip
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("recipe", ["int4-g32", "int4-g32-f16s"])
def test_report_matches_hand_computed_errors(tiny, recipe):
    cfg, params, _ = tiny
    model = Transformer(cfg, params)
    rows = layer_report(model, quantize_model(nnx.clone(model), recipe))
    assert len(rows) == 4 * cfg.num_layers + 2  # + untied head + embedding
    down = next(r for r in rows if r["name"] == "layers.1.mlp.down")
    w = params["layers"][1]["w_down"].T  # [out, in]
    f16 = recipe.endswith("f16s")
    dq = np.asarray(dequantize(quantize(w, 4, 32, symmetric=False, scale_bits=None if f16 else 8)))
    assert down["shape"] == w.shape
    if f16:  # codes, f16 scales and offsets
        assert down["format"] == "int4 g32 asym"
        assert down["bytes"] == w.size // 2 + (w.size // 32) * 4
    else:  # codes, uint8 scale and int8 offset codes, two f16 super-scales per row
        assert down["format"] == "int4 g32 asym s8"
        assert down["bytes"] == w.size // 2 + (w.size // 32) * 2 + w.shape[0] * 4
    np.testing.assert_allclose(
        down["rel_error"], np.linalg.norm(w - dq) / np.linalg.norm(w), rtol=1e-5
    )
    np.testing.assert_allclose(down["max_abs_error"], np.abs(w - dq).max(), rtol=1e-6)
