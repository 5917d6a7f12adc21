"""llama.cpp's arithmetic, natively (`jaxllm.quant.ggml_exact`, recipe `gguf-llamacpp`).

Oracles: numpy transcriptions of ggml's formulas (RMSNorm to the bit; block products, RoPE,
SwiGLU and attention to their float32 / float16 rounding), the recipe's jnp path, and, where
llama-cpp-python is installed (`make bench-deps`), llama.cpp itself to the bit."""

from __future__ import annotations

import gguf
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.quant import ggml_exact
from tests.test_quant_ggml_dot import numpy_blocked_dot, random_block_weight

pytestmark = pytest.mark.skipif(
    not ggml_exact.available(), reason="needs a C++ compiler and an AVX2 or AVX512 CPU"
)


class _Norm:
    def __init__(self, w, eps):
        self.weight, self.eps = jnp.asarray(w), eps


def test_rms_norm_equals_numpy_transcription_to_the_bit():
    """ggml_rms_norm: float32 squares summed in order in double, mean and 1/sqrt in float32,
    then x * scale * w."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((5, 576)) * np.array([1.0] * 575 + [300.0])).astype(np.float32)
    w = rng.uniform(0.5, 2.0, 576).astype(np.float32)
    eps = 1e-5
    sq = (x * x).astype(np.float64)
    mean = np.cumsum(sq, axis=-1)[:, -1] / 576  # cumsum: one addition after another
    scale = np.float32(1) / np.sqrt(mean.astype(np.float32) + np.float32(eps))
    want = x * scale[:, None] * w
    got = np.asarray(ggml_exact.rms_norm(jnp.asarray(x), _Norm(w, eps)))
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0", "Q4_0"])
def test_block_dot_equals_numpy_transcription(kind):
    """Q8_1 (Q4_1) / Q8_0 activation blocks and integer block products, against the float64
    sum of ggml's formula: the float32 sums in ggml's order are within a few roundings."""
    rng = np.random.default_rng(1)
    w, codes = random_block_weight(rng, kind, 48, 128)
    x = rng.standard_normal((3, 128)).astype(np.float32)
    x[1, :32] = 0.0  # an all-zero block: scale 0, codes 0
    want = numpy_blocked_dot(x, codes, w.scale, w.offset)
    got = np.asarray(ggml_exact.block_dot(jnp.asarray(x), w))
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(want).max())


def test_rope_matches_rotate_half_rope():
    """GGML_ROPE_TYPE_NORMAL on rotate-half rows equals jaxllm's RoPE up to the angle
    recurrence's float32 rounding (theta *= theta_scale, as ggml computes the angles)."""
    from jaxllm.model import apply_rope, rope_tables

    rng = np.random.default_rng(2)
    b, t, h, d, base = 2, 40, 3, 64, 100000.0
    x = rng.standard_normal((b, t, h, d)).astype(np.float32)
    pos = np.stack([np.arange(t), np.arange(t) + 60]).astype(np.int32)
    inv = 1.0 / (base ** (np.arange(0, d, 2, dtype=np.float64) / d))
    want = np.asarray(apply_rope(jnp.asarray(x), rope_tables(jnp.asarray(pos), jnp.asarray(inv))))
    got = np.asarray(ggml_exact.rope(jnp.asarray(x), jnp.asarray(pos), base))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(x).max())
    assert not np.array_equal(got, x)


def test_swiglu_matches_silu():
    """ggml_v_silu's polynomial exp is within 1.5 float32 roundings of exp."""
    rng = np.random.default_rng(3)
    g = (rng.standard_normal((4, 1540)) * 6).astype(np.float32)  # 1540: a scalar tail too
    u = rng.standard_normal((4, 1540)).astype(np.float32)
    g[0, :4] = [0.0, -100.0, 100.0, -88.0]
    want = g.astype(np.float64) / (1 + np.exp(-g.astype(np.float64))) * u
    got = np.asarray(ggml_exact.swiglu(jnp.asarray(g), jnp.asarray(u)))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-30)


def _f16(a):
    return a.astype(np.float16).astype(np.float32)


@pytest.mark.parametrize("t", [1, 7])
def test_attention_equals_float16_oracle(t):
    """Left-padded rows as the static generator lays them out: numpy attention with Q, K, V
    and the probabilities rounded to float16 (ggml's non-flash CPU attention), for one query
    row (ggml_vec_dot_f16) and several (tinyBLAS); padding rows give zeros."""
    rng = np.random.default_rng(5)
    b, k, g, d, s = 2, 2, 3, 64, 24
    starts = np.array([0, 19])
    slot0 = s - t  # the rows' first slot: a prefill fills slots [s - t, s)
    q = rng.standard_normal((b, t, k, g, d)).astype(np.float32)
    kk = _f16(rng.standard_normal((b, k, s, d)).astype(np.float32) * 3)
    v = _f16(rng.standard_normal((b, k, s, d)).astype(np.float32))
    slots = np.arange(s)
    rows = slot0 + np.arange(t)
    mask = (slots[None, None, :] <= rows[None, :, None]) & (
        slots[None, None, :] >= starts[:, None, None]
    )
    mask &= (rows >= starts[:, None])[:, :, None]
    scores = np.einsum("btkgd,bksd->bkgts", _f16(q), kk) * np.float32(d**-0.5)
    scores = np.where(mask[:, None, None], scores, -np.inf)
    with np.errstate(invalid="ignore"):  # padding rows: all -inf, NaN, zeroed below
        e = np.exp(scores - scores.max(-1, keepdims=True))
        probs = _f16(e / e.sum(-1, keepdims=True))
    want = np.nan_to_num(np.einsum("bkgts,bksd->btkgd", probs, v))
    got = ggml_exact.attention(
        jnp.asarray(q), jnp.asarray(kk, jnp.float16), jnp.asarray(v, jnp.float16),
        jnp.asarray(mask), interleaved=False,
    )  # fmt: skip
    got = np.asarray(got)
    np.testing.assert_allclose(got, want, rtol=0, atol=2.0**-10 * np.abs(v).max())
    padding = ~mask.any(-1)
    assert padding.any() == (t > 1)
    assert (got[padding] == 0).all()


def _tiny_model(tmp_path):
    from tests.test_hf_checkpoints import write_gguf

    path = tmp_path / "m.gguf"
    write_gguf(path, "tiny-llama", gguf.GGMLQuantizationType.Q4_1)
    return path


def test_recipe_runs_the_native_forward_near_its_jnp_path(tmp_path):
    """The tiny Q4_1 model: `gguf-llamacpp` selects the native forward and the static
    generator; its logits stay within the q8/float16 roundings of the jnp path of the same
    recipe, and generation runs on it."""
    from jaxllm import LLM, SamplingParams
    from tests.test_hf_checkpoints import TINY_INPUT_IDS
    from tests.test_quant_ggml_dot import cached_logits

    llm = LLM(str(_tiny_model(tmp_path)), quantization="gguf-llamacpp", log=lambda *a: None)
    model = llm.model
    assert model.numerics == "ggml" and not llm.use_engine
    exact = cached_logits(model, TINY_INPUT_IDS)
    model.numerics = None
    approx = cached_logits(model, TINY_INPUT_IDS)
    model.numerics = "ggml"
    err = np.abs(exact - approx).max() / np.abs(approx).max()
    assert 0 < err <= 5e-3, err
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    out = llm.generate(list(TINY_INPUT_IDS), params)[0].token_ids
    assert len(out) == 8
    # the first token is the prefill logits' argmax
    assert out[0] == int(exact[-1].argmax())


@pytest.mark.slow
def test_equals_llamacpp_to_the_bit(smollm2, monkeypatch):
    """Oracle: llama.cpp itself (llama-cpp-python, built for this CPU). Every layer's output
    and the logits of a prompt equal llama.cpp's to the bit, and greedy decoding gives its 32
    tokens on each of the three agreement prompts."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import sys
    from pathlib import Path

    from jaxllm import LLM, SamplingParams

    monkeypatch.setattr(sys, "path", [str(Path(__file__).parents[1] / "benchmarks"), *sys.path])
    from gguf_agreement import PROMPTS, llamacpp_greedy
    from llamacpp_taps import TappedLlama

    ours = LLM("smollm2-135m", quantization="gguf-llamacpp", log=lambda *a: None)
    tapped = TappedLlama(ours.source, n_ctx=512, n_threads=2, logits_all=True)
    ids = ours.encode(PROMPTS[2])
    taps = tapped.eval(ids)
    t = len(ids)
    mask = jnp.tril(jnp.ones((t, t), bool))[None]
    logits, _ = ggml_exact.forward(ours.model, jnp.asarray([ids]), jnp.arange(t)[None], mask)
    np.testing.assert_array_equal(np.asarray(logits)[0], taps["result_output"][0, 0])
    ref = llama_cpp.Llama(str(ours.source), n_ctx=512, n_threads=2, verbose=False,
                          logits_all=True)  # fmt: skip
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    for prompt in PROMPTS:
        ids = ours.encode(prompt)
        want, _ = llamacpp_greedy(ref, ids, 32)
        assert list(ours.generate(ids, params)[0].token_ids) == list(want), prompt
