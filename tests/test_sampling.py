"""The sampler against numpy oracles and a chi-square test against softmax."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import JaxLLMError, SamplingParams
from jaxllm.sampling import SamplingArrays, filter_logits, greedy_argmax, sample


def arrays(params, batch=None):
    return SamplingArrays.from_params(params, batch or len(params))


def kept_set_oracle(logits, temperature, top_k, top_p, min_p):
    """Which token ids survive the filters, computed the slow obvious way."""
    z = logits / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = sorted(range(len(p)), key=lambda i: (-p[i], i))
    if top_k > 0:  # top-p and min-p see the distribution renormalised over the top k
        order = order[:top_k]
        p = p / p[order].sum()
    kept, mass = [], 0.0
    for i in order:
        if mass >= top_p:
            break
        if p[i] < min_p * p[order[0]]:
            break
        kept.append(i)
        mass += p[i]
    return set(kept)


def test_greedy_is_argmax():
    logits = jax.random.normal(jax.random.PRNGKey(0), (8, 1000)) * 3
    sp = arrays([SamplingParams(temperature=0.0)] * 8)
    got = sample(logits, sp, jnp.int32(0))
    np.testing.assert_array_equal(got, np.argmax(np.asarray(logits), -1))
    ties = jnp.asarray([[0.0, 2.0, 2.0, 1.0], [5.0, 5.0, 5.0, 5.0], [-1.0, -3.0, -1.0, -2.0]])
    np.testing.assert_array_equal(greedy_argmax(ties), np.argmax(np.asarray(ties), -1))


@pytest.mark.parametrize("v", [1, 7, 16, 49152 + 5])  # below, at and past one vector of lanes
def test_native_argmax_is_jnp_argmax(v):
    """`cpu_kernels/argmax.cc` (greedy sampling on CPU) against jnp.argmax: ties to the first
    index, in and across vector lanes; -inf rows; NaN (the first NaN wins, as in jnp.argmax);
    jitted, as the engine calls it."""
    from jaxllm import cpu_kernels

    rng = np.random.default_rng(v)
    x = rng.standard_normal((6, v)).astype(np.float32)
    x[1, :] = -np.inf
    x[2, :] = 3.0  # all tied: index 0
    x[3, v // 2 :] = 9.0  # tied maxima from the middle (different lanes when v >= 32)
    x[4, v - 1] = np.nan
    x[5, v // 3] = np.nan
    x[5, 0] = 50.0
    if not cpu_kernels.uses_native_argmax(jnp.asarray(x)):
        pytest.skip("native CPU kernels not built here")
    got = np.asarray(jax.jit(cpu_kernels.argmax)(jnp.asarray(x)))
    np.testing.assert_array_equal(got, np.argmax(x, -1))
    np.testing.assert_array_equal(
        np.asarray(greedy_argmax(jnp.asarray(x[:4]))), np.argmax(x[:4], -1)
    )


@pytest.mark.parametrize(
    "top_k,top_p,min_p,temp",
    [
        (5, 1.0, 0.0, 1.0),
        (0, 0.9, 0.0, 1.0),
        (0, 0.5, 0.0, 0.7),
        (10, 0.8, 0.0, 1.3),
        (0, 1.0, 0.1, 1.0),
        (0, 0.95, 0.05, 2.0),
        (1, 1.0, 0.0, 1.0),
    ],
)
def test_filters_keep_exactly_the_right_set(top_k, top_p, min_p, temp):
    rng = np.random.default_rng(top_k * 100 + int(top_p * 10))
    logits = (rng.standard_normal((4, 64)) * 2).astype(np.float32)
    b = logits.shape[0]
    filtered, order = filter_logits(
        jnp.asarray(logits),
        jnp.full((b,), temp, jnp.float32),
        jnp.full((b,), top_k, jnp.int32),
        jnp.full((b,), top_p, jnp.float32),
        jnp.full((b,), min_p, jnp.float32),
    )
    filtered, order = np.asarray(filtered), np.asarray(order)
    for row in range(b):
        kept = set(order[row][np.isfinite(filtered[row])].tolist())
        assert kept == kept_set_oracle(logits[row], temp, top_k, top_p, min_p)


def test_sampled_tokens_stay_in_the_kept_set():
    rng = np.random.default_rng(5)
    logits = jnp.asarray(rng.standard_normal((16, 100)).astype(np.float32) * 2)
    params = [SamplingParams(temperature=1.0, top_k=3, seed=i) for i in range(16)]
    sp = arrays(params)
    for step in range(5):
        got = np.asarray(sample(logits, sp, jnp.int32(step)))
        top3 = np.argsort(-np.asarray(logits), -1)[:, :3]
        assert all(got[i] in top3[i] for i in range(16))


def test_same_seed_same_tokens_whatever_the_batch():
    rng = np.random.default_rng(6)
    logits = jnp.asarray(rng.standard_normal((4, 500)).astype(np.float32))
    mine = SamplingParams(temperature=1.0, top_p=0.9, seed=1234)
    others = [SamplingParams(temperature=0.5, seed=s) for s in (1, 2, 3)]
    a = sample(logits, arrays([mine, *others]), jnp.int32(7))
    b = sample(logits[::-1], arrays([*others[::-1], mine]), jnp.int32(7))
    assert int(a[0]) == int(b[3])
    c = sample(
        logits, arrays([SamplingParams(temperature=1.0, top_p=0.9, seed=99), *others]), jnp.int32(7)
    )
    draws = [
        int(sample(logits[:1], arrays([SamplingParams(temperature=1.0, seed=s)]), jnp.int32(0))[0])
        for s in range(20)
    ]
    assert len(set(draws)) > 1  # different seeds do differ
    del c


def test_temperature_one_frequencies_match_softmax():
    """Chi-square goodness of fit of 20000 draws over an 8-token vocabulary."""
    logits = np.array([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2], np.float32)
    n = 20000
    sp = arrays([SamplingParams(temperature=1.0, seed=s) for s in range(n)])
    draws = np.asarray(sample(jnp.tile(jnp.asarray(logits), (n, 1)), sp, jnp.int32(0)))
    observed = np.bincount(draws, minlength=8)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    expected = p * n
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    # 7 degrees of freedom: P(chi2 > 24.32) = 0.001.
    assert chi2 < 24.32, (observed, expected)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(temperature=-0.1), "temperature=-0.1 must be in"),
        (dict(top_p=0.0), "top_p=0.0 must be in"),
        (dict(top_p=1.5), "top_p=1.5 must be in"),
        (dict(top_k=-5), "top_k=-5 must be"),
        (dict(min_p=2.0), "min_p=2.0 must be in"),
        (dict(max_tokens=0), "max_tokens=0 must be"),
        (dict(seed=-1), "seed=-1 must be in"),
    ],
)
def test_bad_sampling_values_raise(kw, match):
    with pytest.raises(JaxLLMError, match=match):
        SamplingParams(**kw)


def test_top_p_applies_after_top_k():
    """p = [.3, .3, .2, .2], top_k=2, top_p=0.5: after top-k the first token already holds
    half the mass, so only it survives (vLLM's and HF's order of filters)."""
    logits = jnp.log(jnp.asarray([[0.3, 0.3, 0.2, 0.2]], jnp.float32))
    one = lambda v, dt=jnp.float32: jnp.asarray([v], dt)  # noqa: E731
    filtered, order = filter_logits(logits, one(1.0), one(2, jnp.int32), one(0.5), one(0.0))
    assert np.isfinite(np.asarray(filtered)).sum() == 1
