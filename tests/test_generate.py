"""Generation loop: batching, bucketing and stopping, against single-prompt and
full-recompute oracles on the tiny model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import JaxLLMError, SamplingParams
from jaxllm.generate import Generator, bucket
from jaxllm.model import Transformer, random_params


@pytest.fixture(scope="module")
def tiny_gen(tiny_config):
    return Generator(Transformer(tiny_config, random_params(tiny_config, seed=0, scale=0.3)))


def greedy_by_recompute(gen, ids, n):
    """Oracle: re-run the whole sequence without a cache for every new token."""
    ids = list(ids)
    out = []
    for _ in range(n):
        nxt = int(np.argmax(gen.logits(ids)[-1]))
        out.append(nxt)
        ids.append(nxt)
    return out


PROMPTS = [[5, 9, 3], list(range(10, 40)), [7], list(range(100, 117)), [200, 1, 2, 3, 4, 5]]


def test_cached_decode_equals_full_recompute(tiny_gen):
    for ids in PROMPTS[:3]:
        got = tiny_gen.generate([ids], [SamplingParams(temperature=0, max_tokens=12)])[0]
        assert got.token_ids == greedy_by_recompute(tiny_gen, ids, 12)


def test_batch_of_different_lengths_equals_each_alone(tiny_gen):
    params = SamplingParams(temperature=0, max_tokens=10)
    batch = tiny_gen.generate(PROMPTS, [params] * len(PROMPTS))
    for ids, got in zip(PROMPTS, batch):
        alone = tiny_gen.generate([ids], [params])[0]
        assert got.token_ids == alone.token_ids


def test_seeded_sampling_is_independent_of_batch(tiny_gen):
    mine = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=8, seed=42)
    other = SamplingParams(temperature=1.0, max_tokens=8, seed=7)
    alone = tiny_gen.generate([PROMPTS[1]], [mine])[0]
    mixed = tiny_gen.generate([PROMPTS[0], PROMPTS[1], PROMPTS[3]], [other, mine, other])[1]
    assert alone.token_ids == mixed.token_ids


def test_stop_tokens_and_max_tokens(tiny_gen):
    ids = PROMPTS[1]
    free = tiny_gen.generate([ids], [SamplingParams(temperature=0, max_tokens=12)])[0]
    assert len(free.token_ids) == 12 and free.finish_reason == "length"
    stop = free.token_ids[5]
    first = free.token_ids.index(stop)
    got = tiny_gen.generate(
        [ids], [SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop])]
    )[0]
    assert got.token_ids == free.token_ids[: first + 1]
    assert got.finish_reason == "stop"
    eos = tiny_gen.generate(
        [ids], [SamplingParams(temperature=0, max_tokens=12)], eos_token_ids=[stop]
    )[0]
    assert eos.token_ids == got.token_ids
    ignored = tiny_gen.generate(
        [ids],
        [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)],
        eos_token_ids=[stop],
    )[0]
    assert ignored.token_ids == free.token_ids


def test_rows_with_different_max_tokens(tiny_gen):
    outs = tiny_gen.generate(
        [PROMPTS[0], PROMPTS[1]],
        [SamplingParams(temperature=0, max_tokens=3), SamplingParams(temperature=0, max_tokens=9)],
    )
    assert [len(o.token_ids) for o in outs] == [3, 9]


class CompileCounter:
    """Counts programs lowered for our jitted functions via jax's compile monitoring events."""

    EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"

    def __init__(self):
        self.names: list[str] = []

    def __call__(self, event, duration, **kw):
        if event == self.EVENT:
            self.names.append(str(kw.get("fun_name", "")))

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self)


def test_ten_prompt_lengths_compile_one_program_per_bucket(tiny_config):
    gen = Generator(Transformer(tiny_config, random_params(tiny_config, seed=9)))
    lengths = [3, 5, 8, 11, 13, 16, 20, 25, 29, 31]  # prompt buckets 16 and 32
    max_tokens = 8
    with CompileCounter() as counter:
        for n in lengths:
            gen.generate([list(range(1, n + 1))], [SamplingParams(temperature=0, max_tokens=n)])
    prefill_buckets = {(bucket(n), bucket(bucket(n) + n)) for n in lengths}
    decode_buckets = {bucket(bucket(n) + n) for n in lengths}
    ours = [n for n in counter.names if "prefill" in n or "decode" in n]
    assert len(ours) <= len(prefill_buckets) + len(decode_buckets) < 2 * len(lengths)
    assert len(counter.names) == len(ours)  # nothing else compiled per call
    del max_tokens


def test_prompt_longer_than_context_is_rejected_and_others_unharmed(tiny_gen, tiny_config):
    limit = tiny_config.max_position_embeddings
    with pytest.raises(JaxLLMError, match=f"exceeds the context of {limit} tokens"):
        tiny_gen.generate([list(range(1, 100)) * 6], [SamplingParams(max_tokens=4)])
    with pytest.raises(JaxLLMError, match="prompt is empty"):
        tiny_gen.generate([[]], [SamplingParams()])
    with pytest.raises(JaxLLMError, match=r"token id 999 is out of range \[0, 256\)"):
        tiny_gen.generate([[1, 999]], [SamplingParams()])
    many = SamplingParams(max_tokens=4, stop_token_ids=list(range(10, 17)))
    with pytest.raises(JaxLLMError, match="7 stop_token_ids plus the model's 2 EOS ids make 9"):
        tiny_gen.generate([[1], [2]], [SamplingParams(), many], eos_token_ids=[2, 3])
    ok = tiny_gen.generate([PROMPTS[0]], [SamplingParams(temperature=0, max_tokens=5)])[0]
    assert ok.token_ids == greedy_by_recompute(tiny_gen, PROMPTS[0], 5)


def test_bfloat16_generation_agrees_with_float32_on_first_tokens(tiny_config):
    params = random_params(tiny_config, seed=0, scale=0.3)
    f32 = Generator(Transformer(tiny_config, params))
    bf16 = Generator(Transformer(tiny_config, params, dtype=jnp.bfloat16))
    p = SamplingParams(temperature=0, max_tokens=3)
    agree = [
        f32.generate([ids], [p])[0].token_ids[0] == bf16.generate([ids], [p])[0].token_ids[0]
        for ids in PROMPTS
    ]
    assert sum(agree) >= 4


def test_bucket():
    assert [bucket(n) for n in (1, 16, 17, 100, 128, 129)] == [16, 16, 32, 128, 128, 256]
    assert bucket(3, minimum=1) == 4
