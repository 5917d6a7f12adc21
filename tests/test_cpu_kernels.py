"""The native CPU matvec kernel against the einsum reference (and float64 numpy)."""

from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import cpu_kernels as ck

pytestmark = pytest.mark.skipif(
    jax.default_backend() != "cpu" or not ck.available(), reason="no CPU kernel on this machine"
)

# (leading shape of x, in, out): serial (small) and pooled (large) paths, ragged tails.
SHAPES = [
    ((1,), 576, 960),
    ((1, 1), 576, 3072),
    ((3,), 1536, 576),
    ((16,), 576, 1000),
    ((2, 5), 100, 7),
    ((7,), 37, 5003),
    ((1,), 1, 70000),
]


@pytest.mark.parametrize("lead,k,n", SHAPES)
def test_native_matches_reference(lead, k, n):
    rng = np.random.default_rng(k + n)
    x = rng.standard_normal((*lead, k), dtype=np.float32)
    w = rng.standard_normal((n, k), dtype=np.float32)
    assert ck.uses_native(jnp.asarray(x), jnp.asarray(w))
    got = np.asarray(jax.jit(ck.linear)(x, w))
    exact = x.astype(np.float64) @ w.astype(np.float64).T
    ref = np.asarray(ck.einsum_linear(x, w))
    # float32 accumulation over k terms, in a different order than XLA's.
    tol = 1e-6 * np.sqrt(k) * np.abs(x).max() * np.abs(w).max() * 4
    assert np.abs(got - exact).max() <= tol
    assert np.abs(got - ref).max() <= 2 * tol


@pytest.mark.parametrize("lead,k,n", [((1,), 576, 960), ((9,), 1536, 576), ((2, 3), 37, 5003)])
def test_native_bf16_weights_match_reference(lead, k, n):
    """bfloat16 weights: x rounded to bfloat16, float32 accumulation, against float64 numpy
    on the same rounded values and against the bf16 einsum."""
    rng = np.random.default_rng(k + n)
    x = jnp.asarray(rng.standard_normal((*lead, k), dtype=np.float32))
    w = jnp.asarray(rng.standard_normal((n, k), dtype=np.float32)).astype(jnp.bfloat16)
    assert ck.uses_native(x, w)
    got = np.asarray(jax.jit(ck.linear)(x, w))
    assert got.dtype == np.float32
    xr = np.asarray(x.astype(jnp.bfloat16).astype(jnp.float32), np.float64)
    exact = xr @ np.asarray(w.astype(jnp.float32), np.float64).T
    wmax = float(jnp.abs(w.astype(jnp.float32)).max())
    tol = 1e-6 * np.sqrt(k) * np.abs(xr).max() * wmax * 4  # float32 accumulation, as above
    assert np.abs(got - exact).max() <= tol
    assert np.abs(got - np.asarray(ck.einsum_linear(x, w))).max() <= 2 * tol


def test_falls_back_for_many_rows_and_other_dtypes():
    x = jnp.ones((17, 64), jnp.float32)
    w = jnp.ones((32, 64), jnp.float32)
    assert not ck.uses_native(x, w)
    assert not ck.uses_native(x[:2].astype(jnp.bfloat16), w.astype(jnp.bfloat16))
    np.testing.assert_array_equal(ck.linear(x, w), np.full((17, 32), 64.0, np.float32))


def test_gradients_equal_the_reference():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 96), dtype=np.float32))
    w = jnp.asarray(rng.standard_normal((1024, 96), dtype=np.float32))

    def loss(f):
        return lambda x, w: jnp.sum(jnp.tanh(f(x, w)))

    got = jax.grad(loss(ck.linear), argnums=(0, 1))(x, w)
    want = jax.grad(loss(ck.einsum_linear), argnums=(0, 1))(x, w)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


def test_concurrent_callers_get_their_own_results():
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.standard_normal((4096, 256), dtype=np.float32))
    xs = [jnp.asarray(rng.standard_normal((1, 256), dtype=np.float32)) for _ in range(4)]
    f = jax.jit(ck.linear)
    want = [np.asarray(ck.einsum_linear(x, w)) for x in xs]
    errors: list[float] = []

    def worker(i):
        for _ in range(20):
            errors.append(float(np.abs(np.asarray(f(xs[i], w)) - want[i]).max()))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 80 and max(errors) < 1e-3
