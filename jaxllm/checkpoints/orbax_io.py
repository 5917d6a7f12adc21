"""Orbax save/restore of a sharded model, restorable onto another mesh.

On disk the weights are in a mesh-free layout: every layer's arrays stacked [layers, ...],
the fused QKV rows with one copy of each KV head, the gate/up rows as [gate; up]. Saving
converts from the run layout (per mesh: stage-stacked layers, replicated KV heads, gate/up
rows per tensor shard) and restoring converts back for the target mesh, in one jitted
program each way; every array is written and read by its shards.

Axes: layers L, KV heads K (r copies each in the run layout), query heads per KV head G,
head_dim D, embed E, MLP width M, tensor size t.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from jaxllm.errors import JaxLLMError
from jaxllm.parallel import ShardedModel, mesh_config, param_axes
from sharding import rules as R

LAYOUT_FILE = "jaxllm_layout.json"


def _pure(tree: Any) -> Any:
    return nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree


def _layers_and_rest(sm: ShardedModel) -> tuple[dict, dict]:
    """(layer arrays stacked [L, ...], the other arrays) of a sharded model, run layout."""
    rest = _pure(nnx.state(sm.model))
    if sm.pipelined:
        layers = jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), _pure(sm.stages))
    else:
        per_layer = [rest["layers"][i] for i in sorted(rest["layers"])]
        layers = jax.tree.map(lambda *a: jnp.stack(a), *per_layer)
    return layers, {k: v for k, v in rest.items() if k != "layers"}


def _qkv_portable(w: jax.Array, k: int, r: int, d: int) -> jax.Array:
    """[L, K*r*(G/r+2)*D, ...] -> [L, K*(G+2)*D, ...]: keep copy 0 of each KV head."""
    tail = w.shape[2:]
    w = w.reshape(w.shape[0], k, r, -1, d, *tail)
    gr = w.shape[3] - 2
    q = w[:, :, :, :gr].reshape(w.shape[0], k, r * gr, d, *tail)
    kv = w[:, :, 0, gr:]
    return jnp.concatenate([q, kv], axis=2).reshape(w.shape[0], -1, *tail)


def _qkv_run(w: jax.Array, k: int, r: int, d: int) -> jax.Array:
    """The inverse: [L, K*(G+2)*D, ...] -> [L, K*r*(G/r+2)*D, ...]."""
    tail = w.shape[2:]
    w = w.reshape(w.shape[0], k, -1, d, *tail)
    g = w.shape[2] - 2
    q = w[:, :, :g].reshape(w.shape[0], k, r, g // r, d, *tail)
    kv = jnp.broadcast_to(w[:, :, None, g:], (w.shape[0], k, r, 2, d, *tail))
    return jnp.concatenate([q, kv], axis=3).reshape(w.shape[0], -1, *tail)


def _gate_up(w: jax.Array, first: int, second: int) -> jax.Array:
    """Rows [L, first, second, M/t, E] -> [L, second, first, M/t, E] (t = tensor size)."""
    m = w.shape[1] // (first * second)
    w = w.reshape(w.shape[0], first, second, m, *w.shape[2:])
    return w.swapaxes(1, 2).reshape(w.shape[0], -1, *w.shape[4:])


def _convert_layers(layers: dict, *, k: int, r: int, d: int, t: int, to_run: bool) -> dict:
    layers = jax.tree.map(lambda a: a, layers)  # a copy to edit
    qkv = layers["attn"]["qkv"]
    convert = _qkv_run if to_run else _qkv_portable
    for name in list(qkv):
        if qkv[name] is not None:
            qkv[name] = convert(qkv[name], k, r, d)
    gu = layers["mlp"]["gate_up"]
    gu["weight"] = _gate_up(gu["weight"], 2, t) if to_run else _gate_up(gu["weight"], t, 2)
    return layers


def _layout(sm: ShardedModel) -> dict[str, int]:
    cfg = sm.config
    return {
        "num_layers": cfg.num_layers,
        "num_kv_heads": cfg.num_kv_heads // sm.kv_copies,
        "num_heads": cfg.num_heads,
        "head_dim": cfg.head_dim,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "vocab_size": cfg.vocab_size,
    }


def _portable_shardings(tree: dict, mesh) -> dict:
    def one(path, leaf):
        keys = [getattr(p, "key", p) for p in path]
        names = param_axes(keys)
        if keys[0] == "layers":  # [L, ...]: whole layers to pipeline stages
            names = (R.STAGE, *names)
        return R.named(names, mesh, leaf.shape)

    return jax.tree_util.tree_map_with_path(one, tree)


def save(path: str | Path, sm: ShardedModel) -> Path:
    """Write `sm`'s weights under `path` (a new directory) in the mesh-free layout."""
    path = Path(path).absolute()
    if path.exists():
        raise JaxLLMError(f"checkpoint path {str(path)!r} already exists")
    mc = mesh_config(sm.mesh)
    k, r, d = sm.config.num_kv_heads // sm.kv_copies, sm.kv_copies, sm.config.head_dim

    def portable(layers, rest):
        return {**rest, "layers": _convert_layers(layers, k=k, r=r, d=d, t=mc.tensor, to_run=False)}

    layers, rest = _layers_and_rest(sm)
    tree = jax.jit(portable)(layers, rest)
    tree = jax.jit(lambda x: x, out_shardings=_portable_shardings(tree, sm.mesh))(tree)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path / "params", tree)
    (path / LAYOUT_FILE).write_text(json.dumps(_layout(sm)))
    return path


def restore(path: str | Path, like: ShardedModel) -> ShardedModel:
    """The checkpoint's weights in the layout and shardings of `like` (any mesh the model
    fits; `like` is the same model built there, e.g. by `shard_model`, whose arrays only
    lend their shapes and shardings)."""
    path = Path(path).absolute()
    if not (path / LAYOUT_FILE).is_file():
        raise JaxLLMError(f"{str(path)!r} is not a jaxllm checkpoint (no {LAYOUT_FILE})")
    saved = json.loads((path / LAYOUT_FILE).read_text())
    if saved != _layout(like):
        raise JaxLLMError(f"checkpoint shapes {saved} do not match the model's {_layout(like)}")
    mc = mesh_config(like.mesh)
    k, r, d = saved["num_kv_heads"], like.kv_copies, saved["head_dim"]
    layers, rest = _layers_and_rest(like)

    def portable_shapes(layers, rest):
        return {**rest, "layers": _convert_layers(layers, k=k, r=r, d=d, t=mc.tensor, to_run=False)}

    shapes = jax.eval_shape(portable_shapes, layers, rest)
    shardings = _portable_shardings(shapes, like.mesh)
    target = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )
    with ocp.StandardCheckpointer() as ckpt:
        tree = ckpt.restore(path / "params", target)

    def to_run(tree):
        rest = {key: v for key, v in tree.items() if key != "layers"}
        return _convert_layers(tree["layers"], k=k, r=r, d=d, t=mc.tensor, to_run=True), rest

    out_shardings = jax.tree.map(lambda a: a.sharding, (layers, rest))
    new_layers, new_rest = jax.jit(to_run, out_shardings=out_shardings)(tree)
    return _assemble(like, new_layers, new_rest)


def _assemble(like: ShardedModel, layers: dict, rest: dict) -> ShardedModel:
    """A new ShardedModel like `like` holding `layers` ([L, ...], run layout) and `rest`."""
    state = nnx.state(like.model)
    if like.pipelined:
        stages_state = like.stages
        s = mesh_config(like.mesh).pipeline
        staged = jax.tree.map(
            lambda a, old: jax.jit(
                lambda x: x.reshape(s, -1, *x.shape[1:]), out_shardings=old.sharding
            )(a),
            layers, _pure(stages_state),
        )  # fmt: skip
        new_stages = jax.tree.map(lambda x: x, stages_state)
        nnx.replace_by_pure_dict(new_stages, staged)
        pure = {**rest, "layers": _pure(state).get("layers", {})}
    else:
        old_layers = _pure(state)["layers"]
        per_layer = {
            i: jax.tree.map(
                lambda a, old, i=i: jax.device_put(a[i], old.sharding), layers, old_layers[i]
            )
            for i in sorted(old_layers)
        }
        pure = {**rest, "layers": per_layer}
        new_stages = None
    nnx.replace_by_pure_dict(state, pure)
    graphdef = nnx.graphdef(like.model)
    model = nnx.merge(graphdef, state)
    return ShardedModel(
        like.config, like.mesh, model, like.block_def, new_stages, kv_copies=like.kv_copies
    )


def same_params(a: ShardedModel, b: ShardedModel) -> bool:
    """Whether two sharded models hold bitwise-equal weights (in their own layouts)."""
    la, ra = _layers_and_rest(a)
    lb, rb = _layers_and_rest(b)
    eq = jax.tree.map(
        lambda x, y: bool(np.array_equal(np.asarray(x), np.asarray(y))), (la, ra), (lb, rb)
    )
    return all(jax.tree.leaves(eq))
