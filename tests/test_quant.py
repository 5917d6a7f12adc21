"""Quantization: round-trip bounds, quantized products against float ones, recipes, the pass
(no float weights reach the jitted step), and quantized models against the float model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import JaxLLMError
from jaxllm.config import ModelConfig
from jaxllm.generate import Generator
from jaxllm.model import Transformer, random_params
from jaxllm.quant import QuantConfig, load_recipe, quantize_model
from jaxllm.quant.matmul import qlinear, quantize_rows
from jaxllm.quant.qtensor import dequantize, pack_int4, quantize, unpack_int4
from jaxllm.sampling import SamplingParams


def _weights(shape, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32) * 0.05
    w[0, :] = 0.0  # an all-zero row: its scale must not divide by zero
    w[1, 3] = 1.5  # an outlier
    return w


def _scale_per_element(qw):
    o, i = qw.shape
    return np.repeat(np.asarray(qw.scale, np.float32), qw.group, axis=1).reshape(o, i)


def _reference_dequantize(qw) -> np.ndarray:
    """Element by element from the documented layout (the oracle for the vectorised code)."""
    o, i = qw.shape
    vals, scale = np.asarray(qw.values), np.asarray(qw.scale, np.float32)
    out = np.zeros((o, i), np.float32)
    half = qw.group // 2
    for r in range(o):
        for c in range(i):
            g, j = divmod(c, qw.group)
            if qw.bits == 8:
                out[r, c] = vals[r, c] * scale[r, g]
            else:
                byte = vals[r, g * half + (j % half)]
                u = (byte & 15) if j < half else (byte >> 4)
                out[r, c] = (int(u) - 8) * scale[r, g]
    return out


@pytest.mark.parametrize("bits,group", [(8, None), (8, 32), (4, 32), (4, 128)])
def test_round_trip_error_within_half_a_step(bits, group):
    w = _weights((24, 256))
    qw = quantize(w, bits, group)
    dq = np.asarray(dequantize(qw))
    step = _scale_per_element(qw)
    assert np.all(np.abs(w - dq) <= step / 2 * (1 + 1e-6) + 1e-12)
    assert np.all(dq[0] == 0.0)
    expected_bytes = 24 * 256 * bits // 8 + qw.scale.size * qw.scale.dtype.itemsize
    assert qw.nbytes == expected_bytes


def test_asymmetric_int4_round_trip_and_layout():
    w = _weights((24, 256)) + 0.03  # groups off-centre: what the offset is for
    qw = quantize(w, 4, 32, symmetric=False)
    assert qw.offset is not None and qw.offset.dtype == jnp.float16
    dq = np.asarray(dequantize(qw))
    assert np.all(np.abs(w - dq) <= _scale_per_element(qw) / 2 * (1 + 1e-6) + 1e-12)
    codes = np.asarray(unpack_int4(qw.values, 32), np.float32).reshape(24, 8, 32)
    want = codes * np.asarray(qw.scale, np.float32)[..., None]
    want = want + np.asarray(qw.offset, np.float32)[..., None]
    np.testing.assert_array_equal(dq, want.reshape(24, 256))
    sym = np.asarray(dequantize(quantize(w, 4, 32)))
    assert np.abs(w - dq).mean() < np.abs(w - sym).mean()  # 16 levels over the range, not 15


@pytest.mark.parametrize("bits,group", [(8, 32), (4, 32), (4, 16)])
def test_dequantize_matches_the_layout_element_by_element(bits, group):
    qw = quantize(_weights((6, 64), seed=1), bits, group)
    np.testing.assert_array_equal(np.asarray(dequantize(qw)), _reference_dequantize(qw))


def test_int4_packing_round_trips():
    u = jnp.asarray(np.random.default_rng(2).integers(0, 16, (5, 96)), jnp.uint8)
    packed = pack_int4(u, 32)
    assert packed.shape == (5, 48) and packed.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(unpack_int4(packed, 32)), np.asarray(u))


@pytest.mark.parametrize("bits,group", [(8, None), (4, 32)])
def test_weight_only_matmul_matches_float_within_the_bound(bits, group):
    w = _weights((48, 128), seed=3)
    x = np.random.default_rng(4).standard_normal((3, 5, 128)).astype(np.float32)
    qw = quantize(w, bits, group)
    y = np.asarray(qlinear(jnp.asarray(x), qw))
    # The float product with the dequantized weight (the native int4 kernel sums x * (u - 8)
    # as x * u - 8 * sum(x): a few 1e-5 of cancellation) ...
    np.testing.assert_allclose(y, x @ np.asarray(dequantize(qw)).T, rtol=1e-5, atol=1e-4)
    # ... and within sum_i |x_i| * step_i / 2 of the float product with the original weight.
    bound = np.abs(x) @ (_scale_per_element(qw) / 2).T
    assert np.all(np.abs(y - x @ w.T) <= bound + 1e-4)


# 9 runs of 64 bytes; 3 runs and a tail of 8; a K the panel kernel does not take (K % 4)
@pytest.mark.parametrize("k", [576, 200, 202])
def test_per_token_int8_product_is_exact_integer_arithmetic(k):
    """w8a8 with one activation scale per token (the tied head's product): the integer product
    of `quantize_rows`' codes is exact (numpy int64), and the result is that integer times the
    row scale rounded once to float32. On CPU the native kernels (`qmatvec.cc` for 1-3 rows,
    `int8_gemm.cc`'s column panels from 4, with a partial panel of 6 of 70 columns and
    partial blocks of rows) and XLA's int8 dot (`int8_matmul`), with the weight codes -128
    and 127 and activation codes +-127; then the channel scales applied in the kernel."""
    from jaxllm.quant.matmul import _native_int8, int8_matmul, native_w8a8

    rng = np.random.default_rng(9)
    w = rng.integers(-128, 128, (70, k)).astype(np.int8)
    w[1, :2] = (-128, 127)
    for rows in (1, 3, 5, 7, 11, 16, 17, 64):
        x = rng.standard_normal((rows, k)).astype(np.float32)
        x[0, :3] = (-5.0, 5.0, -5.0)  # codes -127, 127, -127
        xq, xs = (np.asarray(a) for a in quantize_rows(jnp.asarray(x)))
        ints = xq.astype(np.int64) @ w.astype(np.int64).T
        got = np.asarray(jax.jit(int8_matmul)(jnp.asarray(xq), jnp.asarray(w)))
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, ints)
        if _native_int8():
            y = np.asarray(
                jax.jit(native_w8a8, static_argnums=2)(jnp.asarray(x), jnp.asarray(w), 1)
            )
            np.testing.assert_array_equal(y, (ints * xs.astype(np.float64)).astype(np.float32))
            # the channel scales in the kernel's epilogue: one more float32 rounding
            cs = rng.uniform(0.5, 2.0, 70).astype(np.float32)
            f = jax.jit(native_w8a8, static_argnums=2)
            ys = np.asarray(f(jnp.asarray(x), jnp.asarray(w), 1, jnp.asarray(cs)))
            np.testing.assert_array_equal(ys, y * cs)


# VNNI groups (multiples of 64), scalar ones (32), one group per row (256)
@pytest.mark.parametrize("group", [64, pytest.param(128, marks=pytest.mark.slow), 32, 256])
def test_grouped_int8_matmul_is_the_per_group_integer_product(group):
    """w8a8 with per-group activation scales: for each group the exact integer product of
    the codes `quantize_rows` gives (on CPU the kernel quantizes x itself: an all-zero group,
    and ties rounded half to even, included), times the group's activation scale and the
    channel scale (numpy, float64), at row counts that take each native kernel on CPU (1-3
    rows; 4 and more, with partial row blocks), and XLA's batched dot elsewhere."""
    from jaxllm.quant.matmul import grouped_int8_matmul

    rng = np.random.default_rng(11)
    qw = quantize(_weights((48, 256), seed=12), 8)
    for rows in (1, 3, 7, 16, 17, 40):
        x = rng.standard_normal((rows, 256)).astype(np.float32)
        x[:, 5] *= 40.0
        if rows >= 3:
            x[1, :group] = 0.0
            x[2, :group] = np.resize([127.0, 2.5, -3.5, 0.5, -0.5, 1.5], group)  # scale 1: ties
        xq, xs = (
            np.asarray(a, np.float64)
            for a in quantize_rows(jnp.asarray(x).reshape(rows, -1, group))
        )
        ints = np.einsum(
            "rgi,ogi->rgo", xq, np.asarray(qw.values, np.float64).reshape(48, -1, group)
        )
        want = (ints * xs).sum(1) * np.asarray(qw.scale[:, 0], np.float64)
        got = np.asarray(jax.jit(grouped_int8_matmul, static_argnums=2)(jnp.asarray(x), qw, group))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("group", [64, 32])
def test_grouped_int8_matmul_does_not_depend_on_the_batch(group):
    """Each row's w8a8 product is bit-identical whether it runs alone (the few-row kernel) or
    among 40 rows (the column-panel kernel on CPU): the engine's greedy tokens must not
    change with what else is in the step."""
    from jaxllm.quant.matmul import grouped_int8_matmul

    rng = np.random.default_rng(13)
    qw = quantize(_weights((70, 256), seed=14), 8)
    x = rng.standard_normal((40, 256)).astype(np.float32) * 3
    f = jax.jit(grouped_int8_matmul, static_argnums=2)
    batch = np.asarray(f(jnp.asarray(x), qw, group))
    for r in (0, 17, 39):
        np.testing.assert_array_equal(
            np.asarray(f(jnp.asarray(x[r : r + 1]), qw, group))[0], batch[r]
        )


def test_w8a8_matmul_matches_float_within_the_bound():
    w = _weights((40, 96), seed=5)
    x = np.random.default_rng(6).standard_normal((7, 96)).astype(np.float32)
    qw = quantize(w, 8)
    y = np.asarray(qlinear(jnp.asarray(x), qw, activation_bits=8))
    xq, xs = (np.asarray(a) for a in quantize_rows(jnp.asarray(x)))
    dqx, dqw = xq * xs, np.asarray(dequantize(qw))
    # Exact integer accumulation: the float product of the two dequantized operands.
    np.testing.assert_allclose(y, dqx @ dqw.T, rtol=1e-5, atol=1e-6)
    bound = (np.abs(x) @ (_scale_per_element(qw) / 2).T) + (xs / 2) * np.abs(dqw).sum(1)[None]
    assert np.all(np.abs(y - x @ w.T) <= bound + 1e-5)


def test_recipes_load_and_compose():
    assert load_recipe("int8") == QuantConfig(name="int8", weight_bits=8, embed_bits=8)
    both = load_recipe("int4-g128+kv-int8")
    assert (both.weight_bits, both.group_size, both.kv_bits) == (4, 128, 8)
    assert load_recipe("w8a8").activation_bits == 8


def test_bad_recipes_and_shapes_raise():
    with pytest.raises(JaxLLMError, match="unknown quantization recipe 'int3'"):
        load_recipe("int3")
    with pytest.raises(JaxLLMError, match="set weight_bits to 8 and 4"):
        load_recipe("int8+int4-g32")
    with pytest.raises(JaxLLMError, match="4-bit weights need a group_size"):
        QuantConfig(weight_bits=4)
    with pytest.raises(JaxLLMError, match="asymmetric quantization is for int4 weights only"):
        QuantConfig(weight_bits=8, symmetric=False)
    with pytest.raises(JaxLLMError, match="weight has 48 inputs, which group size 32"):
        quantize(np.zeros((4, 48), np.float32), 4, 32)
    cfg = ModelConfig.from_yaml("tiny")  # hidden 64: groups of 128 do not fit
    with pytest.raises(JaxLLMError, match="layers.0.attn.qkv has 64 inputs, which group size 128"):
        quantize_model(Transformer(cfg, random_params(cfg)), "int4-g128")


@pytest.fixture(scope="module")
def tiny():
    cfg = ModelConfig.from_yaml("tiny")
    return cfg, random_params(cfg, scale=0.1)


@pytest.mark.parametrize(  # int4-g32 alone is slow: int4-g32+kv-int8 holds its weights
    "recipe",
    ["int8", pytest.param("int4-g32", marks=pytest.mark.slow), "int4-g32-f16s", "w8a8",
     "int4-g32+kv-int8"],
)  # fmt: skip
def test_jitted_step_takes_integer_weights_and_no_float_copy(tiny, recipe):
    cfg, params = tiny
    gen = Generator(quantize_model(Transformer(cfg, params), recipe))
    tokens = np.zeros((1, 16), np.int32)
    lowered = gen._forward.lower(gen.state, tokens)
    avals = jax.tree.leaves(lowered.in_avals[0][0])  # the model state argument
    float_shapes = {a.shape for a in avals if jnp.issubdtype(a.dtype, jnp.floating)}
    weight_shapes = {
        (cfg.hidden_size, cfg.intermediate_size * 2),
        (cfg.intermediate_size * 2, cfg.hidden_size),
        (cfg.vocab_size, cfg.hidden_size),
        (cfg.hidden_size, cfg.vocab_size),
    }
    for shape in weight_shapes:  # neither layout of any float weight is an input
        assert shape not in float_shapes and shape[::-1] not in float_shapes
    int_dtypes = {
        a.dtype for a in avals if a.ndim == 2 and not jnp.issubdtype(a.dtype, jnp.floating)
    }
    if "f16s" in recipe or "int4" not in recipe:
        want = {jnp.dtype(jnp.uint8)} if "int4" in recipe else {jnp.dtype(jnp.int8)}
    else:  # int4 codes and uint8 scale codes, int8 offset codes
        want = {jnp.dtype(jnp.uint8), jnp.dtype(jnp.int8)}
    assert int_dtypes == want
    if "int4" in recipe:  # group scales: float16 (f16s) or codes under [O, 1] super-scales
        scale_dtypes = {
            a.dtype for a in avals if a.ndim == 2 and a.shape[1] == cfg.hidden_size // 32
        }
        f16_supers = [a for a in avals if a.dtype == jnp.float16 and a.shape[1:] == (1,)]
        assert (jnp.dtype(jnp.float16) in scale_dtypes) == ("f16s" in recipe)
        assert bool(f16_supers) == ("f16s" not in recipe)


# Max logit error relative to the largest logit, random weights of std 0.1.
@pytest.mark.parametrize("recipe,tol", [("int8", 0.05), ("w8a8", 0.06), ("kv-int8", 0.02)])
def test_quantized_logits_stay_close_to_float(tiny, recipe, tol):
    cfg, params = tiny
    ids = list(range(3, 40))
    ref = Generator(Transformer(cfg, params)).logits(ids)
    got = Generator(quantize_model(Transformer(cfg, params), recipe)).logits(ids)
    assert np.max(np.abs(got - ref)) <= tol * np.max(np.abs(ref))


def test_int8_kv_cache_greedy_tokens_follow_float_on_both_generators(tiny):
    from jaxllm.engine import EngineConfig, LLMEngine

    cfg, params = tiny
    prompts = [list(range(1, 12)), list(range(5, 30))]
    sp = [SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)] * 2
    ref = [g.token_ids for g in Generator(Transformer(cfg, params)).generate(prompts, sp)]
    model = quantize_model(Transformer(cfg, params), "kv-int8")
    static = [g.token_ids for g in Generator(model).generate(prompts, sp)]
    eng = LLMEngine(model, EngineConfig(num_pages=32, page_size=4))
    rids = [eng.add_request(p, s) for p, s in zip(prompts, sp)]
    while eng.has_unfinished():
        eng.step()
    paged = [eng.requests[r].output for r in rids]
    agree = [np.mean(np.equal(a, b)) for run in (static, paged) for a, b in zip(ref, run)]
    assert min(agree) >= 0.75, agree
    assert eng.runner.pages[0][0].values.dtype == jnp.int8


def test_llm_applies_a_recipe_and_rejects_a_bad_one():
    from jaxllm import LLM
    from jaxllm.quant.layers import QuantizedLinear

    llm = LLM("tiny", log=lambda *a: None, quantization="int4-g32+kv-int8", engine=False)
    assert isinstance(llm.model.layers[0].mlp.down, QuantizedLinear)
    assert llm.generator.cache_dtype == jnp.int8
    out = llm.generate([1, 2, 3], SamplingParams(temperature=0, max_tokens=4))[0]
    assert len(out.token_ids) == 4
    with pytest.raises(JaxLLMError, match="unknown quantization recipe 'fp3'"):
        LLM("tiny", log=lambda *a: None, quantization="fp3")
    with pytest.raises(JaxLLMError, match="recipe 'gguf' needs a GGUF model"):
        LLM("tiny", log=lambda *a: None, quantization="gguf")


@pytest.mark.slow
# w8a8 is the lossy one: SmolLM2's normed activations have outlier channels that one int8
# scale per token flattens (measured 0.72 and 0.90 on these two texts).
@pytest.mark.parametrize("recipe,agree", [("int8", 0.9), ("w8a8", 0.7), ("kv-int8", 0.9)])
def test_smollm2_quantized_predictions_follow_float(smollm2, recipe, agree):
    """Teacher-forced on the float model's own greedy text: the quantized model's top-1
    agrees with the float model's at nearly every position."""
    from flax import nnx

    model = quantize_model(nnx.clone(smollm2.model), recipe)
    prompts = [smollm2.encode(p) for p in ("The capital of France is", "def fibonacci(n):")]
    sp = [SamplingParams(temperature=0, max_tokens=24)] * 2
    ref = smollm2.generator.generate(prompts, sp, eos_token_ids=smollm2.eos_token_ids)
    quant = Generator(model)
    for p, r in zip(prompts, ref):
        ids = p + r.token_ids
        want, got = smollm2.logits(ids).argmax(-1), quant.logits(ids).argmax(-1)
        assert np.mean(want == got) >= agree
        assert want[len(p) - 1] == got[len(p) - 1]  # the first generated token


@pytest.mark.parametrize(
    "bits,group,asym", [(8, None, False), (8, 32, False), (4, 32, False), (4, 64, True)]
)
def test_native_quantized_matvec_matches_dequantized_einsum(bits, group, asym):
    from jaxllm import cpu_kernels
    from jaxllm.quant.matmul import native_qlinear, uses_native_qmatvec
    from jaxllm.quant.qtensor import QuantizedWeight

    if not cpu_kernels.available():
        pytest.skip("no C++ compiler for the CPU kernels")
    rng = np.random.default_rng(7)
    qw = quantize(_weights((80, 192), seed=8), bits, group)
    if asym:  # GGUF Q4_1-style codes u with w = scale * u + offset
        offset = jnp.asarray(rng.standard_normal(qw.scale.shape) * 0.01, jnp.float16)
        qw = QuantizedWeight(qw.values, qw.scale, offset, 4, qw.group)
    want_w = np.asarray(dequantize(qw))
    for rows in (1, 5, 7, 11, 16):  # row blocks of 8, 4, 2 and 1
        x = jnp.asarray(rng.standard_normal((rows, 192)), jnp.float32)
        assert uses_native_qmatvec(x, qw)
        got = np.asarray(jax.jit(native_qlinear)(x, qw))
        np.testing.assert_allclose(got, np.asarray(x) @ want_w.T, rtol=1e-5, atol=1e-4)


@pytest.mark.slow
def test_cli_generate_quant_and_quantize_report(smollm2):
    import json

    from flax import nnx

    from jaxllm.quant.qtensor import quantize as rtn
    from tests.test_api_cli import run_cli

    r = run_cli("generate", "--prompt", "The capital of France is", "--max-tokens", "4",
                "--quant", "int8", "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    model = quantize_model(nnx.clone(smollm2.model), "int8")
    sp = [SamplingParams(temperature=0, max_tokens=4)]
    want = Generator(model).generate([smollm2.encode("The capital of France is")], sp)[0]
    assert json.loads(r.stdout)["token_ids"] == want.token_ids
    r = run_cli("quantize", "--recipe", "int4-g32", "--json")
    assert r.returncode == 0, r.stderr
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    down = rows["layers.3.mlp.down"]
    w = np.asarray(smollm2.model.layers[3].mlp.down.weight[...])
    assert down["bytes"] == rtn(w, 4, 32, symmetric=False, scale_bits=8).nbytes
    r = run_cli("quantize", "--recipe", "int4-g128")
    assert r.returncode == 2 and "group size 128 does not divide" in r.stderr


def test_grouped_activation_scales_and_smoothquant_keep_the_product():
    from jaxllm.quant.matmul import grouped_int8_matmul
    from jaxllm.quant.smoothquant import smoothing_factors

    rng = np.random.default_rng(9)
    w = _weights((40, 128), seed=10)
    x = rng.standard_normal((5, 128)).astype(np.float32)
    x[:, 7] *= 60.0  # an outlier channel, as in SmolLM2's SwiGLU outputs
    qw = quantize(w, 8)
    # One scale per whole row is the grouped product with a single group ...
    whole = np.asarray(qlinear(jnp.asarray(x), qw, 8))
    np.testing.assert_allclose(
        np.asarray(grouped_int8_matmul(jnp.asarray(x), qw, 128)), whole, rtol=1e-6, atol=1e-6
    )
    # ... and groups of 32 confine the outlier's coarse scale to its own group.
    exact = x @ np.asarray(dequantize(qw)).T
    grouped = np.asarray(qlinear(jnp.asarray(x), qw, 8, activation_group=32))
    assert np.abs(grouped - exact).mean() < 0.7 * np.abs(whole - exact).mean()
    # SmoothQuant: (x / s) @ (W * s)^T is the same product, and quantizes better.
    s = np.asarray(smoothing_factors(jnp.abs(jnp.asarray(x)).max(0), jnp.asarray(w), 0.5))
    np.testing.assert_allclose((x / s) @ (w * s).T, x @ w.T, rtol=1e-4, atol=1e-5)
    smooth = np.asarray(qlinear(jnp.asarray(x / s), quantize(w * s, 8), 8))
    assert np.abs(smooth - x @ w.T).mean() < np.abs(whole - x @ w.T).mean()
