"""The model's attention backends agree: the Pallas flash kernel (interpret mode on CPU) against
the jnp reference, through full-sequence logits and through batched, left-padded generation
(prefill over a longer cache, then decode steps reading it in place)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxllm import SamplingParams
from jaxllm.attention import available_backends, get_attention_fn, resolve_backend
from jaxllm.errors import JaxLLMError
from jaxllm.generate import Generator
from jaxllm.model import Transformer, random_params


@pytest.fixture(scope="module")
def tiny_params(tiny_config):
    return random_params(tiny_config, seed=5, scale=0.3)


def test_flash_backend_logits_match_reference(tiny_config, tiny_params):
    ids = [3, 17, 250, 9, 9, 100, 42, 7, 1, 200, 31, 64, 5, 6, 7, 8, 9, 10, 11]
    want = Generator(Transformer(tiny_config, tiny_params, attention="xla")).logits(ids)
    got = Generator(Transformer(tiny_config, tiny_params, attention="flash")).logits(ids)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("backend", ["flash", "flash-prefill"])
def test_flash_backend_generation_matches_reference(tiny_config, tiny_params, backend):
    prompts = [
        [5, 9, 14, 3, 22, 7, 1],
        [40, 2],
        [8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8],
    ]
    p = [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)] * len(prompts)
    want = Generator(Transformer(tiny_config, tiny_params, attention="xla")).generate(prompts, p)
    got = Generator(Transformer(tiny_config, tiny_params, attention=backend)).generate(prompts, p)
    assert [g.token_ids for g in got] == [g.token_ids for g in want]


def test_flash_prefill_runs_one_token_steps_without_the_kernel(tiny_config, monkeypatch):
    """`flash-prefill` (auto on GPU): prefill goes to the flash kernel, decode steps do not."""
    import dataclasses

    import jaxllm.attention as attention

    # a one-layer model of its own: programs traced by other tests are not reused here
    cfg = dataclasses.replace(tiny_config, num_layers=1)
    steps = []
    flash = attention._flash

    def counted(q, *a, **kw):
        steps.append(q.shape[1])
        return flash(q, *a, **kw)

    monkeypatch.setattr(attention, "_flash", counted)
    model = Transformer(cfg, random_params(cfg, seed=1), attention="flash-prefill")
    p = [SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)]
    out = Generator(model).generate([[5, 9, 14]], p)
    assert len(out[0].token_ids) == 4
    assert steps and all(t > 1 for t in steps)  # traced for the prefill only


def test_backend_names():
    assert {"auto", "xla", "flash", "flash-prefill"} <= set(available_backends())
    want = {"cpu": "xla", "gpu": "flash-prefill"}.get(jax.default_backend(), "flash")
    assert resolve_backend("auto") == want
    assert get_attention_fn("auto") is get_attention_fn(want)
    with pytest.raises(JaxLLMError, match="unknown attention backend 'nope'"):
        resolve_backend("nope")
