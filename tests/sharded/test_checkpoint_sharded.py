"""Orbax round trip of sharded weights, and restore onto other meshes. Oracle: the model
placed on the target mesh straight from the same host weights."""

from __future__ import annotations

import numpy as np
import pytest

from jaxllm import JaxLLMError
from jaxllm.checkpoints import orbax_io
from jaxllm.config import ModelConfig
from jaxllm.generate import Generator
from jaxllm.model import Transformer, random_params
from jaxllm.parallel import place, resolve_mesh, shard_model
from jaxllm.sharded_run import ShardedGenerator
from sharding.rules import named


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    cfg = ModelConfig.from_yaml("tiny-mesh")
    params = random_params(cfg, seed=5, scale=0.3)
    src = shard_model(cfg, params, resolve_mesh("data=2,tensor=4"))
    path = orbax_io.save(tmp_path_factory.mktemp("ckpt") / "tiny", src)
    return cfg, params, src, path


@pytest.mark.parametrize(
    "mesh",
    [
        pytest.param("tensor=8", marks=pytest.mark.slow),
        "pipeline=4,tensor=2",
        pytest.param("data=2,tensor=4", marks=pytest.mark.slow),
        pytest.param("data=2,pipeline=2,tensor=2", marks=pytest.mark.slow),
    ],
)
def test_restore_onto_any_mesh_gives_identical_params(saved, mesh):
    cfg, params, _, path = saved
    fresh = shard_model(cfg, params, resolve_mesh(mesh))
    like = shard_model(cfg, random_params(cfg, seed=99), resolve_mesh(mesh))
    restored = orbax_io.restore(path, like)
    assert orbax_io.same_params(restored, fresh)
    assert not orbax_io.same_params(like, fresh)  # the restore really replaced the weights


@pytest.mark.slow
def test_restored_model_generates_like_the_original(saved):
    cfg, params, _, path = saved
    like = shard_model(cfg, random_params(cfg, seed=99), resolve_mesh("pipeline=2,tensor=2"))
    gen = ShardedGenerator(orbax_io.restore(path, like), max_batch=2)
    ids = [3, 14, 15, 92, 65]
    want = Generator(Transformer(cfg, params)).logits(ids)
    np.testing.assert_allclose(gen.logits(ids), want, rtol=1e-4, atol=1e-4)


def test_restore_refuses_another_model(saved, tiny_config):
    *_, path = saved
    like = shard_model(tiny_config, random_params(tiny_config), resolve_mesh("tensor=2"))
    with pytest.raises(JaxLLMError, match="do not match the model's"):
        orbax_io.restore(path, like)


def test_placement_reads_only_each_device_shard():
    """Sharded loading: every callback asks for one shard, never the whole array."""
    mesh = resolve_mesh("data=2,tensor=4")
    host = np.arange(8 * 6, dtype=np.float32).reshape(8, 6)
    asked = []

    class Recording(np.ndarray):
        def __getitem__(self, idx):
            asked.append(np.empty(host.shape)[idx].shape)
            return np.asarray(host)[idx]

    arr = place(host.view(Recording), named(("vocab", "embed"), mesh))
    np.testing.assert_array_equal(np.asarray(arr), host)
    assert asked and all(shape == (2, 6) for shape in asked)
