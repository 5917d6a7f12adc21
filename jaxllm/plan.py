"""Size a mesh before renting it: per-device bytes of weights and KV cache, collective bytes
per token, and a roofline estimate of decode tokens/s (`jaxllm plan`).

The byte counts follow the layout `jaxllm.parallel` really uses (KV heads replicated when
`tensor` does not divide them, vocab split only where `tensor` divides it, norms and RoPE
tables whole, embedding and head on every pipeline stage), so on a host mesh they equal
the bytes of the placed arrays (tests/sharded/test_plan_sharded.py checks this).

The roofline: a decode step reads every weight and the cache once per microbatch, and does
2 FLOPs per weight and 4 per cached key per row; its time is the larger of the two, plus
the all-reduce/permute traffic over one link per device (ring algorithm, no latency).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import yaml

from jaxllm.config import ModelConfig, find_config, known_configs
from jaxllm.errors import JaxLLMError
from sharding.mesh import MeshConfig, MeshError, check_divides, kv_replication

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclasses.dataclass(frozen=True)
class Hardware:
    """One accelerator: memory size and bandwidth, peak FLOP/s, per-link bandwidth (one way)."""

    name: str
    memory_bytes: float
    memory_bandwidth: float
    flops: float
    link_bandwidth: float

    @classmethod
    def from_yaml(cls, name_or_path: str) -> Hardware:
        path = find_config("hardware", name_or_path)
        if path is None:
            known = known_configs("hardware")
            raise JaxLLMError(f"no hardware {name_or_path!r}; known: {', '.join(known)}")
        d = yaml.safe_load(path.read_text())
        return cls(name=d["name"], **{k: float(v) for k, v in d.items() if k != "name"})


@dataclasses.dataclass(frozen=True)
class Plan:
    model: str
    mesh: str
    hardware: str
    batch: int
    context: int
    microbatches: int
    param_bytes_per_device: int
    kv_bytes_per_device: int
    collective_bytes_per_token: float  # per device, per generated token of one sequence
    decode_step_s: float
    decode_tok_s: float
    bound: str  # "memory" or "compute"
    fits: bool

    def table(self) -> str:
        gb = 1e9
        rows = [
            ("model", self.model),
            ("mesh", self.mesh),
            ("hardware", self.hardware),
            ("batch x context", f"{self.batch} x {self.context}"),
            ("params per device", f"{self.param_bytes_per_device / gb:.3f} GB"),
            ("KV cache per device", f"{self.kv_bytes_per_device / gb:.3f} GB"),
            ("fits in memory", "yes" if self.fits else "NO"),
            ("collective bytes/token/device", f"{self.collective_bytes_per_token / 1e3:.1f} kB"),
            ("decode step (roofline)", f"{self.decode_step_s * 1e3:.2f} ms ({self.bound} bound)"),
            ("decode tokens/s (roofline)", f"{self.decode_tok_s:.0f}"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def param_bytes_per_device(cfg: ModelConfig, mesh: MeshConfig, dtype: str = "bfloat16") -> int:
    """Bytes of weights on each device (the RoPE table is float32 on every device)."""
    w = DTYPE_BYTES[dtype]
    t, pp = mesh.tensor, mesh.pipeline
    e, d, m, v = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size, cfg.vocab_size
    kv = cfg.num_kv_heads * kv_replication(cfg.num_kv_heads, t)
    qkv_rows = (cfg.num_heads + 2 * kv) * d
    split = qkv_rows * e + e * cfg.num_heads * d + 3 * m * e
    if cfg.attention_bias:
        split += qkv_rows
    per_layer = split // t + 2 * e  # the two norms stay whole
    vocab_rows = v // t if v % t == 0 else v
    heads = 1 if cfg.tie_word_embeddings else 2
    outer = heads * vocab_rows * e + e  # embedding (+ head) and the final norm
    return w * (cfg.num_layers // pp * per_layer + outer) + 4 * (d // 2)


def kv_bytes_per_device(
    cfg: ModelConfig, mesh: MeshConfig, batch: int, context: int, dtype: str = "bfloat16"
) -> int:
    kv = cfg.num_kv_heads * kv_replication(cfg.num_kv_heads, mesh.tensor)
    rows = batch // mesh.data if batch % mesh.data == 0 else batch
    layers = cfg.num_layers // mesh.pipeline
    return 2 * layers * rows * (kv // mesh.tensor) * context * cfg.head_dim * DTYPE_BYTES[dtype]


def collective_bytes_per_token(
    cfg: ModelConfig, mesh: MeshConfig, dtype: str = "bfloat16"
) -> float:
    """Bytes each device sends per decoded token of one sequence: per layer it holds, two
    ring all-reduces of the hidden state over `tensor` (after O and down) and one for the
    vocab-parallel embedding; one permute per stage boundary and the pipeline's final
    all-reduce over `pipeline`."""
    row = cfg.hidden_size * DTYPE_BYTES[dtype]
    t, pp = mesh.tensor, mesh.pipeline
    tp = (2 * cfg.num_layers // pp + 1) * 2 * (t - 1) / t * row
    pipe = (row + 2 * (pp - 1) / pp * row) if pp > 1 else 0.0
    return tp + pipe


def plan(
    model: str | ModelConfig,
    mesh: str | MeshConfig,
    hardware: str | Hardware,
    *,
    batch: int = 1,
    context: int = 4096,
    dtype: str = "bfloat16",
    microbatches: int = 0,
) -> Plan:
    """The per-device bytes and the roofline for `model` on `mesh` of `hardware`."""
    from jaxllm.parallel import load_mesh_config

    cfg = model if isinstance(model, ModelConfig) else ModelConfig.from_yaml(model)
    mc = mesh if isinstance(mesh, MeshConfig) else load_mesh_config(mesh)
    hw = hardware if isinstance(hardware, Hardware) else Hardware.from_yaml(hardware)
    if dtype not in DTYPE_BYTES:
        raise JaxLLMError(f"dtype {dtype!r} is not one of {', '.join(DTYPE_BYTES)}")
    for name, value in (("batch", batch), ("context", context)):
        if value < 1:
            raise JaxLLMError(f"{name}={value} must be at least 1")
    try:
        check_divides(
            mc, heads=cfg.num_heads, kv_heads=cfg.num_kv_heads, layers=cfg.num_layers,
            mlp=cfg.intermediate_size, batch=batch,
        )  # fmt: skip
    except MeshError as e:
        raise JaxLLMError(f"model {cfg.name!r} on mesh {mc}: {e}") from None
    from sharding.pipeline import pick_microbatches

    micro = pick_microbatches(batch, mc.data, microbatches or mc.pipeline)
    params = param_bytes_per_device(cfg, mc, dtype)
    kv = kv_bytes_per_device(cfg, mc, batch, context, dtype)
    ticks = micro + mc.pipeline - 1
    rows = batch // mc.data
    # Per tick: the stage's weights and one microbatch's share of its cache.
    read_s = ticks * (params + kv / micro) / hw.memory_bandwidth
    weights = (params - 4 * (cfg.head_dim // 2)) / DTYPE_BYTES[dtype]
    attn = 4 * (cfg.num_layers // mc.pipeline) * (cfg.num_heads // mc.tensor)
    flops = 2 * weights * rows + attn * cfg.head_dim * context * rows
    compute_s = ticks / micro * flops / hw.flops
    comm_s = rows * collective_bytes_per_token(cfg, mc, dtype) / hw.link_bandwidth
    step = max(read_s, compute_s) + comm_s
    return Plan(
        model=cfg.name,
        mesh=str(mc),
        hardware=hw.name,
        batch=batch,
        context=context,
        microbatches=micro,
        param_bytes_per_device=params,
        kv_bytes_per_device=kv,
        collective_bytes_per_token=collective_bytes_per_token(cfg, mc, dtype),
        decode_step_s=step,
        decode_tok_s=batch / step,
        bound="memory" if read_s >= compute_s else "compute",
        fits=params + kv <= hw.memory_bytes,
    )


def as_dict(p: Plan) -> dict[str, Any]:
    d = dataclasses.asdict(p)
    d["decode_tok_s"] = round(d["decode_tok_s"], 3) if math.isfinite(d["decode_tok_s"]) else None
    return d
