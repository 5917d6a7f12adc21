"""The fused decode-attention kernel (interpret mode) against its op-by-op reference, and the
`decode` attention backend against `xla` through the static generator."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import SamplingParams
from jaxllm.generate import Generator
from jaxllm.model import Transformer, random_params
from pallas_kernels.decode_attention import decode_attention, decode_attention_reference


def _case(b, kh, g, d, s, dtype, cache_dtype, seed=0):
    """Inputs drawn in numpy: each eager jnp op on a new shape would be its own XLA compile."""
    rng = np.random.default_rng(seed)
    qkv = jnp.asarray(rng.standard_normal((b, kh, g + 2, d), np.float32), dtype)
    angles = rng.uniform(0.0, 6.0, (b, d // 2)).astype(np.float32)
    kc = jnp.asarray(rng.standard_normal((b, kh, s, d), np.float32), cache_dtype)
    vc = jnp.asarray(rng.standard_normal((b, kh, s, d), np.float32), cache_dtype)
    return qkv, jnp.asarray(np.cos(angles)), jnp.asarray(np.sin(angles)), kc, vc


@pytest.mark.parametrize(
    "b,kh,g,d,s,slot,dtype,cache_dtype,block_s",
    [
        (2, 2, 4, 64, 128, 77, jnp.float32, jnp.float32, 64),
        (1, 3, 2, 32, 64, 0, jnp.bfloat16, jnp.bfloat16, 16),  # only the new key is visible
        (2, 1, 8, 64, 32, 31, jnp.bfloat16, jnp.float16, 64),  # the last slot, block > S
    ],
)
def test_kernel_matches_reference(b, kh, g, d, s, slot, dtype, cache_dtype, block_s):
    qkv, cos, sin, kc, vc = _case(b, kh, g, d, s, dtype, cache_dtype)
    starts = np.array([0, 5][:b])[:, None]  # left padding in row 1
    valid = jnp.asarray((np.arange(s)[None] >= starts) & (np.arange(s)[None] <= slot))
    args = (qkv, cos, sin, kc, vc, valid, jnp.int32(slot))
    ref = lambda *a: decode_attention_reference(*a, sm_scale=0.3)
    ours = lambda *a: decode_attention(*a, sm_scale=0.3, block_s=block_s, interpret=True)
    want, got = jax.jit(ref)(*args), jax.jit(ours)(*args)
    tol = 1e-5 if dtype == jnp.float32 else 2.0**-7
    for name, a, w in zip(("out", "k_cache", "v_cache"), got, want, strict=True):
        assert a.shape == w.shape and a.dtype == w.dtype, name
        np.testing.assert_allclose(
            np.asarray(a, np.float32), np.asarray(w, np.float32), rtol=tol, atol=tol, err_msg=name
        )
    # only the slot was written
    rest = np.arange(s) != slot
    np.testing.assert_array_equal(np.asarray(got[1][:, :, rest]), np.asarray(kc[:, :, rest]))


def test_supported_shapes():
    from pallas_kernels.decode_attention import supports

    assert supports(4, 64, 256) and supports(1, 128, 16) and supports(8, 64, 32)
    assert not supports(3, 64, 256)  # SmolLM2's 3 query heads per KV head: op by op
    assert not supports(4, 96, 256) and not supports(4, 64, 48)


def test_bad_shapes_are_named():
    qkv, cos, sin, kc, vc = _case(1, 2, 2, 32, 48, jnp.float32, jnp.float32)
    valid = jnp.ones((1, 48), bool)
    with pytest.raises(ValueError, match="cos/sin must be"):
        decode_attention(qkv, cos[:, :8], sin, kc, vc, valid, 0, sm_scale=1.0, interpret=True)
    with pytest.raises(ValueError, match="48 slots are not a multiple of 32"):
        decode_attention(qkv, cos, sin, kc, vc, valid, 0, sm_scale=1.0, block_s=32,
                         interpret=True)  # fmt: skip
    # compiled (not interpreted), a shape Triton cannot load is named before lowering
    qkv, cos, sin, kc, vc = _case(1, 2, 3, 32, 64, jnp.float32, jnp.float32)
    with pytest.raises(ValueError, match="G=3 query heads per KV head"):
        decode_attention(qkv, cos, sin, kc, vc, jnp.ones((1, 64), bool), 0, sm_scale=1.0,
                         interpret=False)  # fmt: skip


def test_decode_backend_generates_as_xla(tiny_config, monkeypatch):
    """Oracle: the same model under the `xla` backend (RoPE, cache writes and attention op by
    op); prompts of different lengths (left padding)."""
    import jaxllm.model

    traced = []
    kernel = jaxllm.model.decode_attention
    monkeypatch.setattr(jaxllm.model, "decode_attention",
                        lambda *a, **kw: traced.append(1) or kernel(*a, **kw))  # fmt: skip
    params = random_params(tiny_config, seed=2, scale=0.3)
    prompts = [[5, 9, 3], list(range(10, 40)), [7, 1]]
    sp = [SamplingParams(temperature=0, max_tokens=10)] * len(prompts)
    want = Generator(Transformer(tiny_config, params, attention="xla")).generate(prompts, sp)
    got = Generator(Transformer(tiny_config, params, attention="decode")).generate(prompts, sp)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert len(traced) == tiny_config.num_layers  # one fused call per layer in the decode step
