"""Sharding on the 8-device host mesh: per-device parameter memory on each mesh (measured
from the placed arrays, next to the planner's figure) and the GPipe bubble.

Bubble, measured: the pipelined forward runs bubble ticks on filler, and a host mesh's
devices share the same cores, so its time over that of the useful work (M unpipelined
passes over B/M rows) is (M + S - 1) / M when every tick costs the same. Measured bubble =
1 - T_useful / T_pipelined, next to the theoretical (S - 1) / (M + S - 1).

    python benchmarks/mesh_bench.py
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)

import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxllm.config import ModelConfig  # noqa: E402
from jaxllm.model import random_params  # noqa: E402
from jaxllm.parallel import device_bytes  # noqa: E402
from jaxllm.plan import param_bytes_per_device  # noqa: E402
from jaxllm.sharded_run import shard_generator  # noqa: E402
from sharding.mesh import MeshConfig  # noqa: E402
from sharding.pipeline import bubble_fraction  # noqa: E402


def memory_table() -> None:
    print("| model | mesh | params/device measured MB | planner MB | total/device |")
    print("|---|---|---|---|---|")
    for name, meshes in [
        ("smollm2-135m", [(1, 1, 1), (2, 1, 3), (1, 2, 3), (1, 3, 1), (2, 3, 1)]),
        ("tiny-mesh", [(1, 1, 1), (1, 1, 8), (2, 1, 4), (2, 2, 2), (1, 4, 2)]),
    ]:
        cfg = ModelConfig.from_yaml(name)
        params = random_params(cfg)
        whole = None
        for shape in meshes:
            mc = MeshConfig(*shape)
            gen = shard_generator(cfg, params, mc, max_batch=8)
            got = device_bytes(gen.state)
            assert len(set(got.values())) == 1
            measured = next(iter(got.values()))
            whole = whole or measured
            plan = param_bytes_per_device(cfg, mc, "float32")
            print(f"| {name} | {mc} | {measured / 1e6:.3f} | {plan / 1e6:.3f} | "
                  f"{measured / whole:.3f} |")  # fmt: skip


def timed(fn, *args, reps: int = 3) -> float:
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def bubble_table() -> None:
    cfg = ModelConfig.from_yaml("smollm2-135m").replace(num_layers=12)
    params = random_params(cfg)
    batch, seq = 8, 64
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq), np.int32)
    flat = shard_generator(cfg, params, MeshConfig(1, 1, 1), max_batch=batch)
    # The useful work at microbatch granularity: M unpipelined passes over B/M rows.
    useful = {m: m * timed(flat._forward, flat.state, tokens[: batch // m]) for m in MICRO}
    print(f"\nforward [{batch} x {seq}], {cfg.num_layers} layers of SmolLM2 shape, float32")
    print("| stages S | microbatches M | M x unpipelined(B/M) ms | pipelined ms "
          "| bubble measured | (S-1)/(M+S-1) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for stages in (2, 4):
        for micro in MICRO:
            gen = shard_generator(
                cfg, params, MeshConfig(1, stages, 1), max_batch=batch, microbatches=micro
            )
            t = timed(gen._forward, gen.state, tokens)
            theory = bubble_fraction(stages, micro)
            print(f"| {stages} | {micro} | {useful[micro] * 1e3:.0f} | {t * 1e3:.0f} | "
                  f"{1 - useful[micro] / t:.3f} | {theory:.3f} |")  # fmt: skip


MICRO = (1, 2, 4, 8)


if __name__ == "__main__":
    import sys

    if "--bubble-only" not in sys.argv:
        memory_table()
    bubble_table()
