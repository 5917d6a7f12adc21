"""llama.cpp's CPU product (`jaxllm.quant.ggml_dot`, recipe `gguf-llamacpp`): Q8_1/Q8_0
activation blocks and integer block products against a numpy transcription of ggml's formula,
and the recipe's logits against the float-activation `gguf` path."""

from __future__ import annotations

import gguf
import jax.numpy as jnp
import numpy as np
import pytest

import jaxllm.quant.ggml_dot as ggml_dot
from jaxllm.errors import JaxLLMError
from jaxllm.quant.config import load_recipe
from jaxllm.quant.ggml_dot import blocked_dot, quantize_q8_blocks
from jaxllm.quant.qtensor import QuantizedWeight, pack_int4


def numpy_q8_1(x: np.ndarray):
    """ggml's quantize_row_q8_1 (x86 path), one block of 32 at a time, in numpy float32."""
    rows, n = x.shape[0], x.shape[1] // 32
    q = np.zeros((rows, n, 32), np.int8)
    d = np.zeros((rows, n), np.float16)
    s = np.zeros((rows, n), np.float16)
    for r in range(rows):
        for b in range(n):
            blk = x[r, 32 * b : 32 * (b + 1)].astype(np.float32)
            amax = np.float32(np.abs(blk).max())
            dd = amax / np.float32(127)
            inv = np.float32(127) / amax if amax != 0 else np.float32(0)
            qi = np.rint(blk * inv)  # half to even, as _mm256_round_ps(_MM_ROUND_NEAREST)
            q[r, b] = qi.astype(np.int8)
            d[r, b] = np.float16(dd)
            s[r, b] = np.float16(dd * np.float32(qi.sum()))
    return q, d, s


def numpy_blocked_dot(x: np.ndarray, codes: np.ndarray, dw, mw) -> np.ndarray:
    """sum over blocks of d_w d_x sum_k c_k q_k (+ m_w s_x): codes [O, N, 32] as multiplied
    (Q4_1 u, Q4_0 u - 8, Q8_0 c)."""
    q, dx, sx = numpy_q8_1(x)
    dw = np.asarray(dw)
    mw = None if mw is None else np.asarray(mw)
    ints = np.einsum("rnk,onk->rno", q.astype(np.int64), codes.astype(np.int64))
    scale = (dw.astype(np.float32).T[None] * dx.astype(np.float32)[:, :, None]).astype(np.float64)
    y = np.einsum("rno,rno->ro", scale, ints.astype(np.float64))
    if mw is not None:
        y += sx.astype(np.float64) @ mw.astype(np.float64).T
    return y


def random_block_weight(rng, kind: str, o: int, i: int):
    """A random GGUF-style weight: (QuantizedWeight, codes as multiplied [O, N, 32])."""
    n = i // 32
    d = (rng.uniform(0.5, 2.0, (o, n)) * 0.01).astype(np.float16)
    if kind == "Q8_0":
        c = rng.integers(-127, 128, (o, i)).astype(np.int8)
        return QuantizedWeight(jnp.asarray(c), jnp.asarray(d), None, 8, 32), c.reshape(o, n, 32)
    u = rng.integers(0, 16, (o, i)).astype(np.uint8)
    packed = pack_int4(jnp.asarray(u), 32)
    if kind == "Q4_0":
        w = QuantizedWeight(packed, jnp.asarray(d), None, 4, 32)
        return w, u.reshape(o, n, 32).astype(np.int16) - 8
    m = (-rng.uniform(0.5, 2.0, (o, n)) * 0.08).astype(np.float16)
    return QuantizedWeight(packed, jnp.asarray(d), jnp.asarray(m), 4, 32), u.reshape(o, n, 32)


def test_q8_1_blocks_equal_numpy_transcription():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 96)).astype(np.float32) * 3
    x[1, 32:64] = 0.0  # an all-zero block: scale 0, codes 0
    x[2, :32] = np.arange(32, dtype=np.float32) - 15.5  # values on rounding ties
    x[3, 5] = 250.0  # an outlier coarsens its block only
    want_q, want_d, want_s = numpy_q8_1(x)
    got = quantize_q8_blocks(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(got.values), want_q)
    np.testing.assert_array_equal(np.asarray(got.scale), want_d)
    np.testing.assert_array_equal(np.asarray(got.block_sum), want_s)


@pytest.mark.parametrize("kind", ["Q4_1", "Q4_0", "Q8_0"])
def test_blocked_dot_equals_numpy_transcription(kind):
    rng = np.random.default_rng(1)
    w, codes = random_block_weight(rng, kind, 24, 128)
    x = rng.standard_normal((3, 7, 128)).astype(np.float32)
    x[0, 0, :32] *= 40.0  # one block with a wide range
    want = numpy_blocked_dot(x.reshape(21, 128), codes, w.scale, w.offset)
    got = np.asarray(blocked_dot(jnp.asarray(x), w)).reshape(21, 24)
    # The integer sums are exact; only the float32 order of the scaled block sums differs.
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_blocked_dot_in_row_chunks_equals_numpy(monkeypatch):
    rng = np.random.default_rng(2)
    w, codes = random_block_weight(rng, "Q4_1", 16, 64)
    x = rng.standard_normal((11, 64)).astype(np.float32)
    monkeypatch.setattr(ggml_dot, "_MAX_BLOCK_SUMS", 2 * 16 * 4)  # 4 rows per chunk
    got = np.asarray(blocked_dot(jnp.asarray(x), w))
    want = numpy_blocked_dot(x, codes, w.scale, w.offset)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_q8_activations_cost_no_more_than_their_rounding_bound():
    """|blocked - float| per output <= sum_k |w_k| * (d_x / 2 + rounding of d_x to float16)
    (+ |m_w| times the rounding of s_x): the quantized product is the float product of the
    dequantized blocks."""
    rng = np.random.default_rng(3)
    w, _ = random_block_weight(rng, "Q4_1", 32, 256)
    x = rng.standard_normal((4, 256)).astype(np.float32)
    from jaxllm.quant.qtensor import dequantize

    wf = np.asarray(dequantize(w), np.float64)  # [O, I]
    exact = x.astype(np.float64) @ wf.T
    got = np.asarray(blocked_dot(jnp.asarray(x), w), np.float64)
    amax = np.abs(x.reshape(4, 8, 32)).max(-1)  # [R, N]
    step = np.repeat(amax / 127 * (0.5 + 127 * 2.0**-11), 32, axis=1)  # per input, [R, I]
    bound = step @ np.abs(wf).T + 1e-5 * np.abs(exact).max()
    assert np.all(np.abs(got - exact) <= bound)
    assert np.abs(got - exact).max() > 0  # the activations really were quantized


def test_recipe_fields_and_errors():
    cfg = load_recipe("gguf-llamacpp")
    assert (cfg.method, cfg.gguf_activations, cfg.kv_dtype) == ("gguf", "q8", "float16")
    assert cfg.attention_f16
    with pytest.raises(JaxLLMError, match="kv_dtype='float16' and kv_bits=8"):
        load_recipe("gguf-llamacpp+kv-int8")
    from jaxllm.quant.config import QuantConfig

    with pytest.raises(JaxLLMError, match="gguf_activations='q8' needs method gguf"):
        QuantConfig(name="x", weight_bits=8, gguf_activations="q8")
    with pytest.raises(JaxLLMError, match="attention_f16 needs kv_dtype='float16', got kv_dt"):
        QuantConfig(name="x", attention_f16=True)
    with pytest.raises(JaxLLMError, match="gguf_activations='q4' in recipe"):
        QuantConfig(name="x", method="gguf", gguf_activations="q4")
    w = QuantizedWeight(jnp.zeros((4, 64), jnp.int8), jnp.ones((4, 1)), None, 8, 64)
    with pytest.raises(JaxLLMError, match="needs GGUF blocks of 32 inputs, got group 64"):
        ggml_dot.check_block_weight(w, "layers.0.attn.o")


def test_llamacpp_recipe_stays_near_the_float_activation_path(tmp_path):
    """The tiny Q4_1 model: `gguf-llamacpp` (q8 activations, float16 KV cache) against `gguf`
    (float32 activations) through the same prefill + KV-cache program."""
    from jaxllm.checkpoints.gguf_loader import load_gguf
    from jaxllm.model import Transformer
    from jaxllm.quant.apply import linear_slots, quantize_model
    from jaxllm.quant.gguf_native import native_weights
    from jaxllm.quant.layers import BlockQ8Embedding, BlockQ8Linear
    from tests.test_hf_checkpoints import TINY_INPUT_IDS, write_gguf

    path = tmp_path / "m.gguf"
    write_gguf(path, "tiny-llama", gguf.GGMLQuantizationType.Q4_1)
    cfg, params, _, factors = load_gguf(path)
    native = native_weights(path, cfg)
    logits = {}
    for recipe in ("gguf", "gguf-llamacpp"):
        model = Transformer(cfg, params, rope_factors=factors)
        quantize_model(model, recipe, native=native)
        logits[recipe] = cached_logits(model, TINY_INPUT_IDS)
    assert {type(getattr(p, a)) for _, p, a in linear_slots(model)} == {BlockQ8Linear}
    assert model.kv_cache_dtype == jnp.float16 and model.attention == "llamacpp"
    if cfg.tie_word_embeddings:
        assert isinstance(model.embed, BlockQ8Embedding)
    want, got = logits["gguf"], logits["gguf-llamacpp"]
    err = np.abs(got - want).max() / np.abs(want).max()
    assert 0 < err <= 0.02, err  # measured 5.9e-3 of the largest logit


def test_f16_attention_equals_numpy():
    """Oracle: numpy float32 attention with Q, K, V and the probabilities rounded to float16."""
    from jaxllm.quant.f16_attention import f16_attention

    rng = np.random.default_rng(4)
    b, t, k, g, d = 2, 6, 2, 3, 16
    q = rng.standard_normal((b, t, k, g, d)).astype(np.float32)
    kk, v = (rng.standard_normal((b, k, t, d)).astype(np.float32) for _ in range(2))
    mask = np.broadcast_to(np.tril(np.ones((t, t), bool)), (b, t, t))

    def f16(a):
        return a.astype(np.float16).astype(np.float32)

    scores = np.einsum("btkgd,bksd->bkgts", f16(q), f16(kk)) * np.float32(d**-0.5)
    scores = np.where(mask[:, None, None], scores, -np.inf)
    e = np.exp(scores - scores.max(-1, keepdims=True))
    probs = f16(e / e.sum(-1, keepdims=True))
    want = np.einsum("bkgts,bksd->btkgd", probs, f16(v))
    got = f16_attention(jnp.asarray(q), jnp.asarray(kk), jnp.asarray(v), jnp.asarray(mask),
                        sm_scale=d**-0.5)  # fmt: skip
    # A probability on a float16 rounding boundary may land one float16 step apart.
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=2.0**-10 * np.abs(v).max())


def cached_logits(model, ids) -> np.ndarray:
    """float32 logits [T, V] of one prefill written through a KV cache of the model's
    kv_cache_dtype (as generation runs)."""
    from flax import nnx

    from jaxllm.model import init_cache

    t = len(ids)
    cache = init_cache(model.config, 1, t, getattr(model, "kv_cache_dtype", None) or jnp.float32)

    @nnx.jit  # one program: op by op, every eager jnp op on a new shape is its own XLA compile
    def prefill(model, tokens, cache):
        mask = jnp.tril(jnp.ones((t, t), bool))[None]
        return model(tokens, jnp.arange(t)[None], mask, cache, jnp.int32(0))[0]

    return np.asarray(prefill(model, jnp.asarray([ids]), cache)[0])


@pytest.mark.slow
def test_products_equal_llamacpps_on_its_own_inputs(smollm2, monkeypatch):
    """Oracle: llama.cpp itself. Each SmolLM2 product fed llama.cpp's input tensor (read
    through its eval callback) gives llama.cpp's output tensor to float32 rounding with
    `gguf-llamacpp`, and differs by the activation quantization with `gguf`."""
    pytest.importorskip("llama_cpp")
    from pathlib import Path

    from flax import nnx

    from jaxllm.quant.apply import quantize_model
    from jaxllm.quant.gguf_native import native_weights

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from gguf_agreement import product_errors
    from llamacpp_taps import TappedLlama

    tapped = TappedLlama(smollm2.source, n_ctx=128, n_threads=2, logits_all=True)
    taps = tapped.eval(smollm2.encode("def fibonacci(n):"))
    native = native_weights(smollm2.source, smollm2.config)
    errors = {}
    for recipe in ("gguf", "gguf-llamacpp"):
        model = quantize_model(nnx.clone(smollm2.model), recipe, native=native)
        errors[recipe] = product_errors(model, taps)
    assert max(errors["gguf-llamacpp"].values()) <= 2e-6, errors  # measured <= 4e-7
    assert min(errors["gguf"].values()) >= 1e-4, errors  # float activations: ~1e-3


def test_llamacpp_recipe_engine_matches_static_generator(tmp_path):
    """Oracle: the static generator (contiguous cache, dense attention) on the recipe's jnp
    path. The engine's paged steps with the `llamacpp` attention give the same greedy
    tokens. (The static generator's default for this recipe, llama.cpp's arithmetic
    natively, is tested in test_ggml_exact.py.)"""
    from jaxllm import LLM, SamplingParams
    from tests.test_hf_checkpoints import TINY_INPUT_IDS, write_gguf

    path = tmp_path / "m.gguf"
    write_gguf(path, "tiny-llama", gguf.GGMLQuantizationType.Q4_1)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    tokens = {}
    for engine in (False, True):
        llm = LLM(str(path), quantization="gguf-llamacpp", engine=engine, log=lambda *a: None)
        assert llm.model.attention == "llamacpp"
        llm.model.numerics = None  # the jnp path, which the engine's steps also take
        tokens[engine] = llm.generate(list(TINY_INPUT_IDS), params)[0].token_ids
    assert tokens[True] == tokens[False]
