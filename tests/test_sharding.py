"""Mesh configs, the rule table, KV-head replication and the GPipe bookkeeping on one device;
and the 8-device suite (tests/sharded) in a subprocess, where the device-count flag can be
set before jax starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxllm import JaxLLMError
from jaxllm.generate import Generator
from jaxllm.model import Transformer, random_params
from jaxllm.parallel import load_mesh_config, param_axes, replicate_kv_heads
from sharding import rules
from sharding.mesh import MeshConfig, MeshError, check_divides, kv_replication
from sharding.pipeline import bubble_fraction, pick_microbatches

ROOT = Path(__file__).resolve().parent.parent


def test_mesh_config_from_flags_and_yaml():
    assert MeshConfig.parse("data=2,pipeline=1,tensor=4") == MeshConfig(2, 1, 4)
    assert MeshConfig.parse("tensor=8").shape == (1, 1, 8)
    for path in sorted((ROOT / "configs" / "mesh").glob("*.yaml")):
        cfg = load_mesh_config(path.stem)
        assert load_mesh_config(str(cfg)) == cfg and cfg.size in (1, 8)
    assert load_mesh_config("dp2-pp2-tp2") == MeshConfig(2, 2, 2)


@pytest.mark.parametrize(
    "text, message",
    [
        ("data=2,tensr=4", r"unknown mesh axes \['tensr'\]"),
        ("data=0", "data=0 must be a positive integer"),
        ("tensor=x", "bad mesh entry 'tensor=x'"),
        ("no-such-mesh", "not axis=size pairs, a YAML file or a known mesh"),
    ],
)
def test_bad_mesh_specs_raise_one_clear_error(text, message):
    with pytest.raises(JaxLLMError, match=message):
        load_mesh_config(text)


def test_divisibility_checks_name_the_value_and_the_limit():
    ok = dict(heads=9, kv_heads=3, layers=30, mlp=1536, batch=4)
    check_divides(MeshConfig(2, 2, 3), **ok)
    # 3 KV heads on 9 shards are replicated, not an error.
    check_divides(MeshConfig(1, 1, 9), **{**ok, "mlp": 9 * 128})
    for mesh, message in [
        (MeshConfig(1, 1, 2), "tensor=2 does not divide the 9 attention heads"),
        (MeshConfig(1, 1, 9), "tensor=9 does not divide the MLP width 1536"),
        (MeshConfig(1, 4, 1), "pipeline=4 does not divide the 30 layers"),
        (MeshConfig(8, 1, 1), "data=8 does not divide the batch of 4"),
    ]:
        with pytest.raises(MeshError, match=message):
            check_divides(mesh, **ok)


def test_rule_table_maps_logical_axes_to_megatron_splits():
    qkv = param_axes(("layers", 0, "attn", "qkv", "weight", "value"))
    assert rules.spec(qkv) == P("tensor", None)  # column-parallel
    assert rules.spec(param_axes(("layers", 0, "attn", "o", "weight"))) == P(None, "tensor")
    assert rules.spec(param_axes(("layers", 0, "mlp", "down", "weight"))) == P(None, "tensor")
    assert rules.spec(param_axes(("embed", "table"))) == P("tensor", None)  # vocab-parallel
    assert rules.spec(param_axes(("inv_freq", "value"))) == P(None)
    assert rules.spec((rules.STAGE, rules.LAYERS, *qkv)) == P("pipeline", None, "tensor", None)
    with pytest.raises(KeyError, match="no logical axes"):
        param_axes(("layers", 0, "attn", "new_thing", "weight"))


@pytest.mark.parametrize("kv, tensor, copies", [(3, 3, 1), (2, 8, 4), (3, 9, 3), (8, 4, 1)])
def test_kv_replication_factor(kv, tensor, copies):
    assert kv_replication(kv, tensor) == copies
    assert (kv * copies) % tensor == 0


def test_replicated_kv_heads_and_sharded_mlp_layout_compute_the_same_model(tiny_config):
    """Oracle: the plain model. Copying each KV head and laying gate/up out for 4 shards
    changes the arrays, not the function."""
    params = random_params(tiny_config, seed=4, scale=0.3)
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    want = Generator(Transformer(tiny_config, params)).logits(ids)
    cfg2, params2 = replicate_kv_heads(tiny_config, params, 2)
    assert cfg2.num_kv_heads == 4 and cfg2.group_size == 1
    got = Generator(Transformer(cfg2, params2, mlp_shards=4)).logits(ids)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bubble_fraction_counts_idle_stage_ticks():
    """Brute force: walk the GPipe schedule and count (stage, tick) slots with no microbatch."""
    for stages in (1, 2, 4):
        for micro in (1, 2, 6):
            ticks = micro + stages - 1
            idle = sum(1 for s in range(stages) for t in range(ticks) if not 0 <= t - s < micro)
            assert bubble_fraction(stages, micro) == pytest.approx(idle / (stages * ticks))
    assert pick_microbatches(batch=8, data=2, wanted=4) == 4
    assert pick_microbatches(batch=6, data=2, wanted=2) == 1  # 3 rows per data shard
    assert pick_microbatches(batch=2, data=2, wanted=4) == 1


def _run_sharded_suite(marker: str) -> None:
    env = dict(os.environ)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    env["JAX_PLATFORMS"] = "cpu"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", marker]
    proc = subprocess.run(
        [*cmd, str(ROOT / "tests" / "sharded")], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=3000,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-2000:]


def test_sharded_suite_on_8_host_devices():
    _run_sharded_suite("not slow")


@pytest.mark.slow
def test_sharded_suite_slow_part_on_8_host_devices():
    _run_sharded_suite("slow")


def test_plan_of_llama_70b_against_its_parameter_count():
    """Oracle: ModelConfig.num_params. With tensor=8 (which divides 8 KV heads and the
    vocab) every weight but the norms is split 8 ways."""
    from jaxllm.config import ModelConfig
    from jaxllm.plan import plan

    cfg = ModelConfig.from_yaml("llama-3.1-70b")
    p = plan("llama-3.1-70b", "data=2,tensor=8", "h100", batch=16, context=4096)
    e = cfg.hidden_size
    norms = (2 * cfg.num_layers + 1) * e
    want = 2 * ((cfg.num_params() - norms) / 8 + norms) + 4 * (cfg.head_dim // 2)
    assert p.param_bytes_per_device == want
    kv = 2 * cfg.num_layers * (16 // 2) * (cfg.num_kv_heads // 8) * 4096 * cfg.head_dim * 2
    assert p.kv_bytes_per_device == kv and p.fits and p.bound == "memory"
    # Memory-bound roofline: the step reads the weights and the cache once.
    read = (p.param_bytes_per_device + kv) / 3.35e12
    assert read < p.decode_step_s < read * 1.05
    with pytest.raises(JaxLLMError, match="tensor=3 does not divide the 64 attention heads"):
        plan("llama-3.1-70b", "tensor=3", "h100")


def test_plan_cli_json():
    import json

    cmd = [sys.executable, "-m", "jaxllm.cli", "plan", "--model", "llama-3.1-70b"]
    cmd += ["--mesh", "data=2,tensor=8", "--hardware", "tpu-v5p", "--batch", "16", "--json"]
    out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    from jaxllm.plan import plan

    want = plan("llama-3.1-70b", "data=2,tensor=8", "tpu-v5p", batch=16)
    assert out["param_bytes_per_device"] == want.param_bytes_per_device
    assert out["hardware"] == "tpu-v5p" and out["mesh"] == "data=2,pipeline=1,tensor=8"


def test_einsum_only_keeps_the_native_kernel_out_of_traced_programs():
    """Oracle: the einsum. Sharded programs trace under einsum_only (the FFI kernel has no
    sharding rule)."""
    import jax
    import jax.numpy as jnp

    from jaxllm import cpu_kernels

    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 64)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(1).standard_normal((32, 64)), jnp.float32)
    with cpu_kernels.einsum_only():
        assert not cpu_kernels.available()
        traced = str(jax.make_jaxpr(cpu_kernels.linear)(x, w))
        got = jax.jit(cpu_kernels.linear)(x, w)
    assert "ffi" not in traced
    np.testing.assert_allclose(got, cpu_kernels.einsum_linear(x, w), rtol=1e-6)
    # Outside the switch the kernel is used again (another shape: traces are cached by
    # function and shapes, not by the switch, which is why each sharded program has its own
    # jitted function).
    if cpu_kernels.available():
        assert "ffi" in str(jax.make_jaxpr(cpu_kernels.linear)(x[:1], w))
