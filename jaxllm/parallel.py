"""The model's weights on a (data, pipeline, tensor) mesh: mesh specs, logical axes for every
parameter, and placement straight onto shards (`jaxllm.sharded_run` runs what this places).

- Tensor parallelism is Megatron's, by the rule table in `sharding.rules`: the fused QKV rows
  split by KV head, gate/up by MLP channel (the MLP lays its rows out for that), O and down by
  their inputs, the embedding and output head by vocab row.
- When `tensor` does not divide the KV heads, each KV head is copied (MaxText's way) so that
  every tensor shard holds whole KV heads: the model then runs with K * r KV heads of
  G / r query heads each, the same function of the same weights.
- With `pipeline` > 1 the layers are stacked per stage, [stages, layers/stage, ...], for the
  GPipe schedule in `sharding.pipeline`; embedding and head stay whole on every stage.

Axes as in jaxllm/model.py: batch B, positions T, cache slots S, embed E, KV heads K.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from jaxllm.config import ModelConfig, find_config, known_configs
from jaxllm.errors import JaxLLMError
from jaxllm.model import Transformer
from sharding import rules as R
from sharding.mesh import MeshConfig, MeshError, check_divides, kv_replication, make_mesh

MeshLike = str | MeshConfig | Mesh

# Logical axes of the Transformer's parameters, by the last two names of their nnx path.
_PARAM_AXES: dict[tuple[str, str], tuple[str | None, ...]] = {
    ("embed", "table"): (R.VOCAB, R.EMBED),
    ("lm_head", "weight"): (R.VOCAB, R.EMBED),
    ("qkv", "weight"): (R.QKV, R.EMBED),
    ("qkv", "bias"): (R.QKV,),
    ("o", "weight"): (R.EMBED, R.HEADS),
    ("gate_up", "weight"): (R.MLP, R.EMBED),
    ("down", "weight"): (R.EMBED, R.MLP),
    ("attn_norm", "weight"): (R.EMBED,),
    ("mlp_norm", "weight"): (R.EMBED,),
    ("final_norm", "weight"): (R.EMBED,),
    ("inv_freq",): (None,),
}
CACHE_AXES = (R.BATCH, R.KV_HEADS, R.CACHE_LEN, R.HEAD_DIM)  # [B, K, S, D]
STAGED_CACHE_AXES = (R.STAGE, R.LAYERS, *CACHE_AXES)  # [stages, layers/stage, B, K, S, D]


def _mesh_error(e: MeshError) -> JaxLLMError:
    return JaxLLMError(str(e))


def load_mesh_config(spec: str | os.PathLike) -> MeshConfig:
    """From `data=2,tensor=4`, a configs/mesh name (`dp2-tp4`) or a YAML path."""
    text = str(spec)
    try:
        if "=" in text:
            return MeshConfig.parse(text)
        path = find_config("mesh", text)
        if path is None:
            known = known_configs("mesh")
            raise JaxLLMError(
                f"mesh {text!r} is not axis=size pairs, a YAML file or a known mesh "
                f"({', '.join(known)})"
            )
        return MeshConfig.from_dict(yaml.safe_load(path.read_text()) or {})
    except MeshError as e:
        raise _mesh_error(e) from None


def resolve_mesh(mesh: MeshLike, devices: Sequence[Any] | None = None) -> Mesh:
    """A Mesh from a spec string, a MeshConfig or a Mesh (returned as is)."""
    if isinstance(mesh, Mesh):
        missing = set(mesh.axis_names) - {"data", "pipeline", "tensor"}
        if missing:
            raise JaxLLMError(f"mesh axes {sorted(missing)} are not data, pipeline or tensor")
        return mesh
    cfg = mesh if isinstance(mesh, MeshConfig) else load_mesh_config(mesh)
    try:
        return make_mesh(*cfg.shape, devices=devices)
    except MeshError as e:
        raise _mesh_error(e) from None


def mesh_config(mesh: Mesh) -> MeshConfig:
    return MeshConfig.of(mesh)


def check_model_fits(cfg: ModelConfig, mesh: Mesh, batch: int | None = None) -> None:
    """JaxLLMError unless the mesh divides heads, MLP width, layers and the batch."""
    try:
        check_divides(
            mesh_config(mesh),
            heads=cfg.num_heads,
            kv_heads=cfg.num_kv_heads,
            layers=cfg.num_layers,
            mlp=cfg.intermediate_size,
            batch=batch,
        )
    except MeshError as e:
        raise JaxLLMError(f"model {cfg.name!r} on mesh {mesh_config(mesh)}: {e}") from None


def replicate_kv_heads(
    cfg: ModelConfig, params: dict[str, Any], copies: int
) -> tuple[ModelConfig, dict[str, Any]]:
    """Canonical params with each KV head's wk/wv (and biases) repeated `copies` times in a
    row, and the config that says so. Query head h of group k now reads copy
    h // (G / copies) of KV head k: the same attention as before."""
    if copies == 1:
        return cfg, params
    d = cfg.head_dim

    def rep(w: np.ndarray) -> np.ndarray:  # [..., K*D] -> [..., K*copies*D]
        heads = w.reshape(*w.shape[:-1], cfg.num_kv_heads, d)
        return np.repeat(heads, copies, axis=-2).reshape(*w.shape[:-1], -1)

    layers = []
    for p in params["layers"]:
        p = dict(p)
        for name in ("wk", "wv", "bk", "bv"):
            if name in p:
                p[name] = rep(p[name])
        layers.append(p)
    return cfg.replace(num_kv_heads=cfg.num_kv_heads * copies), {**params, "layers": layers}


def param_axes(path: Sequence[Any]) -> tuple[str | None, ...]:
    """Logical axes of the Transformer parameter at nnx state `path`."""
    names = [str(p) for p in path]
    if names and names[-1] == "value":  # the nnx Variable's payload
        names = names[:-1]
    key = tuple(names[-2:]) if tuple(names[-2:]) in _PARAM_AXES else tuple(names[-1:])
    if key not in _PARAM_AXES:
        raise KeyError(f"no logical axes for parameter {'/'.join(map(str, path))}")
    return _PARAM_AXES[key]


def place(host: Any, sharding: NamedSharding) -> jax.Array:
    """Copy each device's shard from a host array; no device ever holds the whole array.

    `host` is anything with `.shape` and numpy slicing (an ndarray, a memmap), read one
    shard at a time."""
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def _host_model(cfg, params, *, dtype, attention, rope_factors, mlp_shards) -> Transformer:
    """The model with its weights in host memory (the CPU backend), to be sliced onto shards."""
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        return Transformer(
            cfg, params, dtype=dtype, attention=attention, rope_factors=rope_factors,
            mlp_shards=mlp_shards,
        )  # fmt: skip


def _place_state(state: Any, mesh: Mesh, prefix: tuple[str, ...] = ()) -> Any:
    def put(path, leaf):
        keys = [getattr(k, "key", getattr(k, "name", k)) for k in path]
        names = prefix + param_axes(keys)
        return place(np.asarray(leaf), R.named(names, mesh, np.shape(leaf)))

    return jax.tree_util.tree_map_with_path(put, state)


@dataclasses.dataclass
class ShardedModel:
    """What `shard_model` makes: the model (pipeline == 1) or its parts (pipeline > 1)."""

    config: ModelConfig  # as run: KV heads counted after replication
    mesh: Mesh
    model: Transformer  # pipeline > 1: embedding, norm and head only (no layers)
    block_def: Any = None  # pipeline > 1: the graphdef shared by every layer
    stages: Any = None  # pipeline > 1: layer params stacked [stages, layers/stage, ...]
    kv_copies: int = 1  # copies of each KV head (see replicate_kv_heads)

    @property
    def pipelined(self) -> bool:
        return self.stages is not None


def shard_model(
    cfg: ModelConfig,
    params: dict[str, Any],
    mesh: Mesh,
    *,
    dtype: Any = jnp.float32,
    attention: str = "xla",
    rope_factors: np.ndarray | None = None,
    batch: int | None = None,
) -> ShardedModel:
    """Build the model from canonical host params with every weight on its shards.

    Raises JaxLLMError, before anything is compiled, when the mesh does not fit the model.
    """
    check_model_fits(cfg, mesh, batch)
    mc = mesh_config(mesh)
    copies = kv_replication(cfg.num_kv_heads, mc.tensor)
    run_cfg, params = replicate_kv_heads(cfg, params, copies)
    host = _host_model(
        run_cfg, params, dtype=dtype, attention=attention, rope_factors=rope_factors,
        mlp_shards=mc.tensor,
    )  # fmt: skip
    if mc.pipeline == 1:
        graphdef, state = nnx.split(host)
        model = nnx.merge(graphdef, _place_state(state, mesh))
        return ShardedModel(run_cfg, mesh, model, kv_copies=copies)
    block_def, _ = nnx.split(host.layers[0])
    per_layer = [nnx.split(layer)[1] for layer in host.layers]
    per_stage = cfg.num_layers // mc.pipeline

    def stack(*leaves):
        a = np.stack([np.asarray(x) for x in leaves])
        return a.reshape(mc.pipeline, per_stage, *a.shape[1:])

    stacked = jax.tree.map(stack, *per_layer)
    stages = _place_state(stacked, mesh, prefix=(R.STAGE, R.LAYERS))
    host.layers = nnx.List([])
    graphdef, state = nnx.split(host)
    outer = nnx.merge(graphdef, _place_state(state, mesh))
    return ShardedModel(run_cfg, mesh, outer, block_def, stages, kv_copies=copies)


def device_bytes(tree: Any) -> dict[Any, int]:
    """Bytes each device holds of the arrays in `tree` (replicas counted on every device)."""
    out: dict[Any, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out
