"""The serving engine on a mesh (KV pages split by KV head over `tensor`) gives the
unsharded static generator's greedy tokens."""

from __future__ import annotations

import pytest
from jax.sharding import PartitionSpec as P

from jaxllm import JaxLLMError, SamplingParams
from jaxllm.config import ModelConfig
from jaxllm.engine import EngineConfig, LLMEngine
from jaxllm.generate import Generator
from jaxllm.model import Transformer, random_params
from jaxllm.parallel import resolve_mesh, shard_model
from jaxllm.sharded_run import shard_engine

PROMPTS = [[5, 6, 7], list(range(1, 40)), [42], [200, 3, 9, 9]]


@pytest.mark.parametrize(
    "mesh, prompts",
    [
        pytest.param("data=2,tensor=4", PROMPTS[2:], marks=pytest.mark.slow),
        pytest.param("tensor=8", PROMPTS, marks=pytest.mark.slow),
        pytest.param("data=2,tensor=4", PROMPTS, marks=pytest.mark.slow),
    ],
)
def test_engine_on_a_mesh_equals_static_generator(mesh, prompts):
    cfg = ModelConfig.from_yaml("tiny-mesh")
    params = random_params(cfg, seed=7, scale=0.3)
    sp = [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)] * len(prompts)
    want = [g.token_ids for g in Generator(Transformer(cfg, params)).generate(prompts, sp)]
    m = resolve_mesh(mesh)
    sharded = shard_model(cfg, params, m)
    config = EngineConfig(num_pages=32, page_size=8, max_num_batched_tokens=32)
    engine = shard_engine(LLMEngine(sharded.model, config), m)
    k_pages = engine.runner.pages[0][0]
    assert k_pages.sharding.spec == P("tensor", None, None, None)
    tensor = dict(m.shape)["tensor"]
    assert k_pages.addressable_shards[0].data.shape[0] == sharded.config.num_kv_heads // tensor
    # With the 39-token prompt over a 32-token budget, chunked prefill runs on the mesh too.
    assert [r.output for r in engine.run(prompts, sp)] == want


@pytest.mark.slow
def test_a_second_sharded_engine_compiles_nothing():
    """The sharded step is shared per model structure, mesh and page placement: a second
    engine (a new pool) on the mesh gives the static generator's tokens and lowers nothing."""
    from tests.test_generate import CompileCounter

    cfg = ModelConfig.from_yaml("tiny-mesh")
    params = random_params(cfg, seed=7, scale=0.3)
    prompts = PROMPTS[:2]
    sp = [SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)] * len(prompts)
    want = [g.token_ids for g in Generator(Transformer(cfg, params)).generate(prompts, sp)]
    m = resolve_mesh("data=2,tensor=4")
    sharded = shard_model(cfg, params, m)
    config = EngineConfig(num_pages=32, page_size=8, max_num_batched_tokens=64)
    assert [
        r.output for r in shard_engine(LLMEngine(sharded.model, config), m).run(prompts, sp)
    ] == want
    again = shard_engine(LLMEngine(sharded.model, config), m)
    with CompileCounter() as counter:
        assert [r.output for r in again.run(prompts, sp)] == want
    assert counter.names == []


def test_engine_refuses_pipeline_stages(tiny_config):
    m = resolve_mesh("pipeline=2")
    sharded = shard_model(tiny_config, random_params(tiny_config), m)
    with pytest.raises(JaxLLMError, match="without pipeline stages"):
        shard_engine(LLMEngine(sharded.model, EngineConfig(num_pages=8)), m)
