"""Logical axis names and the one rule table that maps them to mesh axes.

Every parameter, activation and cache array is described by a tuple of logical names, one per
dimension; `spec` turns it into a PartitionSpec for a mesh. The table is Megatron's:

- column-parallel: the fused QKV rows (`qkv`, grouped by KV head) and the gate/up rows
  (`mlp`) split over `tensor`; each shard computes whole heads and whole MLP channels;
- row-parallel: the output projection's input (`heads`) and the down projection's input
  (`mlp`) split over `tensor`; their partial sums meet in one all-reduce each;
- vocab-parallel: the embedding table's and output head's `vocab` rows split over `tensor`;
- the batch splits over `data`, pipeline stages (`stage`) over `pipeline`;
- `embed`, `head_dim`, `layers` (within a stage), positions and cache slots stay whole.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from jax.sharding import Mesh, NamedSharding, PartitionSpec

# Logical axes (a dimension may also be None: never split).
VOCAB, EMBED, HEADS, KV_HEADS, HEAD_DIM, QKV, MLP = (
    "vocab", "embed", "heads", "kv_heads", "head_dim", "qkv", "mlp",
)  # fmt: skip
LAYERS, STAGE, BATCH, LENGTH, CACHE_LEN, PAGES = (
    "layers", "stage", "batch", "length", "cache_len", "pages",
)  # fmt: skip

RULES: Mapping[str, str | None] = {
    VOCAB: "tensor",
    EMBED: None,
    HEADS: "tensor",
    KV_HEADS: "tensor",
    QKV: "tensor",  # fused [kv_heads, group + 2, head_dim]: split by KV head
    HEAD_DIM: None,
    MLP: "tensor",
    LAYERS: None,
    STAGE: "pipeline",
    BATCH: "data",
    LENGTH: None,
    CACHE_LEN: None,
    PAGES: None,
}

Axes = Sequence[str | None]


def spec(
    names: Axes,
    mesh: Mesh | None = None,
    shape: Sequence[int] | None = None,
    rules: Mapping[str, str | None] = RULES,
) -> PartitionSpec:
    """PartitionSpec of an array whose dimensions carry `names`.

    With a mesh and the array's shape, a dimension that its mesh axis does not divide stays
    whole (replicated), and so do mesh axes the mesh lacks.
    """
    out: list[str | None] = []
    for i, name in enumerate(names):
        axis = rules.get(name) if name is not None else None
        if axis is not None and mesh is not None:
            size = dict(mesh.shape).get(axis)
            if size is None or (shape is not None and shape[i] % size):
                axis = None
        out.append(axis)
    return PartitionSpec(*out)


def named(
    names: Axes, mesh: Mesh, shape: Sequence[int] | None = None, rules=RULES
) -> NamedSharding:
    return NamedSharding(mesh, spec(names, mesh, shape, rules))
