"""int8 KV cache: the quantizer's bound, writes into static and paged caches, and paged
attention over int8 pages (the jnp CPU path and the reference with scales) against the same
attention over the dequantized float pages."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.quant.kv import QuantizedKV, quantize_kv, read_kv, scatter_slots, update_slice, zeros_kv


def test_kv_round_trip_within_half_a_step():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 5, 64)) * 3, jnp.float32)
    q = quantize_kv(x)
    assert q.values.dtype == jnp.int8 and q.scale.shape == (2, 3, 5)
    err = np.abs(np.asarray(read_kv(q)) - np.asarray(x))
    assert np.all(err <= np.asarray(q.scale)[..., None] / 2 * (1 + 1e-6))


def test_static_and_paged_writes_match_float_writes():
    rng = np.random.default_rng(1)
    new = jnp.asarray(rng.standard_normal((1, 2, 3, 16)), jnp.float32)  # [B, K, T, D]
    want = update_slice(zeros_kv((1, 2, 8, 16), jnp.float32), new, (0, 0, 4, 0))
    got = update_slice(zeros_kv((1, 2, 8, 16), jnp.int8), new, (0, 0, 4, 0))
    assert isinstance(got, QuantizedKV)
    np.testing.assert_allclose(read_kv(got), want, atol=float(got.scale.max()) / 2)
    tokens = jnp.asarray(rng.standard_normal((2, 3, 16)), jnp.float32)  # [K, T, D]
    slots = jnp.asarray([5, 0, 99])  # the last is padding: dropped
    want = scatter_slots(zeros_kv((2, 4, 4, 16), jnp.float32), tokens, slots)
    got = scatter_slots(zeros_kv((2, 4, 4, 16), jnp.int8), tokens, slots)
    np.testing.assert_allclose(read_kv(got), want, atol=float(got.scale.max()) / 2)
    assert float(jnp.abs(read_kv(got)).sum()) > 0


@pytest.mark.slow  # the reference maps over rows eagerly (~20 s); the engine test covers int8
def test_paged_attention_over_int8_pages_matches_dequantized_pages():
    from jaxllm.engine.cpu_attention import split_paged_attention
    from pallas_kernels.reference import ragged_paged_attention_reference
    from tests.test_engine import _split_meta
    from tests.test_kernels import max_err, ragged_inputs

    kv_lens, q_lens = [1, 37, 20], [1, 5, 12]
    q, kp, vp, lens, tables, cu = ragged_inputs(9, 3, 64, 16, kv_lens, q_lens, jnp.float32, pad=0)
    kq, vq = quantize_kv(kp), quantize_kv(vp)
    kd, vd = read_kv(kq), read_kv(vq)
    want = ragged_paged_attention_reference(q, kd, vd, lens, tables, cu, 3, sm_scale=0.125)
    ref = ragged_paged_attention_reference(
        q, kq.values, vq.values, lens, tables, cu, 3, sm_scale=0.125,
        k_scales=kq.scale, v_scales=vq.scale,
    )  # fmt: skip
    assert max_err(ref, want) <= 2e-5
    meta = _split_meta(kv_lens, q_lens, tables, q.shape[0])
    got = split_paged_attention(q, kq, vq, meta, sm_scale=0.125)
    assert max_err(got, want) <= 2e-5
    # And the int8 cache stays close to the float one it came from.
    exact = ragged_paged_attention_reference(q, kp, vp, lens, tables, cu, 3, sm_scale=0.125)
    assert max_err(got, exact) <= 0.05
