"""The planner's per-device bytes against the arrays really placed on the CPU mesh."""

from __future__ import annotations

import jax
import pytest

from jaxllm.config import ModelConfig
from jaxllm.model import random_params
from jaxllm.parallel import device_bytes
from jaxllm.plan import kv_bytes_per_device, param_bytes_per_device
from jaxllm.sharded_run import shard_generator
from sharding.mesh import MeshConfig

CASES = [("tiny-mesh", s) for s in [(1, 1, 8), (2, 1, 4), (2, 2, 2), (1, 4, 2)]]
CASES += [("tiny", (2, 1, 4)), ("tiny", (2, 2, 2))]  # 4 heads / 2 KV heads / 2 layers


@pytest.mark.parametrize("name, shape", CASES)
def test_planned_bytes_equal_placed_bytes(name, shape):
    cfg = ModelConfig.from_yaml(name)
    mc = MeshConfig(*shape)
    gen = shard_generator(cfg, random_params(cfg), mc, max_batch=8)
    assert set(device_bytes(gen.state).values()) == {param_bytes_per_device(cfg, mc, "float32")}
    batch, context = 4, 64
    cache = jax.jit(lambda: gen._new_cache(batch, context))()
    want = kv_bytes_per_device(cfg, mc, batch, context, "float32")
    assert set(device_bytes(cache).values()) == {want}
