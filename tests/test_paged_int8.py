"""Paged attention over int8 KV pages read in place (codes + per-token-per-head scales, the
`QuantizedKV` layout): the Pallas decode, ragged and TPU kernels (interpret mode on CPU) and the
jnp references with scales, each against the float reference on the dequantized pool; the
engine's paged path against the static int8 cache.

Pools come from `tests.test_kernels.make_paged` (shuffled pages, NaN in unused pages, garbage
in the tail slots of a last page); the scales of unused pages are NaN too, so a kernel that
touched one would return NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.quant.kv import QuantizedKV, quantize_kv
from pallas_kernels.paged_attention import paged_attention
from pallas_kernels.ragged_paged_attention import ragged_paged_attention
from pallas_kernels.reference import paged_attention_reference, ragged_paged_attention_reference
from tests.test_kernels import TOL, make_paged, max_err, normal


@jax.jit  # one program rather than an XLA compile per eager op
def int8_pool(pages: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """float pages [K, P, page, D] -> (int8 codes, scales [K, P, page], dequantized float32
    pool, the oracle's input); a slot holding NaN gets a NaN scale."""
    q = quantize_kv(pages)
    scale = jnp.where(jnp.isnan(pages.astype(jnp.float32)).any(-1), jnp.nan, q.scale)
    return q.values, scale, q.values.astype(jnp.float32) * scale[..., None]


def int8_paged(h, kh, d, page, lengths, seed=0):
    """((codes k, v, scales k, v), (dequantized k, v), lengths, tables, (float k, v))."""
    kp, vp, lens, tables = make_paged(h, kh, d, page, lengths, jnp.float32, seed=seed)
    (kc, ks, kd), (vc, vs, vd) = int8_pool(kp), int8_pool(vp)
    return (kc, vc, ks, vs), (kd, vd), lens, tables, (kp, vp)


def share_prefix(tables: np.ndarray, lens: np.ndarray, page: int) -> jax.Array:
    """Sequence 1 reads sequence 0's first whole pages as its own (a shared prompt prefix)."""
    tables = np.array(tables)
    n = min(int(lens[0]), int(lens[1])) // page
    tables[1, :n] = tables[0, :n]
    return jnp.asarray(tables)


def mixed_step():
    """One engine step over int8 pages: decode rows beside prefill chunks, GQA 3, two
    sequences sharing prefix pages, an unused sequence slot (4 slots, 3 used) and 3 padding
    rows. Returns (q [T, 9, 32], int8 pages and scales, dequantized pages, kv_lens, tables,
    cu_q_lens)."""
    h, kh, d, page = 9, 3, 32, 8
    kv_lens, q_lens = [1, 37, 29, 5], [1, 5, 29, 2]
    codes, floats, lens, tables, _ = int8_paged(h, kh, d, page, kv_lens)
    tables = share_prefix(tables, lens, page)
    cu = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
    q = normal(103, (int(cu[-1]) + 3, h, d), jnp.float32)
    return q, codes, floats, lens, tables, cu


# (heads, kv_heads, head_dim, page, lengths, q dtype, num_splits): GQA 4 and 3, MQA; ragged
# lengths with an empty sequence and a one-token one.
DECODE_CASES = [
    (8, 2, 64, 16, [0, 1, 37, 100], jnp.float32, 2),
    pytest.param(9, 3, 32, 8, [17, 40, 8], jnp.bfloat16, None, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("h,kh,d,page,lengths,dtype,splits", DECODE_CASES)
def test_paged_decode_over_int8_pages_matches_dequantized_pool(
    h, kh, d, page, lengths, dtype, splits
):
    (kc, vc, ks, vs), (kd, vd), lens, tables, (kp, vp) = int8_paged(h, kh, d, page, lengths)
    tables = share_prefix(tables, lens, page)
    q = normal(101, (len(lengths), h, d), dtype)

    @jax.jit  # one program: the kernel, the references and the float pages' oracle
    def run(q, kc, vc, ks, vs, kd, vd, kp, vp, lens, tables):
        ref = lambda q, k, v, **kw: paged_attention_reference(
            q, k, v, lens, tables, sm_scale=d**-0.5, **kw
        )
        got = paged_attention(q, kc, vc, lens, tables, k_scales=ks, v_scales=vs,
                              num_splits=splits, pages_per_block=2)  # fmt: skip
        want = ref(q.astype(jnp.float32), kd, vd)
        scaled_ref = ref(q, kc, vc, k_scales=ks, v_scales=vs)
        return got, want, scaled_ref, ref(q, kp.astype(dtype), vp.astype(dtype))

    got, want, ref, exact = run(q, kc, vc, ks, vs, kd, vd, kp, vp, lens, tables)
    assert got.dtype == dtype
    got = np.asarray(got, np.float32)
    assert not np.isnan(got).any()
    assert max_err(got, want) <= TOL[dtype]
    assert max_err(ref, want) <= TOL[dtype]
    assert np.all(got[np.asarray(lens) == 0] == 0.0)
    # The quantization itself: close to attention over the float pages it came from.
    assert max_err(got, exact) <= 0.03


@pytest.mark.slow  # the TPU interpreter is 35-140x slower than the GPU-style one
def test_tpu_paged_decode_over_int8_pages_interpret():
    """The TPU kernel's int8 path under the TPU interpreter, which raises on any DMA of a page
    past a sequence's end; the scale rows travel in their own DMAs."""
    (kc, vc, ks, vs), (kd, vd), lens, tables, _ = int8_paged(9, 3, 128, 16, [0, 1, 37, 70])
    tables = share_prefix(tables[1:], lens[1:], 16)
    q = normal(102, (3, 9, 128), jnp.float32)
    want = paged_attention_reference(q, kd, vd, lens[1:], tables, sm_scale=128**-0.5)
    got = paged_attention(
        q, kc, vc, lens[1:], tables, k_scales=ks, v_scales=vs, platform="tpu", interpret=True
    )
    assert max_err(got, want) <= TOL[jnp.float32]


@pytest.mark.parametrize("window", [None, pytest.param(11, marks=pytest.mark.slow)])
def test_ragged_over_int8_pages_matches_dequantized_pool(window):
    """Mixed step: decode rows beside prefill chunks, GQA 3, two sequences sharing prefix
    pages, an unused sequence slot and padding rows; with and without a sliding window."""
    q, (kc, vc, ks, vs), (kd, vd), lens, tables, cu = mixed_step()
    d = q.shape[-1]

    @jax.jit  # one program: the kernel and both references
    def run(q, kc, vc, ks, vs, kd, vd, lens, tables, cu):
        kw = dict(sm_scale=d**-0.5, sliding_window=window)
        want = ragged_paged_attention_reference(q, kd, vd, lens, tables, cu, 3, **kw)
        got = ragged_paged_attention(
            q, kc, vc, lens, tables, cu, 3, k_scales=ks, v_scales=vs, sliding_window=window,
            block_q=4, pages_per_block=2,
        )  # fmt: skip
        ref = ragged_paged_attention_reference(
            q, kc, vc, lens, tables, cu, 3, k_scales=ks, v_scales=vs, **kw
        )
        return got, want, ref

    got, want, ref = map(np.asarray, run(q, kc, vc, ks, vs, kd, vd, lens, tables, cu))
    assert not np.isnan(got).any()
    assert max_err(got, want) <= TOL[jnp.float32]
    assert np.all(got[int(cu[3]) :] == 0.0)  # unused slot and padding
    assert max_err(ref, want) <= TOL[jnp.float32]


def test_int8_kernels_lower_for_cuda_and_tpu():
    """The int8 variants go through the real Triton and Mosaic TPU lowerings (run at lower
    time, no accelerator needed)."""
    S, i32 = jax.ShapeDtypeStruct, jnp.int32
    pages, scales = S((2, 64, 16, 128), jnp.int8), S((2, 64, 16), jnp.float32)
    q = S((4, 8, 128), jnp.bfloat16)

    def lower(platform, f, *args):
        return jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)).as_text()

    def dec(platform):
        return lambda q, k, v, n, t, ks, vs: paged_attention(
            q, k, v, n, t, k_scales=ks, v_scales=vs, interpret=False, platform=platform
        )

    args = (q, pages, pages, S((4,), i32), S((4, 16), i32), scales, scales)
    assert "paged_attention_int8" in lower("cuda", dec("gpu"), *args)
    assert "tpu_custom_call" in lower("tpu", dec("tpu"), *args)
    rag = lambda q, k, v, n, t, cu, ks, vs: ragged_paged_attention(
        q, k, v, n, t, cu, 4, k_scales=ks, v_scales=vs, interpret=False, platform="gpu"
    )
    args = (S((64, 8, 128), jnp.bfloat16), pages, pages, S((4,), i32), S((4, 16), i32),
            S((5,), i32), scales, scales)  # fmt: skip
    assert "ragged_paged_attention_int8" in lower("cuda", rag, *args)


def test_int8_pages_without_scales_are_refused():
    kp, vp, lens, tables = make_paged(4, 2, 32, 8, [9], jnp.float32)
    (kc, ks, _), (vc, _, _) = int8_pool(kp), int8_pool(vp)
    q = jnp.zeros((1, 4, 32), jnp.float32)
    with pytest.raises(ValueError, match=r"int8 pages need k_scales and v_scales"):
        paged_attention(q, kc, vc, lens, tables)
    with pytest.raises(ValueError, match=r"got \(2, \d+, 8\) and None"):
        ragged_paged_attention(q, kc, vc, lens, tables, jnp.asarray([0, 1]), 1, k_scales=ks)


def test_engine_paged_backend_passes_int8_pages_to_the_kernel():
    """The engine's `flash`/`paged` attention hands the int8 pool to the Pallas kernel as it is:
    the traced step holds int8 operands of the pool's shape and no float array that size."""
    from jaxllm.attention import get_paged_attention_fn
    from tests.test_engine import _split_meta

    kh, pages, page, d = 2, 12, 8, 16
    pool = QuantizedKV(jnp.zeros((kh, pages, page, d), jnp.int8), jnp.ones((kh, pages, page)))
    meta = _split_meta([9, 3], [9, 1], np.asarray([[0, 1], [2, 0]]), 10)
    q = jnp.zeros((10, 4, d), jnp.float32)
    fn = get_paged_attention_fn("paged")
    jaxpr = jax.make_jaxpr(lambda q, k, v, m: fn(q, k, v, m, sm_scale=0.25))(q, pool, pool, meta)
    kernels = [e for e in jaxpr.eqns if e.primitive.name == "pallas_call"]
    assert len(kernels) == 1
    operands = [(v.aval.dtype, v.aval.shape) for v in kernels[0].invars]
    assert operands.count((jnp.dtype(jnp.int8), pool.shape)) == 2
    whole_pool = {pool.shape, (kh, pages * page, d)}  # what dequantizing the pool would make
    floats = [
        v.aval.shape
        for e in jaxpr.eqns
        for v in e.outvars
        if jnp.issubdtype(v.aval.dtype, jnp.floating) and v.aval.shape in whole_pool
    ]
    assert floats == [], floats


def test_engine_kv_int8_on_paged_kernel_equals_static_int8_cache(tiny_config):
    """Greedy tokens of the engine (ragged Pallas kernel over int8 pages) equal the static
    generator's over its int8 cache. With a budget of 8 tokens the second step holds the first
    prompt's decode row beside the second prompt's last prefill chunk; the shapes are chosen
    so the engine compiles two step programs only (the kernel interprets on CPU)."""
    from jaxllm.engine import EngineConfig, LLMEngine
    from jaxllm.generate import Generator
    from jaxllm.model import Transformer, random_params
    from jaxllm.quant.apply import quantize_model
    from jaxllm.sampling import SamplingParams

    params = random_params(tiny_config, seed=5, scale=0.3)
    prompts = [[5, 9, 13], list(range(5, 15))]
    sp = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (5, 4)]
    static = Generator(quantize_model(Transformer(tiny_config, params), "kv-int8"))
    want = [g.token_ids for g in static.generate(prompts, sp)]
    model = quantize_model(Transformer(tiny_config, params, attention="paged"), "kv-int8")
    engine = LLMEngine(model, EngineConfig(num_pages=8, page_size=16, max_num_batched_tokens=8))
    got = [r.output for r in engine.run(prompts, sp)]
    assert got == want
    assert isinstance(engine.runner.pages[0][0], QuantizedKV)
    assert engine.runner.pages[0][0].values.dtype == jnp.int8


def test_native_cpu_kernel_over_int8_pages_matches_dequantized_pool():
    """The native CPU kernel (`paged_attention.cc`, the engine's `xla` backend on CPU) reads
    int8 pages and their scales in place: equal to the float reference on the dequantized
    pool, with shared prefix pages, an unused sequence slot and padding rows (NaN scales in
    unused pages: the kernel never reads them)."""
    from jaxllm import cpu_kernels

    if not cpu_kernels.available():
        pytest.skip("no C++ compiler: the native kernel is not built")
    q, (kc, vc, ks, vs), (kd, vd), lens, tables, cu = mixed_step()
    d = q.shape[-1]
    want = ragged_paged_attention_reference(q, kd, vd, lens, tables, cu, 3, sm_scale=d**-0.5)
    got = cpu_kernels.paged_attention(
        q, QuantizedKV(kc, ks), QuantizedKV(vc, vs), lens, tables, cu, 3, sm_scale=d**-0.5
    )
    assert not bool(jnp.isnan(got).any())
    assert max_err(got, want) <= TOL[jnp.float32]
    assert float(jnp.max(jnp.abs(got[int(cu[3]) :]))) == 0.0


def test_engine_kv_int8_on_native_cpu_kernel_equals_static_int8_cache(tiny_config):
    """The engine's default CPU attention over int8 pages (the native kernel, no jnp split)
    gives the static generator's greedy tokens over its int8 cache."""
    from jaxllm import cpu_kernels
    from jaxllm.engine import EngineConfig, LLMEngine
    from jaxllm.generate import Generator
    from jaxllm.model import Transformer, random_params
    from jaxllm.quant.apply import quantize_model
    from jaxllm.sampling import SamplingParams

    if not cpu_kernels.available():
        pytest.skip("no C++ compiler: the native kernel is not built")
    params = random_params(tiny_config, seed=5, scale=0.3)
    prompts = [[5, 9, 13], list(range(5, 15))]  # as above: two step programs
    sp = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (5, 4)]
    static = Generator(quantize_model(Transformer(tiny_config, params), "kv-int8"))
    want = [g.token_ids for g in static.generate(prompts, sp)]
    model = quantize_model(Transformer(tiny_config, params), "kv-int8")
    engine = LLMEngine(model, EngineConfig(num_pages=8, page_size=16, max_num_batched_tokens=8))
    assert not engine.runner.split  # the native kernel needs no decode/prefill split
    got = [r.output for r in engine.run(prompts, sp)]
    assert got == want
