"""Device meshes over three named axes: data, pipeline, tensor.

`data` splits the batch (the model is replicated), `pipeline` holds consecutive layer stages,
`tensor` splits each layer's matrices (Megatron). All three are `AxisType.Auto`: jit places
work by the shardings of its inputs and constraints, so row-parallel products need no
`out_sharding=` (jax.make_mesh alone would make them Explicit).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jax.sharding import AxisType, Mesh

AXES = ("data", "pipeline", "tensor")


class MeshError(ValueError):
    """A mesh that cannot hold the model or the batch (names the value and the limit)."""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the three mesh axes; their product is the number of devices used."""

    data: int = 1
    pipeline: int = 1
    tensor: int = 1

    def __post_init__(self) -> None:
        for axis in AXES:
            size = getattr(self, axis)
            if not isinstance(size, int) or isinstance(size, bool) or size < 1:
                raise MeshError(f"mesh axis {axis}={size!r} must be a positive integer")

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.data, self.pipeline, self.tensor)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def __str__(self) -> str:
        return ",".join(f"{a}={getattr(self, a)}" for a in AXES)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MeshConfig:
        unknown = set(d) - set(AXES)
        if unknown:
            raise MeshError(f"unknown mesh axes {sorted(unknown)}; known: {', '.join(AXES)}")
        return cls(**{k: int(v) for k, v in d.items()})

    @classmethod
    def parse(cls, text: str) -> MeshConfig:
        """From `data=2,pipeline=1,tensor=4` (missing axes are 1)."""
        sizes: dict[str, int] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, sep, value = part.partition("=")
            if not sep or not value.strip().lstrip("-").isdigit():
                raise MeshError(
                    f"bad mesh entry {part!r} in {text!r}; expected axis=size, "
                    "e.g. data=2,pipeline=1,tensor=4"
                )
            sizes[name.strip()] = int(value)
        return cls.from_dict(sizes)

    @classmethod
    def of(cls, mesh: Mesh) -> MeshConfig:
        """The sizes of a Mesh over (a subset of) our axis names."""
        return cls.from_dict(dict(mesh.shape))


def make_mesh(
    data: int = 1,
    pipeline: int = 1,
    tensor: int = 1,
    *,
    devices: Sequence[Any] | None = None,
    local: bool = False,
) -> Mesh:
    """A (data, pipeline, tensor) mesh of Auto axes.

    devices: the devices to use, in order (default: all global devices, or this process's
    with `local=True`); the first data*pipeline*tensor of them are taken.
    """
    cfg = MeshConfig(data, pipeline, tensor)
    if devices is None:
        devices = jax.local_devices() if local else jax.devices()
    devices = list(devices)
    if cfg.size > len(devices):
        raise MeshError(f"mesh {cfg} needs {cfg.size} devices, only {len(devices)} are available")
    return jax.make_mesh(
        cfg.shape, AXES, axis_types=(AxisType.Auto,) * 3, devices=devices[: cfg.size]
    )


def check_divides(
    cfg: MeshConfig,
    *,
    heads: int,
    kv_heads: int,
    layers: int,
    mlp: int | None = None,
    batch: int | None = None,
) -> None:
    """Raise MeshError unless the mesh splits the model and batch evenly.

    KV heads are never a reason to fail: when `tensor` does not divide them they are
    replicated across the tensor axis (see `kv_replication`), which needs only that
    `tensor` divides the query heads.
    """
    del kv_heads
    if heads % cfg.tensor:
        raise MeshError(f"tensor={cfg.tensor} does not divide the {heads} attention heads")
    if mlp is not None and mlp % cfg.tensor:
        raise MeshError(f"tensor={cfg.tensor} does not divide the MLP width {mlp}")
    if layers % cfg.pipeline:
        raise MeshError(f"pipeline={cfg.pipeline} does not divide the {layers} layers")
    if batch is not None and batch % cfg.data:
        raise MeshError(f"data={cfg.data} does not divide the batch of {batch}")


def kv_replication(kv_heads: int, tensor: int) -> int:
    """How many copies of each KV head the tensor axis needs so that every shard holds
    whole KV heads: 1 when `tensor` divides `kv_heads`, else tensor / gcd(kv_heads, tensor)."""
    return tensor // math.gcd(kv_heads, tensor)
