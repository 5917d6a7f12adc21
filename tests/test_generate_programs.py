"""The static generator's programs are shared by every generator of the same model structure:
a second generator gives the first one's tokens and logits and lowers no program."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxllm.generate import Generator, programs_for
from jaxllm.model import Transformer, random_params
from jaxllm.sampling import SamplingParams
from tests.test_generate import CompileCounter

PROMPTS = [[5, 6, 7], list(range(1, 30)), [42, 9]]


def _run(gen: Generator):
    sp = [
        SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
        SamplingParams(temperature=0.8, top_k=20, max_tokens=9, seed=4),
        SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
    ]
    tokens = [g.token_ids for g in gen.generate(PROMPTS, sp)]
    return tokens, gen.logits(PROMPTS[1])


def test_a_second_generator_reuses_the_first_ones_programs(tiny_config):
    params = random_params(tiny_config, seed=11, scale=0.3)
    model = Transformer(tiny_config, params)
    first = Generator(model)
    want_tokens, want_logits = _run(first)
    # The same model, and a new model of the same structure (other weights give other tokens,
    # so it runs the first one's weights).
    for gen in (Generator(model), Generator(Transformer(tiny_config, params))):
        assert programs_for(gen.programs) is programs_for(first.programs)
        with CompileCounter() as counter:
            tokens, logits = _run(gen)
        assert counter.names == []
        assert tokens == want_tokens
        np.testing.assert_array_equal(logits, want_logits)


def test_another_cache_dtype_gets_its_own_programs(tiny_config):
    """Programs are shared only where they trace the same: a bfloat16-cache generator made
    after a float32 one on the same model still prefills into a bfloat16 cache."""
    from jaxllm.sampling import SamplingArrays

    model = Transformer(tiny_config, random_params(tiny_config, seed=11, scale=0.3))
    f32, bf16 = Generator(model), Generator(model, cache_dtype="bfloat16")
    tokens, starts = np.ones((1, 16), np.int32), np.zeros((1,), np.int32)
    sp = SamplingArrays.from_params([SamplingParams(temperature=0)], 1)
    for gen, dtype in ((f32, np.float32), (bf16, jnp.bfloat16)):
        cache, _ = gen._prefill(gen.state, tokens, starts, sp, 32)
        assert cache[0][0].dtype == dtype
