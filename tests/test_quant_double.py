"""Double-quantized int4 group scales (uint8 scale codes, int8 offset codes, float16
super-scales): round-trip bound from the stored values, bytes, products against float
products, GPTQ on the quantized-scale grid against round-to-nearest, and clear errors."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import JaxLLMError
from jaxllm.quant import QuantConfig, load_recipe
from jaxllm.quant.gptq import gptq_quantize
from jaxllm.quant.gptq_table import hessian_error
from jaxllm.quant.matmul import native_qlinear, qlinear
from jaxllm.quant.qtensor import dequantize, group_params, quantize, super_scales


def _weights(shape, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32) * 0.05
    w[:, :32] += 0.2  # one group far from zero: its offset needs the int8 code's range
    w[0, :] = 0.0  # an all-zero row: its super-scales must not divide by zero
    w[1, 3] = 1.5  # an outlier
    return w


def _per_input(a, qw, reps):
    return np.repeat(np.repeat(np.asarray(a, np.float32), reps, axis=1), qw.group, axis=1)


def _bound(qw) -> np.ndarray:
    """scale/2 + offset_super + 15 * scale_super per weight [O, I], from the stored values:
    half a 4-bit step, plus the most the offset and scale codes' rounding can add."""
    n = qw.scale.shape[1]
    reps = n // qw.scale_super.shape[1]
    scale = np.asarray(qw.scale, np.float32) * np.repeat(
        np.asarray(qw.scale_super, np.float32), reps, axis=1
    )
    code_err = _per_input(qw.offset_super, qw, reps) + 15 * _per_input(qw.scale_super, qw, reps)
    return np.repeat(scale, qw.group, axis=1) / 2 + code_err


@pytest.mark.parametrize("scale_block", [None, 2, 6])
def test_round_trip_within_the_double_quantized_bound(scale_block):
    w = _weights((24, 384))
    qw = quantize(w, 4, 32, symmetric=False, scale_bits=8, scale_block=scale_block)
    assert qw.scale.dtype == jnp.uint8 and qw.offset.dtype == jnp.int8
    assert qw.scale_super.dtype == jnp.float16 and qw.offset_super.dtype == jnp.float16
    assert qw.scale_super.shape == (24, 1 if scale_block is None else 12 // scale_block)
    dq = np.asarray(dequantize(qw))
    assert np.all(np.abs(w - dq) <= _bound(qw) * (1 + 1e-5) + 1e-12)
    assert np.all(dq[0] == 0.0)
    # The decoded grid is what the weights were rounded against: requantizing on it is exact.
    scale, offset = (np.asarray(a) for a in group_params(qw))
    o, i = w.shape
    u = np.rint((dq.reshape(o, -1, 32) - offset[..., None]) / scale[..., None])
    assert np.all((u >= 0) & (u <= 15))
    np.testing.assert_allclose(u * scale[..., None] + offset[..., None], dq.reshape(o, -1, 32))


def test_double_quantized_error_is_no_worse_than_float16_scales():
    """Oracle: the float16-scale (GGUF Q4_1) quantization of the same weights."""
    w = _weights((64, 576), seed=1)
    double = np.asarray(dequantize(quantize(w, 4, 32, symmetric=False, scale_bits=8)))
    f16 = np.asarray(dequantize(quantize(w, 4, 32, symmetric=False)))
    assert np.linalg.norm(w - double) <= 1.02 * np.linalg.norm(w - f16)


@pytest.mark.parametrize("scale_block", [None, 6])
def test_int4_g32_bytes_equal_the_formula(scale_block):
    o, i = 40, 576
    qw = quantize(_weights((o, i)), 4, 32, symmetric=False, scale_bits=8, scale_block=scale_block)
    supers = 1 if scale_block is None else i // 32 // scale_block
    # codes: 4 bits per weight; scale and offset codes: 1 byte each per group of 32;
    # super-scales: 2 float16 per super-block
    assert qw.nbytes == o * i // 2 + 2 * o * (i // 32) + 2 * 2 * o * supers
    bits_per_weight = 8 * qw.nbytes / (o * i)
    assert bits_per_weight == pytest.approx(4 + 16 / 32 + 32 * supers / i)
    assert qw.nbytes / (2 * o * i) <= 0.3


@pytest.mark.parametrize("rows", [1, 40])  # decode (the native kernel on CPU) and prefill
def test_quantized_matmul_matches_the_float_matmul_within_the_bound(rows):
    w = _weights((48, 192), seed=2)
    qw = quantize(w, 4, 32, symmetric=False, scale_bits=8)
    x = np.random.default_rng(3).standard_normal((rows, 192)).astype(np.float32)
    got = np.asarray(qlinear(jnp.asarray(x), qw))
    # Oracle 1: the float product of the dequantized weights (same arithmetic up to rounding).
    want = x @ np.asarray(dequantize(qw)).T
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # Oracle 2: the float weights' product, off by at most sum |x| * bound.
    bound = np.abs(x) @ _bound(qw).T
    assert np.all(np.abs(got - x @ w.T) <= bound * (1 + 1e-4) + 1e-5)


def test_native_kernel_decodes_the_scale_codes():
    from jaxllm import cpu_kernels

    if not cpu_kernels.available():
        pytest.skip("native CPU kernels not built")
    w = _weights((32, 128), seed=4)
    qw = quantize(w, 4, 32, symmetric=False, scale_bits=8)
    x = jnp.asarray(np.random.default_rng(5).standard_normal((2, 128)), jnp.float32)
    want = np.asarray(x) @ np.asarray(dequantize(qw)).T
    np.testing.assert_allclose(np.asarray(native_qlinear(x, qw)), want, rtol=1e-4, atol=1e-5)


def _correlated_inputs(n, d, seed=0):
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((d, d)) / np.sqrt(d) + np.eye(d)
    return (rng.standard_normal((n, d)) @ mix * (1 + 4 * rng.random(d))).astype(np.float32)


@pytest.mark.parametrize("static_groups", [False, True])
def test_gptq_on_the_quantized_scale_grid_beats_round_to_nearest(static_groups):
    rng = np.random.default_rng(6)
    w = (rng.standard_normal((64, 192)) * 0.05).astype(np.float32)
    h = (lambda x: x.T @ x)(_correlated_inputs(512, 192, seed=7))
    qw = gptq_quantize(w, h, 4, 32, symmetric=False, static_groups=static_groups, scale_bits=8)
    rtn = quantize(w, 4, 32, symmetric=False, scale_bits=8)
    assert qw.scale.dtype == jnp.uint8 and qw.offset.dtype == jnp.int8
    # Super-scales fixed before the sweep: wide enough for the weights (round-to-nearest's)
    # and for those a float16-grid GPTQ sweep compensates to.
    swept = dequantize(gptq_quantize(w, h, 4, 32, symmetric=False, static_groups=static_groups))
    for got, a, b in zip(
        (qw.scale_super, qw.offset_super), super_scales(jnp.asarray(w), 32, 1),
        super_scales(swept, 32, 1),
    ):  # fmt: skip
        np.testing.assert_array_equal(np.asarray(got), np.maximum(np.asarray(a), np.asarray(b)))
    assert hessian_error(w, qw, h) < 0.9 * hessian_error(w, rtn, h)


def test_bad_super_block_and_scale_bits_give_clear_errors():
    w = _weights((8, 192))  # 6 groups of 32 per row
    with pytest.raises(JaxLLMError, match="6 groups per row, which super-block size 4"):
        quantize(w, 4, 32, symmetric=False, scale_bits=8, scale_block=4)
    with pytest.raises(JaxLLMError, match="scale_bits=8 needs to be 8, with asymmetric int4"):
        quantize(w, 4, 32, symmetric=True, scale_bits=8)
    with pytest.raises(JaxLLMError, match="scale_bits=6 in recipe 'x' is not one of"):
        QuantConfig(name="x", weight_bits=4, group_size=32, symmetric=False, scale_bits=6)
    with pytest.raises(JaxLLMError, match="scale_bits=8 is for asymmetric int4"):
        QuantConfig(name="x", weight_bits=4, group_size=32, symmetric=True, scale_bits=8)
    with pytest.raises(JaxLLMError, match="scale_block=0 needs scale_bits"):
        QuantConfig(
            name="x", weight_bits=4, group_size=32, symmetric=False, scale_bits=8, scale_block=0
        )
    with pytest.raises(JaxLLMError, match="scale_block=3 needs scale_bits"):
        QuantConfig(name="x", weight_bits=4, group_size=32, symmetric=False, scale_block=3)


def test_recipes_store_double_quantized_or_float16_scales():
    assert load_recipe("int4-g32").scale_bits == 8
    assert load_recipe("int4-g32+gptq").scale_bits == 8
    assert load_recipe("int4-g32-f16s").scale_bits is None
    g64 = load_recipe("int4-g64-f16s")
    assert (g64.scale_bits, g64.group_size) == (None, load_recipe("int4-g64").group_size)
    assert load_recipe("gguf").scale_bits is None


def _brute_force_covering(x, s_sup, o_sup):
    """Oracle: every (scale code, offset code) pair whose grid [k o, k o + 15 c s] holds the
    group x, searched exhaustively; the smallest scale code, and the offset codes that reach
    it with that code."""
    c = np.arange(1, 256, dtype=np.float64)[:, None]
    k = np.arange(-127, 128, dtype=np.float64)[None, :]
    # float32, as the code computes the grid ends
    base = (k * np.float32(o_sup)).astype(np.float32)
    top = base + (15 * c * np.float32(s_sup)).astype(np.float32)
    ok = (base <= x.min()) & (top >= x.max())
    best_c = int(c[np.any(ok, axis=1)].min())
    return best_c, set(k[0, ok[best_c - 1]].astype(int))


def test_covering_codes_are_the_brute_force_smallest_covering_grid():
    from jaxllm.quant.qtensor import covering_double_quantized_params

    w = _weights((6, 192), seed=8)
    w[2, 40:64] *= 6.0  # groups whose ranges differ widely within a row
    ss, os_ = super_scales(jnp.asarray(w), 32, 1)
    c, k = (np.asarray(a).astype(int) for a in covering_double_quantized_params(w, 32, ss, os_))
    s_sup, o_sup = np.asarray(ss, np.float32), np.asarray(os_, np.float32)
    for r in range(1, w.shape[0]):  # row 0 is all zero
        for g in range(w.shape[1] // 32):
            best_c, offsets = _brute_force_covering(
                w[r, 32 * g : 32 * (g + 1)], s_sup[r, 0], o_sup[r, 0]
            )
            assert c[r, g] == best_c and k[r, g] in offsets


def test_gptq_with_identity_hessian_rounds_on_covering_grids():
    """Oracle: with H = I GPTQ has no error to spread, so it is round-to-nearest on its grids;
    those cover each group, so every weight is within half a step (nothing clipped), while
    round-to-nearest's least-squares codes may clip a group's extremes."""
    from jaxllm.quant.qtensor import covering_double_quantized_params, quantize_double

    w = _weights((32, 192), seed=9)
    qw = gptq_quantize(w, np.eye(192, dtype=np.float32), 4, 32, symmetric=False, scale_bits=8)
    supers = (qw.scale_super, qw.offset_super)
    want = quantize_double(
        jnp.asarray(w), 32, *supers, params=covering_double_quantized_params(w, 32, *supers)
    )
    np.testing.assert_array_equal(np.asarray(qw.scale), np.asarray(want.scale))
    np.testing.assert_array_equal(np.asarray(qw.offset), np.asarray(want.offset))
    np.testing.assert_allclose(np.asarray(dequantize(qw)), np.asarray(dequantize(want)))
    scale, _ = group_params(qw)
    half_step = np.repeat(np.asarray(scale), 32, axis=1) / 2
    assert np.all(np.abs(w - np.asarray(dequantize(qw))) <= half_step * (1 + 1e-5))
