"""GPipe over the `pipeline` mesh axis: stages of consecutive layers, microbatches, ppermute.

The batch is cut into M microbatches (microbatch m = rows m, m + M, m + 2M, ..., so each one
still spans the `data` axis). Stage s works on microbatch t - s at tick t, for
M + S - 1 ticks; after each tick every stage hands its output to the next with one
collective-permute. Only `pipeline` is manual inside the shard_map: `data` and `tensor`
stay under jit's automatic partitioning, so a stage's layers run tensor-parallel unchanged.

Shapes: stage params [S, ...] (S = stages, sharded over `pipeline`); activations x [B, ...];
per-row inputs `rows` (positions, masks) [B, ...]; cache leaves [S, Ls, B, ...]
(Ls = layers per stage, B at axis 2).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec

AXIS = "pipeline"

StageFn = Callable[[Any, jax.Array, Any, Any, Any], tuple[jax.Array, Any]]


def bubble_fraction(stages: int, microbatches: int) -> float:
    """GPipe's idle share of stage-ticks: (S - 1) / (M + S - 1)."""
    return (stages - 1) / (microbatches + stages - 1)


def pick_microbatches(batch: int, data: int, wanted: int) -> int:
    """The largest M <= wanted that divides the per-data-shard batch (so each microbatch
    splits evenly over `data`)."""
    per_shard = max(1, batch // data)
    return max(m for m in range(1, max(1, min(wanted, per_shard)) + 1) if per_shard % m == 0)


def _split_rows(a: jax.Array, m: int, axis: int) -> jax.Array:
    """[..., B, ...] -> [..., B/M, M, ...]: microbatch index next to the row index."""
    return a.reshape(*a.shape[:axis], a.shape[axis] // m, m, *a.shape[axis + 1 :])


def _merge_rows(a: jax.Array, axis: int) -> jax.Array:
    return a.reshape(*a.shape[:axis], a.shape[axis] * a.shape[axis + 1], *a.shape[axis + 2 :])


def gpipe(
    stage_fn: StageFn,
    params: Any,
    x: jax.Array,
    rows: Any,
    cache: Any,
    shared: Any,
    *,
    mesh: Mesh,
    microbatches: int,
) -> tuple[jax.Array, Any]:
    """Run `stage_fn(stage_params, x_mb, rows_mb, cache_mb, shared) -> (y_mb, cache_mb)` on
    every stage in GPipe order. y has x's shape; returns (y [B, ...] on every stage, cache).

    stage_params leaves are [Ls, ...] (this stage's layers), cache_mb leaves [Ls, B/M, ...].
    """
    stages = dict(mesh.shape)[AXIS]
    m_count = microbatches
    if x.shape[0] % m_count:
        raise ValueError(f"microbatches={m_count} does not divide the batch of {x.shape[0]}")
    tmap = jax.tree.map

    def body(params, x, rows, cache, shared):
        params = tmap(lambda a: a[0], params)
        cache = tmap(lambda a: _split_rows(a[0], m_count, 1), cache)  # [Ls, B/M, M, ...]
        xs = _split_rows(x, m_count, 0)  # [B/M, M, ...]
        rows = tmap(lambda a: _split_rows(a, m_count, 0), rows)
        stage = lax.axis_index(AXIS)
        last = stage == stages - 1

        def take(a, i, axis):
            return lax.dynamic_index_in_dim(a, i, axis, keepdims=False)

        def tick(t, carry):
            held, outs, cache = carry
            mb = t - stage
            live = (mb >= 0) & (mb < m_count)
            mb = jnp.clip(mb, 0, m_count - 1)
            inp = jnp.where(stage == 0, take(xs, jnp.minimum(t, m_count - 1), 1), held)
            cache_mb = tmap(lambda a: take(a, mb, 2), cache)
            y, new_mb = stage_fn(
                params, inp, tmap(lambda a: take(a, mb, 1), rows), cache_mb, shared
            )
            # Bubble ticks compute on filler and must leave the cache as it was.
            new_mb = tmap(lambda n, o: jnp.where(live, n.astype(o.dtype), o), new_mb, cache_mb)
            cache = tmap(lambda a, u: lax.dynamic_update_index_in_dim(a, u, mb, 2), cache, new_mb)
            done = lax.dynamic_update_index_in_dim(outs, y.astype(outs.dtype), mb, 1)
            outs = jnp.where(live & last, done, outs)
            held = lax.ppermute(y, AXIS, [(i, i + 1) for i in range(stages - 1)])
            return held, outs, cache

        init = (jnp.zeros_like(take(xs, 0, 1)), jnp.zeros_like(xs), cache)
        _, outs, cache = lax.fori_loop(0, m_count + stages - 1, tick, init)
        y = lax.psum(outs, AXIS)  # only the last stage's is non-zero
        return _merge_rows(y, 0), tmap(lambda a: _merge_rows(a, 1)[None], cache)

    staged = PartitionSpec(AXIS)
    whole = PartitionSpec()
    fn = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(staged, whole, whole, staged, whole),
        out_specs=(whole, staged),
        axis_names={AXIS},
        check_vma=False,
    )
    return fn(params, x, rows, cache, shared)
