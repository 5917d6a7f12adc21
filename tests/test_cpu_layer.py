"""The CPU engine's fused w8a8 layer (`cpu_kernels/layer.cc`) against its oracle, the same
layer op by op (`Block.paged`: the same int8 kernels between XLA's norms, RoPE, scatters and
SwiGLU), and the engine's greedy tokens with and without it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import cpu_kernels
from jaxllm.attention import get_paged_attention_fn
from jaxllm.model import PagedMeta, Transformer, random_params, rope_tables
from jaxllm.quant import cpu_layer
from jaxllm.quant.apply import quantize_model
from jaxllm.quant.kv import quantize_kv
from jaxllm.quant.kv_bits import page_storage

pytestmark = pytest.mark.skipif(
    not cpu_kernels.available() or jax.default_backend() != "cpu",
    reason="the fused layer is a native CPU kernel",
)


@pytest.fixture(scope="module")
def w8a8_tiny(tiny_config):
    return tiny_config, quantize_model(
        Transformer(tiny_config, random_params(tiny_config, seed=5, scale=0.3)), "w8a8"
    )


def _step(cfg, t_bucket, page=8, num_pages=24):
    """A mixed step: a 9-token prefill chunk after 7 cached tokens, two decodes and a
    5-token prompt, padded to t_bucket rows; pages hold earlier (random) keys and values."""
    q_lens, kv_lens = [9, 1, 1, 5], [16, 12, 30, 5]
    tables = np.full((6, 4), 0, np.int32)  # two unused slots past num_seqs
    tables[:4] = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    cu = np.concatenate([[0], np.cumsum(q_lens), [15, 15]]).astype(np.int32)
    slots, positions = [], []
    for s, (q, kv) in enumerate(zip(q_lens, kv_lens)):
        for pos in range(kv - q, kv):
            slots.append(tables[s, pos // page] * page + pos % page)
            positions.append(pos)
    n = len(slots)
    slots += [num_pages * page] * (t_bucket - n)  # padding: out of range, dropped
    positions += [0] * (t_bucket - n)
    meta = PagedMeta(
        slot_mapping=jnp.asarray(slots, jnp.int32),
        kv_lens=jnp.asarray(kv_lens + [0, 0], jnp.int32),
        block_tables=jnp.asarray(tables),
        cu_q_lens=jnp.asarray(cu),
        num_seqs=jnp.int32(4),
        dec_rows=jnp.zeros((0,), jnp.int32),
        dec_seq=jnp.zeros((0,), jnp.int32),
        pre_rows=jnp.zeros((0, 0), jnp.int32),
        pre_seq=jnp.zeros((0,), jnp.int32),
    )
    rng = np.random.default_rng(1)
    shape = (cfg.num_kv_heads, num_pages, page, cfg.head_dim)
    pages = tuple(jnp.asarray(rng.standard_normal(shape, np.float32)) for _ in range(2))
    x = jnp.asarray(rng.standard_normal((t_bucket, cfg.hidden_size), np.float32))
    return x, jnp.asarray(positions, jnp.int32), pages, meta, n


@pytest.mark.parametrize("page_dtype", ["float32", "float16", "bfloat16", "int8"])
def test_fused_layer_matches_block_paged(w8a8_tiny, page_dtype):
    cfg, model = w8a8_tiny
    x, positions, pages, meta, n = _step(cfg, t_bucket=20)
    if page_dtype == "int8":  # codes with a scale per token per KV head (kv-int8)
        pages = tuple(quantize_kv(p) for p in pages)
    else:
        pages = page_storage(tuple(p.astype(page_dtype) for p in pages))
    block = model.layers[0]
    assert cpu_layer.block_group(block) == 64
    assert cpu_layer.applies(model, x, (pages,))
    fn = get_paged_attention_fn(model.attention)

    def unfused(x, pages):
        rope = rope_tables(positions[None], model.inv_freq[...])
        return block.paged(x, positions, model.inv_freq[...], pages, meta, fn, rope)

    def fused(x, pages):
        rope = rope_tables(positions[None], model.inv_freq[...])
        return cpu_layer.paged_block(block, x, rope, pages, meta)

    want, want_pages = jax.jit(unfused)(x, pages)
    got, got_pages = jax.jit(fused)(x, pages)
    want, got = np.asarray(want), np.asarray(got)
    # Rounding in the norms and SiLU can move an activation code by one: a row or two
    # differ by about a quantization step, the rest to float32 rounding.
    err = np.abs(got[:n] - want[:n]).max(axis=1)
    scale = np.abs(want[:n]).max()
    assert err.max() <= 2e-2 * scale, err
    assert np.sum(err <= 1e-5 * scale) >= n - 2, err
    assert not np.any(got[n:])  # padding rows: zero
    for w, g in zip(jax.tree.leaves(want_pages), jax.tree.leaves(got_pages)):
        atol = 1 if w.dtype == jnp.int8 else 1e-2  # an int8 code may round the other way
        w = np.asarray(w).astype(np.float32)
        g = np.asarray(g).astype(np.float32)
        written = np.zeros(w.shape[1] * w.shape[2], bool)
        written[np.asarray(meta.slot_mapping[:n])] = True
        written = written.reshape(w.shape[1:3])
        np.testing.assert_array_equal(g[:, ~written], w[:, ~written])  # untouched slots
        np.testing.assert_allclose(g[:, written], w[:, written], rtol=2e-2, atol=atol)


def test_fused_layer_against_float_layer(w8a8_tiny, tiny_config):
    """The fused w8a8 layer against the float32 layer: its error is w8a8's, the same as the
    op-by-op w8a8 layer's (and small)."""
    cfg, model = w8a8_tiny
    float_model = Transformer(cfg, random_params(cfg, seed=5, scale=0.3))
    x, positions, pages, meta, n = _step(cfg, t_bucket=16)
    rope = rope_tables(positions[None], model.inv_freq[...])
    fn = get_paged_attention_fn(float_model.attention)
    inv_freq = model.inv_freq[...]
    want, _ = float_model.layers[1].paged(x, positions, inv_freq, pages, meta, fn, rope)
    op_by_op, _ = model.layers[1].paged(x, positions, inv_freq, pages, meta, fn, rope)
    got, _ = cpu_layer.paged_block(model.layers[1], x, rope, pages, meta)

    def rel(a):
        return float(np.linalg.norm(np.asarray(a[:n] - want[:n])) / np.linalg.norm(want[:n]))

    assert rel(got) < 0.06, rel(got)
    assert rel(got) <= 1.05 * rel(op_by_op) + 1e-4, (rel(got), rel(op_by_op))


# Two engines per case (~35 s on 2 cores): the half-precision pages are slow; the default
# run keeps int8 pages (the fused layers' own page reads are tested above for each dtype).
@pytest.mark.parametrize(
    "recipe,kv_dtype",
    [pytest.param("w8a8", "float16", marks=pytest.mark.slow),
     pytest.param("w8a8", "bfloat16", marks=pytest.mark.slow), ("w8a8+kv-int8", None)],
)  # fmt: skip
def test_engine_greedy_tokens_with_and_without_fused_layers(tiny_config, recipe, kv_dtype):
    from jaxllm.engine import EngineConfig, LLMEngine
    from tests.test_engine import workload

    params = random_params(tiny_config, seed=5, scale=0.3)
    model = quantize_model(Transformer(tiny_config, params), recipe)
    prompts, sp = workload()
    config = EngineConfig(
        num_pages=20, page_size=8, max_num_batched_tokens=32, kv_cache_dtype=kv_dtype
    )  # chunked prefill and preemption
    with cpu_layer.unfused():
        want = [r.output for r in LLMEngine(model, config).run(prompts, sp)]
    engine = LLMEngine(model, config)
    assert cpu_layer.applies(model, jnp.zeros((1, tiny_config.hidden_size)), engine.runner.pages)
    got = [r.output for r in engine.run(prompts, sp)]
    assert got == want
    assert engine.metrics()["preemptions"] > 0


@pytest.mark.parametrize("tied", [False, True])
def test_fused_head_equals_model_head_and_skips_padding(tiny_config, tied):
    """The engine's head after fused layers: the first rows bit-identical to `model.head`
    (the same kernel and channel scales), the padding rows zero (the tied int8 embedding of
    the w8a8 recipe, and a w8a8 lm_head)."""
    import dataclasses

    cfg = dataclasses.replace(tiny_config, tie_word_embeddings=tied)
    model = quantize_model(Transformer(cfg, random_params(cfg, seed=3, scale=0.3)), "w8a8")
    x = jnp.asarray(np.random.default_rng(4).standard_normal((8, cfg.hidden_size), np.float32))
    want = np.asarray(jax.jit(model.head)(x))
    got = np.asarray(jax.jit(cpu_layer.head)(model, x, jnp.int32(5)))
    np.testing.assert_array_equal(got[:5], want[:5])
    assert not got[5:].any()
