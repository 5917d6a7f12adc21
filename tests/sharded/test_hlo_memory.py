"""What the sharded programs compile to: the collectives Megatron TP and GPipe need (counted
in the optimized HLO), and the bytes of weights each device holds."""

from __future__ import annotations

import re

import numpy as np
import pytest
from flax import nnx

from jaxllm.config import ModelConfig
from jaxllm.model import Transformer, random_params
from jaxllm.parallel import device_bytes, replicate_kv_heads
from jaxllm.sharded_run import shard_generator


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig.from_yaml("tiny-mesh")
    return cfg, random_params(cfg, seed=1)


def collectives(gen) -> dict[str, int]:
    tokens = np.zeros((2, 16), np.int32)
    hlo = gen._forward.lower(gen.state, tokens).compile().as_text()
    kinds = ("all-reduce", "all-gather", "collective-permute", "reduce-scatter", "all-to-all")
    return {k: len(re.findall(rf"= \S+ {k}(?:-start)?\(", hlo)) for k in kinds}


def test_tensor_parallel_forward_has_two_all_reduces_per_layer(model):
    cfg, params = model
    ops = collectives(shard_generator(cfg, params, "data=2,tensor=4", max_batch=2))
    # Megatron: one after the row-parallel O projection, one after the down projection, per
    # layer; plus one for the vocab-parallel embedding lookup. No weight is ever gathered.
    assert ops["all-reduce"] == 2 * cfg.num_layers + 1
    assert ops["all-gather"] == ops["collective-permute"] == ops["all-to-all"] == 0


def test_pipeline_forward_passes_activations_by_collective_permute(model):
    cfg, params = model
    ops = collectives(shard_generator(cfg, params, "pipeline=2,tensor=2", max_batch=2))
    # The tick loop's body holds one permute (stage s -> s + 1) and the layer loop's body one
    # layer's two TP all-reduces; plus the embedding's and the psum of the last stage's output.
    assert ops["collective-permute"] == 1
    assert ops["all-reduce"] == 2 + 2
    assert ops["all-gather"] == 0


@pytest.mark.parametrize("mesh", ["tensor=8", "data=2,tensor=4", "data=2,pipeline=2,tensor=2"])
def test_per_device_parameter_bytes(model, mesh):
    """Each device holds 1/tensor of every TP-split weight (1/(tensor * pipeline) of the
    layers' with stages), counted from the arrays against the unsharded model's bytes."""
    cfg, params = model
    gen = shard_generator(cfg, params, mesh, max_batch=8)
    sizes = dict(p.split("=") for p in mesh.split(","))
    tp, pp = int(sizes.get("tensor", 1)), int(sizes.get("pipeline", 1))
    # The unsharded model at the run's shapes (KV heads replicated as the mesh needs).
    run_cfg = gen.config
    _, run_params = replicate_kv_heads(cfg, params, run_cfg.num_kv_heads // cfg.num_kv_heads)
    state = nnx.state(Transformer(run_cfg, run_params))
    whole = {"/".join(map(str, k)): v.nbytes for k, v in nnx.to_flat_state(state)}
    layer = sum(v for k, v in whole.items() if k.startswith("layers/") and "norm" not in k)
    norms = sum(v for k, v in whole.items() if k.startswith("layers/") and "norm" in k)
    head = whole["embed/table"] + whole["lm_head/weight"]
    rest = sum(whole.values()) - layer - norms - head
    want = layer / (tp * pp) + norms / pp + head / tp + rest
    got = set(device_bytes(gen.state).values())
    assert got == {want}
    assert run_cfg.num_kv_heads % tp == 0  # every tensor shard holds whole KV heads
