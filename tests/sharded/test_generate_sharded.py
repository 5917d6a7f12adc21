"""Sharded runs against the single-device run: logits within float32 tolerance, greedy tokens
identical, on the four 8-device meshes [data, pipeline, tensor]."""

from __future__ import annotations

import numpy as np
import pytest

from jaxllm import JaxLLMError, SamplingParams
from jaxllm.config import ModelConfig
from jaxllm.generate import Generator
from jaxllm.model import Transformer, random_params
from jaxllm.sharded_run import shard_generator

# The default run takes two meshes (all three axes between them); the sweep is `slow`.
MESHES = [
    pytest.param((1, 1, 8), marks=pytest.mark.slow),
    (2, 1, 4),
    (2, 2, 2),
    pytest.param((1, 4, 2), marks=pytest.mark.slow),
]
IDS = [5, 17, 33, 2, 9, 100, 7, 250, 64]
PROMPTS = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [42], [200, 3]]


def mesh_text(shape):
    return "data={},pipeline={},tensor={}".format(*shape)


@pytest.fixture(scope="module")
def tiny_mesh():
    # 8 heads / 2 KV heads / 4 layers: every mesh above divides it (KV heads replicated
    # where tensor > 2). SmolLM2's 9 heads divide no tensor size of 2, 4 or 8.
    cfg = ModelConfig.from_yaml("tiny-mesh")
    params = random_params(cfg, seed=3, scale=0.3)
    ref = Generator(Transformer(cfg, params))
    sp = [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)] * len(PROMPTS)
    tokens = [g.token_ids for g in ref.generate(PROMPTS, sp)]
    return cfg, params, ref.logits(IDS), sp, tokens


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: mesh_text(s))
def test_sharded_logits_and_greedy_tokens_equal_single_device(tiny_mesh, shape):
    cfg, params, want_logits, sp, want_tokens = tiny_mesh
    gen = shard_generator(cfg, params, mesh_text(shape), max_batch=8)
    np.testing.assert_allclose(gen.logits(IDS), want_logits, rtol=1e-4, atol=1e-4)
    assert [g.token_ids for g in gen.generate(PROMPTS, sp)] == want_tokens


@pytest.mark.parametrize("shape", [(2, 1, 4), (2, 2, 2)], ids=lambda s: mesh_text(s))
def test_a_second_sharded_generator_compiles_nothing(tiny_mesh, shape):
    """Programs are shared per model structure and mesh (GPipe stages included): a second
    generator on new shards of the same weights gives the tokens of the single-device run
    and lowers no program."""
    from tests.test_generate import CompileCounter

    cfg, params, _, sp, want_tokens = tiny_mesh
    first = shard_generator(cfg, params, mesh_text(shape), max_batch=8)
    assert [g.token_ids for g in first.generate(PROMPTS, sp)] == want_tokens
    again = shard_generator(cfg, params, mesh_text(shape), max_batch=8)
    with CompileCounter() as counter:
        assert [g.token_ids for g in again.generate(PROMPTS, sp)] == want_tokens
    assert counter.names == []


@pytest.mark.slow
def test_sharded_sampling_matches_single_device(tiny_mesh):
    """Seeded sampling draws the same tokens: the logits agree and the keys are the same."""
    cfg, params, *_ = tiny_mesh
    sp = [SamplingParams(temperature=0.8, top_k=20, max_tokens=6, seed=i) for i in range(4)]
    want = [g.token_ids for g in Generator(Transformer(cfg, params)).generate(PROMPTS, sp)]
    gen = shard_generator(cfg, params, "data=2,tensor=4", max_batch=4)
    assert [g.token_ids for g in gen.generate(PROMPTS, sp)] == want


@pytest.mark.parametrize(
    "mesh, message",
    [
        ("tensor=8", "tensor=8 does not divide the 4 attention heads"),
        ("pipeline=4", "pipeline=4 does not divide the 2 layers"),
        ("data=2,tensor=2", "data=2 does not divide the batch of 3"),
        ("tensor=16", "needs 16 devices, only 8 are available"),
    ],
)
def test_a_mesh_that_does_not_fit_fails_before_compiling(tiny_config, mesh, message):
    params = random_params(tiny_config)
    with pytest.raises(JaxLLMError, match=message):
        shard_generator(tiny_config, params, mesh, max_batch=3)
