"""Serving engine against oracles: the static `generate` path's greedy tokens, a run without
prefix caching, separate seeded requests, and the block manager's own invariants."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxllm.engine import BlockManager, EngineConfig, LLMEngine
from jaxllm.errors import JaxLLMError
from jaxllm.generate import Generator
from jaxllm.model import Transformer, random_params
from jaxllm.sampling import SamplingParams
from tests.test_generate import CompileCounter


@pytest.fixture(scope="module")
def tiny(tiny_config):
    return tiny_config, random_params(tiny_config, seed=5, scale=0.3)


def workload(n=6, seed=0):
    rng = np.random.default_rng(seed)
    lens = [5, 40, 17, 3, 70, 33][:n]
    prompts = [[int(t) for t in rng.integers(3, 250, k)] for k in lens]
    params = [
        SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True)
        for m in (10, 5, 20, 8, 12, 3)[:n]
    ]
    return prompts, params


@pytest.fixture(scope="module")
def static_tokens(tiny):
    cfg, params = tiny
    prompts, sp = workload()
    return [g.token_ids for g in Generator(Transformer(cfg, params)).generate(prompts, sp)]


@pytest.mark.parametrize(
    "config",
    [
        # plain scheduling is slow: the chunked and preempting runs schedule plain steps too
        pytest.param(EngineConfig(num_pages=64, page_size=8), marks=pytest.mark.slow),
        EngineConfig(num_pages=64, page_size=8, max_num_batched_tokens=16),  # chunked prefill
        EngineConfig(num_pages=14, page_size=8, max_num_batched_tokens=32),  # preemption
    ],
    ids=["plain", "chunked", "preempt"],
)
def test_engine_greedy_equals_static_generate(tiny, static_tokens, config):
    cfg, params = tiny
    engine = LLMEngine(Transformer(cfg, params), config)
    prompts, sp = workload()
    done = engine.run(prompts, sp)
    assert [r.output for r in done] == static_tokens
    m = engine.metrics()
    assert m["kv_pages_free"] == m["kv_pages_total"]  # every page came back
    if config.num_pages == 14:
        assert m["preemptions"] > 0
    engine.blocks.check()


@pytest.mark.parametrize(
    "kv_dtype,weight_dtype",
    # f16 pages with f32 weights: slow (the default run has f16 pages under bf16 weights)
    [pytest.param("float16", None, marks=pytest.mark.slow), ("bfloat16", None),
     ("float16", "bfloat16")],
)  # fmt: skip
def test_engine_half_kv_cache_equals_static_generate(tiny, kv_dtype, weight_dtype):
    """Pages in float16/bfloat16 (read in place by the native CPU attention), and bfloat16
    weights: the engine's greedy tokens equal the static path's with the same dtypes."""
    from jaxllm import cpu_kernels

    cfg, params = tiny
    model = Transformer(cfg, params, weight_dtype=weight_dtype)
    prompts, sp = workload()
    want = [g.token_ids for g in Generator(model, cache_dtype=kv_dtype).generate(prompts, sp)]
    config = EngineConfig(num_pages=64, page_size=8, kv_cache_dtype=kv_dtype)
    engine = LLMEngine(model, config)
    assert engine.runner.pages[0][0].dtype == np.dtype(kv_dtype)
    assert engine.runner.split == (not cpu_kernels.available())  # native reads the pages
    assert [r.output for r in engine.run(prompts, sp)] == want


def test_engine_rejects_unknown_kv_cache_dtype():
    with pytest.raises(JaxLLMError, match="kv_cache_dtype='fp4'"):
        EngineConfig(kv_cache_dtype="fp4")


def test_prefix_cache_shares_pages_and_keeps_outputs(tiny):
    cfg, params = tiny
    rng = np.random.default_rng(1)
    system = [int(t) for t in rng.integers(3, 250, 256)]
    prompts = [system + [int(t) for t in rng.integers(3, 250, 5 + i)] for i in range(4)]
    sp = [SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)] * 4

    def run(caching):
        engine = LLMEngine(
            Transformer(cfg, params),
            EngineConfig(num_pages=128, page_size=16, enable_prefix_caching=caching),
        )
        first = engine.run(prompts[:1], sp[:1])  # computes the shared prefix once
        rest = engine.run(prompts[1:], sp[1:])
        return engine, first + rest

    cached_engine, cached = run(True)
    _, plain = run(False)
    assert [r.output for r in cached] == [r.output for r in plain]
    assert [r.metrics["cached_prompt_tokens"] for r in cached] == [0, 256, 256, 256]
    assert cached_engine.metrics()["prefix_cache_hit_tokens"] == 3 * 256


def test_seeded_request_is_independent_of_batch(tiny):
    cfg, params = tiny
    p = SamplingParams(temperature=0.9, top_p=0.9, max_tokens=12, seed=7, ignore_eos=True)
    alone = LLMEngine(Transformer(cfg, params), EngineConfig(num_pages=64, page_size=8))
    want = alone.run([[5, 6, 7, 8]], [p])[0].output
    crowd = LLMEngine(Transformer(cfg, params), EngineConfig(num_pages=64, page_size=8))
    prompts, sp = workload()
    got = crowd.run([*prompts[:3], [5, 6, 7, 8], *prompts[3:]], [*sp[:3], p, *sp[3:]])
    assert got[3].output == want


def test_bad_request_rejected_while_others_finish(tiny, static_tokens):
    cfg, params = tiny
    engine = LLMEngine(Transformer(cfg, params), EngineConfig(num_pages=64, page_size=8))
    prompts, sp = workload()
    rids = [engine.add_request(p, s) for p, s in zip(prompts, sp)]
    engine.step()
    engine.step()
    limit = cfg.max_position_embeddings
    with pytest.raises(JaxLLMError, match=f"exceeds the context of {limit} tokens"):
        engine.add_request([3] * limit, SamplingParams(max_tokens=4))
    with pytest.raises(JaxLLMError, match=r"token id 999 is out of range \[0, 256\)"):
        engine.add_request([1, 999], SamplingParams(max_tokens=4))
    while engine.has_unfinished():
        engine.step()
    assert [engine.requests[r].output for r in rids] == static_tokens


def test_abort_frees_pages_at_once(tiny):
    cfg, params = tiny
    engine = LLMEngine(Transformer(cfg, params), EngineConfig(num_pages=64, page_size=8))
    rid = engine.add_request(list(range(3, 60)), SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    assert engine.metrics()["kv_pages_used"] > 0
    assert engine.abort(rid)
    assert engine.metrics()["kv_pages_used"] == 0
    assert engine.requests[rid].status.value == "abort"
    assert not engine.has_unfinished()


def test_compilations_stay_within_buckets(tiny):
    """64 requests of mixed lengths: one program per (tokens, sequences, pages) bucket met,
    plus the page-copy program at most."""
    cfg, params = tiny
    rng = np.random.default_rng(3)
    prompts = [[int(t) for t in rng.integers(3, 250, rng.integers(1, 90))] for _ in range(64)]
    sp = [
        SamplingParams(temperature=0.0, max_tokens=int(rng.integers(1, 20)), ignore_eos=True)
        for _ in range(64)
    ]
    engine = LLMEngine(
        Transformer(cfg, params),
        EngineConfig(num_pages=256, page_size=16, max_num_batched_tokens=128, max_num_seqs=32),
    )
    with CompileCounter() as counter:
        engine.run(prompts, sp)
    step_programs = [n for n in counter.names if "step_impl" in n]
    # Programs are shared by engines on the same model structure: earlier tests' engines on
    # the tiny model may have compiled some of these buckets already.
    assert 0 < len(step_programs) <= len(engine.runner.compiled_shapes)
    # tokens {16..128} x sequences {1..32} x pages {1..8}, of which a workload meets few
    assert len(engine.runner.compiled_shapes) <= 20
    # A second engine (a new pool) on a model of the same structure compiles nothing for
    # the same workload, and gives the same tokens.
    again = LLMEngine(Transformer(cfg, params),
                      EngineConfig(num_pages=256, page_size=16, max_num_batched_tokens=128,
                                   max_num_seqs=32))  # fmt: skip
    with CompileCounter() as counter:
        done = again.run(prompts, sp)
    assert [n for n in counter.names if "step_impl" in n] == []
    assert [r.output for r in done] == [r.output for r in engine.run(prompts, sp)]


# ---------------------------------------------------------------------------------------------
# Block manager properties.


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 7), st.integers(1, 40)), max_size=60))
def test_block_manager_random_interleavings_keep_invariants(ops):
    """allocate / append / fork / free / abort in any order: no leak, no double free, refcounts
    match the tables, and once everything is freed the pool is whole again."""
    bm = BlockManager(num_pages=24, page_size=4)
    live: dict[str, list[int]] = {}  # seq -> its tokens so far
    counter = 0
    for op, who, n in ops:
        names = sorted(live)
        if op == 0 or not names:  # new sequence with a prompt (maybe sharing a prefix)
            name = f"s{counter}"
            counter += 1
            tokens = [who % 3] * (n // 2) + list(range(n - n // 2))
            cached = bm.allocate_prompt(name, tokens)
            assert cached % 4 == 0 and cached < len(tokens)
            if bm.can_allocate(name, len(tokens)):
                bm.allocate(name, len(tokens))
                bm.commit_full_pages(name, tokens)
                live[name] = tokens
            else:
                bm.free_seq(name)
        elif op in (1, 2):  # append tokens (decode), with copy-on-write if shared
            name = names[who % len(names)]
            tokens = live[name] + [n % 5] * (n % 3 + 1)
            if bm.can_allocate(name, len(tokens)):
                for src, dst in bm.allocate(name, len(tokens)):
                    assert src != dst and bm.ref[dst] == 1
                bm.commit_full_pages(name, tokens)
                live[name] = tokens
        elif op == 3:  # fork
            parent = names[who % len(names)]
            child = f"s{counter}"
            counter += 1
            bm.fork(parent, child)
            live[child] = list(live[parent])
        else:  # free or abort
            name = names[who % len(names)]
            bm.free_seq(name)
            del live[name]
        bm.check()
        for name, tokens in live.items():
            assert len(bm.table(name)) * 4 >= len(tokens)
    for name in list(live):
        bm.free_seq(name)
    bm.check()
    assert bm.num_free == bm.num_pages


def test_llm_generate_on_engine_equals_static_and_streams(smollm2):
    """SmolLM2: the engine-backed `generate` gives the static generator's greedy tokens for a
    batch of mixed prompts, and `stream` yields the same text in pieces."""
    prompts = ["The capital of France is", "def fib(n):", "Once upon a time"]
    p = SamplingParams(temperature=0.0, max_tokens=24)
    engine_outs = smollm2.generate(prompts, p)
    smollm2.use_engine = False
    try:
        static_outs = smollm2.generate(prompts, p)
    finally:
        smollm2.use_engine = True
    assert [o.token_ids for o in engine_outs] == [o.token_ids for o in static_outs]
    assert all(o.metrics["generated_tokens"] == len(o.token_ids) for o in engine_outs)
    pieces = list(smollm2.stream(prompts[0], p))
    assert len(pieces) > 1 and "".join(pieces) == engine_outs[0].text


# ---------------------------------------------------------------------------------------------
# The engine's CPU attention paths against the ragged paged reference (NaN in unused pages,
# out-of-range block-table entries past each length).


def _split_meta(kv_lens, q_lens, tables, t):
    from jaxllm.model import PagedMeta

    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    dec = [i for i, n in enumerate(q_lens) if n == 1]
    pre = [i for i, n in enumerate(q_lens) if n > 1]
    r = max([q_lens[i] for i in pre], default=0)
    pre_rows = np.full((len(pre), r), t, np.int32)
    for c, i in enumerate(pre):
        pre_rows[c, : q_lens[i]] = np.arange(cu[i], cu[i + 1])
    return PagedMeta(
        slot_mapping=np.zeros(t, np.int32),
        kv_lens=np.asarray(kv_lens, np.int32),
        block_tables=np.asarray(tables),
        cu_q_lens=cu,
        num_seqs=np.int32(len(kv_lens)),
        dec_rows=cu[dec].astype(np.int32),
        dec_seq=np.asarray(dec, np.int32),
        pre_rows=pre_rows,
        pre_seq=np.asarray(pre, np.int32),
    )


@pytest.mark.parametrize("native", [False, True], ids=["jnp-split", "native"])
def test_cpu_paged_attention_matches_reference(native):
    import jax.numpy as jnp

    from jaxllm import cpu_kernels
    from jaxllm.engine.cpu_attention import split_paged_attention
    from pallas_kernels.reference import ragged_paged_attention_reference
    from tests.test_kernels import max_err, ragged_inputs

    if native and not cpu_kernels.available():
        pytest.skip("no C++ compiler: the native kernel is not built")
    kv_lens, q_lens = [1, 37, 50, 20, 300], [1, 5, 50, 1, 300]
    q, kp, vp, lens, tables, cu = ragged_inputs(9, 3, 64, 16, kv_lens, q_lens, jnp.float32, pad=0)
    # jitted: op by op, each eager jnp op on a new shape is its own XLA compile
    ref = lambda *a: ragged_paged_attention_reference(*a, 5, sm_scale=0.125)
    want = jax.jit(ref)(q, kp, vp, lens, tables, cu)
    if native:
        got = cpu_kernels.paged_attention(q, kp, vp, lens, tables, cu, 5, sm_scale=0.125)
    else:
        meta = _split_meta(kv_lens, q_lens, tables, q.shape[0])
        split = lambda q, kp, vp, meta: split_paged_attention(q, kp, vp, meta, sm_scale=0.125)
        got = jax.jit(split)(q, kp, vp, meta)
    assert not np.isnan(np.asarray(got)).any()
    assert max_err(got, want) <= 2e-5


@pytest.mark.parametrize(
    "kv_heads,group,dim,page,kv_lens,q_lens",
    [
        (2, 1, 16, 8, [1, 33, 17], [1, 33, 1]),  # MHA, pages of 8: half-chunk tails
        (1, 4, 128, 32, [70, 5, 200], [70, 1, 3]),  # MQA, wide heads, pages of 32
        (2, 8, 32, 16, [16, 15, 48, 0], [16, 15, 1, 0]),  # chunk edges, an empty sequence
        (1, 2, 256, 16, [40, 9], [7, 1]),  # the widest head the kernel takes
    ],
)
def test_native_paged_attention_shapes(kv_heads, group, dim, page, kv_lens, q_lens):
    """The native kernel scores keys 16 at a time: page tails, GQA widths and head sizes
    against the jnp reference."""
    import jax.numpy as jnp

    from jaxllm import cpu_kernels
    from pallas_kernels.reference import ragged_paged_attention_reference
    from tests.test_kernels import max_err, ragged_inputs

    if not cpu_kernels.available():
        pytest.skip("no C++ compiler: the native kernel is not built")
    s = len(kv_lens)
    args = ragged_inputs(kv_heads * group, kv_heads, dim, page, kv_lens, q_lens, jnp.float32, pad=0)
    want = jax.jit(lambda *a: ragged_paged_attention_reference(*a, s, sm_scale=dim**-0.5))(*args)
    got = cpu_kernels.paged_attention(*args, s, sm_scale=dim**-0.5)
    assert max_err(got, want) <= 2e-5


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_native_paged_attention_half_pages(dtype):
    """float16/bfloat16 pages, converted in registers: equal to the reference on the same
    half-precision values widened to float32."""
    import jax.numpy as jnp

    from jaxllm import cpu_kernels
    from pallas_kernels.reference import ragged_paged_attention_reference
    from tests.test_kernels import max_err, ragged_inputs

    if not cpu_kernels.available():
        pytest.skip("no C++ compiler: the native kernel is not built")
    kv_lens, q_lens = [1, 37, 50, 20, 300], [1, 5, 50, 1, 300]
    q, kp, vp, lens, tables, cu = ragged_inputs(9, 3, 64, 16, kv_lens, q_lens, jnp.float32, pad=0)
    kp, vp = kp.astype(dtype), vp.astype(dtype)
    want = ragged_paged_attention_reference(
        q, kp.astype(jnp.float32), vp.astype(jnp.float32), lens, tables, cu, 5, sm_scale=0.125
    )
    got = cpu_kernels.paged_attention(q, kp, vp, lens, tables, cu, 5, sm_scale=0.125)
    assert got.dtype == jnp.float32
    assert max_err(got, want) <= 2e-5
