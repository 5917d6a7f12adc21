"""The static generator and the serving engine run on a mesh, over a model placed by
`jaxllm.parallel.shard_model`.

- Without pipeline stages, the model's call is the Transformer's, with its inputs, KV cache
  and logits pinned to their shardings (`sharding.rules`); jit partitions the layers from
  the weights' placement (Megatron: two all-reduces per layer).
- With stages, embedding and head run as usual and the layers as GPipe stages
  (`sharding.pipeline.gpipe`); the KV cache is stacked [stages, layers/stage, B, K, S, D].
- Every program traces under `cpu_kernels.einsum_only()`, and sampled tokens come back
  replicated, so every process of a multi-host job can read them.

Axes as in jaxllm/model.py: batch B, positions T, cache slots S, KV heads K, head_dim D.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from jaxllm import cpu_kernels
from jaxllm.config import ModelConfig
from jaxllm.errors import JaxLLMError
from jaxllm.generate import Generator, GeneratorPrograms
from jaxllm.keyed_jit import KeyedJit
from jaxllm.model import Transformer, init_cache
from jaxllm.parallel import (
    CACHE_AXES,
    STAGED_CACHE_AXES,
    MeshLike,
    ShardedModel,
    mesh_config,
    resolve_mesh,
    shard_model,
)
from sharding import rules as R
from sharding.pipeline import gpipe, pick_microbatches


def _constrain(x: jax.Array, names: Sequence[str | None], mesh: Mesh) -> jax.Array:
    return jax.lax.with_sharding_constraint(x, R.named(names, mesh, x.shape))


class _ConstrainedModel:
    """The Transformer call with its inputs, cache and logits pinned to their shardings."""

    def __init__(self, model: Transformer, mesh: Mesh):
        self.model, self.mesh = model, mesh

    def __call__(self, tokens, positions, mask, cache=None, cache_index=None, last_only=False):
        m = self.mesh
        tokens = _constrain(tokens, (R.BATCH, R.LENGTH), m)
        positions = _constrain(positions, (R.BATCH, R.LENGTH), m)
        if mask is not None:
            mask = _constrain(mask, (R.BATCH, R.LENGTH, R.CACHE_LEN), m)
        if cache is not None:
            cache = jax.tree.map(lambda a: _constrain(a, CACHE_AXES, m), cache)
        logits, cache = self.model(tokens, positions, mask, cache, cache_index, last_only)
        cache = jax.tree.map(lambda a: _constrain(a, CACHE_AXES, m), cache)
        return _constrain(logits, (R.BATCH, R.LENGTH, R.VOCAB), m), cache


class _PipelinedModel:
    """The Transformer call with the layers run as GPipe stages."""

    def __init__(self, outer: Transformer, block_def, stages, mesh: Mesh, microbatches: int):
        self.outer, self.block_def, self.stages = outer, block_def, stages
        self.mesh, self.microbatches = mesh, microbatches

    def _stage(self, attention_fn: Callable[..., jax.Array]):
        block_def = self.block_def

        def run(layers, x, rows, cache, shared):
            positions, mask = rows
            inv_freq, cache_index = shared

            def layer(x, xs):
                p, kv = xs
                block = nnx.merge(block_def, p)
                x, kv = block(x, positions, inv_freq, mask, kv, cache_index, attention_fn)
                return x, kv

            if cache is None:
                x, _ = jax.lax.scan(lambda x, p: (layer(x, (p, None))[0], None), x, layers)
                return x, None
            return jax.lax.scan(layer, x, (layers, cache))

        return run

    def __call__(self, tokens, positions, mask, cache=None, cache_index=None, last_only=False):
        from jaxllm.attention import get_attention_fn

        m, outer = self.mesh, self.outer
        tokens = _constrain(tokens, (R.BATCH, R.LENGTH), m)
        x = outer.embed(tokens)
        if mask is None:
            t = tokens.shape[1]
            mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (tokens.shape[0], t, t))
        if cache is not None:
            cache = jax.tree.map(lambda a: _constrain(a, STAGED_CACHE_AXES, m), cache)
        micro = pick_microbatches(tokens.shape[0], dict(m.shape)["data"], self.microbatches)
        index = jnp.int32(0) if cache_index is None else jnp.asarray(cache_index, jnp.int32)
        x, cache = gpipe(
            self._stage(get_attention_fn(outer.attention)),
            self.stages, x, (positions, mask), cache, (outer.inv_freq[...], index),
            mesh=m, microbatches=micro,
        )  # fmt: skip
        if last_only:
            x = x[:, -1:]
        return _constrain(outer.head(x), (R.BATCH, R.LENGTH, R.VOCAB), m), cache


@dataclasses.dataclass(frozen=True)
class ShardedPrograms(GeneratorPrograms):
    """The generator's programs on a mesh: the model call pinned to its shardings (or run as
    GPipe stages), the cache placed on the mesh, XLA's dots instead of the native CPU kernel,
    and the sampled tokens replicated."""

    mesh: Mesh | None = None
    block_def: Any = None  # pipeline > 1: the graphdef shared by every layer
    microbatches: int = 0  # pipeline > 1

    @property
    def pipelined(self) -> bool:
        return self.block_def is not None

    def model(self, state):
        if self.pipelined:
            outer = nnx.merge(self.graphdef, state["outer"])
            return _PipelinedModel(
                outer, self.block_def, state["stages"], self.mesh, self.microbatches
            )
        return _ConstrainedModel(super().model(state), self.mesh)

    def new_cache(self, batch: int, length: int):
        if not self.pipelined:
            cache = init_cache(self.config, batch, length, self.cache_dtype)
            return jax.tree.map(lambda a: _constrain(a, CACHE_AXES, self.mesh), cache)
        mc = mesh_config(self.mesh)
        shape = (
            mc.pipeline, self.config.num_layers // mc.pipeline,
            batch, self.config.num_kv_heads, length, self.config.head_dim,
        )  # fmt: skip
        zeros = jnp.zeros(shape, self.cache_dtype)
        return tuple(_constrain(zeros, STAGED_CACHE_AXES, self.mesh) for _ in range(2))

    def cache_slots(self, cache) -> int:
        return cache[0].shape[4] if self.pipelined else cache[0][0].shape[2]

    # Tokens come back replicated: every process of a multi-host job can read them.
    def _whole(self, x: jax.Array) -> jax.Array:
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, R.spec(())))

    def prefill(self, *args):
        with cpu_kernels.einsum_only():
            cache, first = super().prefill(*args)
        return cache, self._whole(first)

    def decode(self, *args):
        with cpu_kernels.einsum_only():
            cache, out, n, steps = super().decode(*args)
        return cache, self._whole(out), self._whole(n), steps

    def forward(self, *args):
        with cpu_kernels.einsum_only():
            logits = super().forward(*args)
        return self._whole(logits) if jax.process_count() > 1 else logits


class ShardedGenerator(Generator):
    """The static generator over a mesh: the same programs, traced with sharded weights,
    batches padded to a multiple of `data`, and XLA's dots instead of the native CPU kernel."""

    def __init__(self, sharded: ShardedModel, *, max_batch: int = 64, microbatches: int = 0):
        self.mesh = sharded.mesh
        self.sharded = sharded
        data = mesh_config(sharded.mesh).data
        if max_batch % data:
            raise JaxLLMError(f"max_batch={max_batch} is not a multiple of data={data}")
        self.microbatches = 0
        if sharded.pipelined:
            self.microbatches = microbatches or mesh_config(sharded.mesh).pipeline
        super().__init__(sharded.model, max_batch=max_batch)
        self.config = sharded.config
        self.batch_multiple = data
        if sharded.pipelined:
            self.state = {"outer": self.state, "stages": sharded.stages}

    def _programs(self) -> ShardedPrograms:
        return ShardedPrograms(
            self.graphdef, self.sharded.config, self.cache_dtype, mesh=self.mesh,
            block_def=self.sharded.block_def if self.sharded.pipelined else None,
            microbatches=self.microbatches,
        )  # fmt: skip


def shard_generator(
    cfg: ModelConfig,
    params: dict[str, Any],
    mesh: MeshLike,
    *,
    dtype: Any = jnp.float32,
    attention: str = "xla",
    rope_factors: np.ndarray | None = None,
    max_batch: int = 64,
    microbatches: int = 0,
) -> ShardedGenerator:
    """Mesh, sharded weights and generator in one call (what `LLM(..., mesh=)` uses)."""
    mesh = resolve_mesh(mesh)
    sharded = shard_model(
        cfg, params, mesh, dtype=dtype, attention=attention, rope_factors=rope_factors,
        batch=max_batch,
    )  # fmt: skip
    return ShardedGenerator(sharded, max_batch=max_batch, microbatches=microbatches)


PAGE_AXES = (R.KV_HEADS, R.PAGES, None, R.HEAD_DIM)  # [K, pages, page_size, D]


def shard_engine(engine: Any, mesh: Mesh) -> Any:
    """Run a serving engine (`jaxllm.engine.LLMEngine`, built on a model from `shard_model`
    with pipeline == 1) on `mesh`: KV pages split by KV head over `tensor`, the step traced
    with XLA's ops (the jnp paged attention) and its sampled tokens replicated."""
    from jaxllm.attention import paged_uses_native_cpu, resolve_backend

    if mesh_config(mesh).pipeline != 1:
        raise JaxLLMError(
            f"the serving engine runs on meshes without pipeline stages, not {mesh_config(mesh)}"
        )
    runner = engine.runner
    page_sharding = jax.tree.map(lambda a: R.named(PAGE_AXES, mesh, a.shape), runner.pages)
    runner.pages = jax.device_put(runner.pages, page_sharding)
    with cpu_kernels.einsum_only():
        runner.split = resolve_backend(_runner_attention(engine)) == "xla" and not (
            paged_uses_native_cpu(
                engine.model_config.group_size,
                runner.page_size,
                jnp.float32,
                engine.model_config.head_dim,
            )
        )
    leaves, treedef = jax.tree.flatten(page_sharding)
    runner._step, runner._copy = _sharded_engine_programs(
        runner.graphdef, runner.state_def, mesh, tuple(leaves), treedef
    )
    return engine


@functools.lru_cache(maxsize=16)
def _sharded_engine_programs(
    graphdef, state_def, mesh: Mesh, page_leaves: tuple, page_treedef
) -> tuple:
    """The engine's jitted (step, page copy) on `mesh`, one pair per model structure and page
    placement (as `model_runner._step_program`): a second engine compiles nothing anew."""
    from jaxllm.engine.model_runner import copy_pages_impl, step_impl

    page_sharding = jax.tree.unflatten(page_treedef, page_leaves)
    impl = functools.partial(step_impl, graphdef, state_def)
    whole = NamedSharding(mesh, R.spec(()))

    def step(state, pages, *rest, **static):
        with cpu_kernels.einsum_only():
            pages, sampled = impl(state, pages, *rest, **static)
        return pages, jax.lax.with_sharding_constraint(sampled, whole)

    step_jit = KeyedJit(
        step,
        donate_argnums=(1,),
        static_argnames=("logprobs_k", "prompt_k", "penalties"),
        out_shardings=(page_sharding, whole),
    )
    copy_jit = jax.jit(copy_pages_impl, donate_argnums=(0,), out_shardings=page_sharding)
    return step_jit, copy_jit


def _runner_attention(engine: Any) -> str:
    state = jax.tree.unflatten(engine.runner.state_def, engine.runner.state)
    return nnx.merge(engine.runner.graphdef, state).attention
