"""Attention backends: the score/softmax/value step the model calls.

Every backend takes q [B, T, K, G, D], k/v [B, K, S, D] (the head-major KV cache), mask
[B, T, S] (True = attend), `sm_scale` and `q_offset` (the cache slot of query 0), and returns
[B, T, K, G, D].

- `xla`: the pure-jnp reference; honours any mask.
- `flash`: the Pallas flash kernel, reading the cache in place. It relies on the masks the
  model's callers build: causal from `q_offset`, and per-row key validity (left padding, the
  unwritten cache tail), which it takes from the mask's last query row as segment ids.
- `flash-prefill`: `flash` for steps of several tokens (prefill), `xla` for one-token steps.
  On an H100 (`gpu_check`, four runs, Llama-3.2-1B over 256 cache slots) one-token steps ran
  2-8% faster under `xla` than under `flash` at batch 1 and 0-3% at batch 16, and prefill
  faster under `flash` in every run. The flash kernel has no split over the cache, so a
  one-token step gets only batch x KV-heads programs; XLA spreads the cache over the GPU.
- `auto`: `flash-prefill` on GPU, `flash` on TPU, `xla` on CPU (where Pallas only
  interprets).

- `decode`: a one-token step over a float static cache as one kernel per layer (RoPE, the
  cache write and attention: `pallas_kernels/decode_attention.py`) where the kernel takes
  the shapes (power-of-two query heads per KV head); other steps as `auto`.
  Opt-in: batch-1 Llama-3.2-1B decode over 256 cache slots ran 2.4% faster than under `xla`
  on an H100 and 1.7-6.4% on an H200 (benchmarks/results/int8_probe_h*.md); longer caches
  are not yet measured.
- `paged`: for this contiguous cache, the same as `flash`; the engine's paged cache uses the
  ragged paged kernel under `flash`/`paged`; under `xla` the native CPU kernel
  (`jaxllm/cpu_kernels/paged_attention.cc`) or, without it, a jnp split of the step into
  decode rows and prefill chunks (`jaxllm/engine/cpu_attention.py`).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxllm.errors import JaxLLMError
from pallas_kernels.decode_attention import supports as decode_attention_supports
from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.ragged_paged_attention import ragged_paged_attention
from pallas_kernels.reference import attention_reference


def _xla(q, k, v, mask, *, sm_scale, q_offset=None):
    del q_offset  # the dense mask says everything
    return attention_reference(q, k, v, mask, sm_scale=sm_scale)


def _flash(q, k, v, mask, *, sm_scale, q_offset=None, interpret=None):
    b, t, kh, g, d = q.shape
    s = k.shape[2]
    if mask is None:
        kv_valid = jnp.ones((b, s), jnp.int32)
    else:
        kv_valid = mask[:, -1, :].astype(jnp.int32)
    if t == 1:
        # Decode: the G query heads of a group become G query rows of one head, so each
        # program reads its KV head's cache once for the whole group. The valid keys are
        # exactly the mask row, so no causal offset is needed.
        rows = q.reshape(b, kh, g, d).transpose(0, 2, 1, 3)  # [B, G, K, D]
        out = flash_attention(
            rows, k, v, causal=False, sm_scale=sm_scale,
            segment_ids=(jnp.ones((b, g), jnp.int32), kv_valid),
            kv_layout="bksd", interpret=interpret,
        )  # fmt: skip
        return out.transpose(0, 2, 1, 3).reshape(b, 1, kh, g, d)
    out = flash_attention(
        q.reshape(b, t, kh * g, d),
        k,
        v,
        causal=True,
        sm_scale=sm_scale,
        segment_ids=(jnp.ones((b, t), jnp.int32), kv_valid),
        q_offset=0 if q_offset is None else q_offset,
        kv_layout="bksd",
        interpret=interpret,
    )
    return out.reshape(b, t, kh, g, d)


def _flash_prefill(q, k, v, mask, *, sm_scale, q_offset=None):
    fn = _xla if q.shape[1] == 1 else _flash
    return fn(q, k, v, mask, sm_scale=sm_scale, q_offset=q_offset)


def _decode(q, k, v, mask, *, sm_scale, q_offset=None):
    """The `decode` backend's other steps (prefill, int8 caches): `auto`'s. Its one-token steps
    over a float static cache never come here: the model runs them as
    `pallas_kernels.decode_attention` (RoPE, the cache write and the attention in one kernel;
    `decode_attention_applies`)."""
    return get_attention_fn("auto")(q, k, v, mask, sm_scale=sm_scale, q_offset=q_offset)


def decode_attention_applies(
    attention_fn: Callable[..., jax.Array], group: int, kv, cache_index, mask
) -> bool:
    """Whether the model runs a one-token step as `decode_attention`: the `decode` backend, a
    float cache (not int8 or bit-packed), shapes the kernel takes (`group` query heads per KV
    head), one cache slot for the batch and a mask."""
    if attention_fn is not _decode or kv is None or cache_index is None or mask is None:
        return False
    k = kv[0]
    return (
        isinstance(k, jax.Array)
        and jnp.issubdtype(k.dtype, jnp.floating)
        and decode_attention_supports(group, k.shape[-1], k.shape[2])
        and jnp.ndim(cache_index) == 0
    )


_BACKENDS: dict[str, Callable[..., jax.Array]] = {
    "xla": _xla,
    "flash": _flash,
    "flash-prefill": _flash_prefill,
    "paged": _flash,
    "decode": _decode,
}


def _paged_kernel(q, k_pages, v_pages, meta, *, sm_scale):
    from jaxllm.quant.kv import QuantizedKV
    from jaxllm.quant.kv_bits import Bfloat16Bits

    scales = {}
    if isinstance(k_pages, QuantizedKV):  # int8 pages go in as they are, scales beside them
        scales = {"k_scales": k_pages.scale, "v_scales": v_pages.scale}
        k_pages, v_pages = k_pages.values, v_pages.values
    if isinstance(k_pages, Bfloat16Bits):  # CPU only, where this kernel only interprets
        k_pages, v_pages = k_pages.values(), v_pages.values()
    return ragged_paged_attention(
        q, k_pages, v_pages, meta.kv_lens, meta.block_tables, meta.cu_q_lens, meta.num_seqs,
        sm_scale=sm_scale, **scales,
    )  # fmt: skip


def paged_uses_native_cpu(group: int, page_size: int, dtype, head_dim: int | None = None) -> bool:
    """Whether the engine's `xla` attention runs the native CPU kernel (else the jnp split):
    pages of `dtype` float32, float16, bfloat16 or int8 (with scales). The kernel
    computes in 16-float vectors: `head_dim` must be a multiple of 16, at most 256."""
    from jaxllm import cpu_kernels

    return (
        jax.default_backend() == "cpu"
        and jnp.dtype(dtype) in cpu_kernels.PAGED_DTYPES
        and group <= 16
        and page_size <= 256
        and (head_dim is None or (head_dim % 16 == 0 and head_dim <= 256))
        and cpu_kernels.available()
    )


def _paged_xla(q, k_pages, v_pages, meta, *, sm_scale):
    from jaxllm import cpu_kernels
    from jaxllm.engine.cpu_attention import split_paged_attention
    from jaxllm.quant.kv import QuantizedKV
    from jaxllm.quant.kv_bits import Bfloat16Bits

    group, page_size = q.shape[1] // k_pages.shape[0], k_pages.shape[2]
    if isinstance(k_pages, jax.Array | Bfloat16Bits | QuantizedKV) and paged_uses_native_cpu(
        group, page_size, k_pages.dtype, q.shape[-1]
    ):  # one pass over each sequence's pages, on every core
        return cpu_kernels.paged_attention(
            q, k_pages, v_pages, meta.kv_lens, meta.block_tables, meta.cu_q_lens,
            meta.num_seqs, sm_scale=sm_scale,
        )  # fmt: skip
    return split_paged_attention(q, k_pages, v_pages, meta, sm_scale=sm_scale)


# The engine's mixed steps over a paged cache: (q [T, H, D], k_pages, v_pages, PagedMeta).
_PAGED: dict[str, Callable[..., jax.Array]] = {
    "xla": _paged_xla,
    "flash": _paged_kernel,
    "flash-prefill": _paged_kernel,
    "paged": _paged_kernel,
}


# Paged backends besides `xla`'s jnp path that read PagedMeta's CPU split (dec_/pre_ rows).
_SPLIT_READERS: set[str] = set()


def register_attention(
    name: str,
    fn: Callable[..., jax.Array],
    paged: Callable[..., jax.Array] | None = None,
    *,
    paged_reads_split: bool = False,
) -> None:
    """Add a backend: `fn` for contiguous caches and, optionally, `paged` for the engine
    (`paged_reads_split`: it reads the CPU split metadata, so the engine must fill it)."""
    _BACKENDS[name] = fn
    if paged is not None:
        _PAGED[name] = paged
    if paged_reads_split:
        _SPLIT_READERS.add(name)


def paged_reads_split(
    name: str, group: int, page_size: int, dtype, head_dim: int | None = None
) -> bool:
    """Whether the engine's paged attention under backend `name` reads the CPU split."""
    name = _paged_backend(name)
    if name in _SPLIT_READERS:
        return True
    return name == "xla" and not paged_uses_native_cpu(group, page_size, dtype, head_dim)


def available_backends() -> tuple[str, ...]:
    return ("auto", *_BACKENDS)


def _paged_backend(name: str) -> str:
    """The backend whose paged attention the engine runs under `name`: `decode` fuses only the
    static cache's one-token steps, so over pages it is `auto`."""
    return resolve_backend("auto" if name == "decode" else name)


def resolve_backend(name: str) -> str:
    """`auto` is the reference on CPU, the flash kernel on TPU, and on GPU the flash kernel
    for prefill with the reference for one-token steps (`flash-prefill`)."""
    if name == "auto":
        return {"cpu": "xla", "gpu": "flash-prefill"}.get(jax.default_backend(), "flash")
    if name not in _BACKENDS:
        raise JaxLLMError(
            f"unknown attention backend {name!r}; available: {', '.join(available_backends())}"
        )
    return name


def get_attention_fn(name: str) -> Callable[..., jax.Array]:
    return _BACKENDS[resolve_backend(name)]


def get_paged_attention_fn(name: str) -> Callable[..., jax.Array]:
    """The engine's attention over pages: the ragged kernel, or its jnp reference for `xla`."""
    return _PAGED.get(_paged_backend(name), _paged_kernel)
