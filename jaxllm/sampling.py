"""Sampling: a pure function of logits, per-row parameters and per-row seeds.

Per-row parameters are arrays, so a batch mixing greedy and sampled requests compiles once.
Each row draws from its own key, `fold_in(PRNGKey(seed), step)`: a seeded request gives the
same tokens whatever else is in the batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.errors import JaxLLMError


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """What one request asks of the sampler (vLLM's names and meanings).

    temperature 0 is greedy; top_k 0 (or -1) and top_p 1 and min_p 0 turn those filters off.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    max_tokens: int = 16
    seed: int | None = None
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not (0.0 <= self.temperature <= 100.0):
            raise JaxLLMError(f"temperature={self.temperature} must be in [0, 100]")
        if self.top_k < -1:
            raise JaxLLMError(f"top_k={self.top_k} must be >= 0 (0 or -1 disables it)")
        if not (0.0 < self.top_p <= 1.0):
            raise JaxLLMError(f"top_p={self.top_p} must be in (0, 1]")
        if not (0.0 <= self.min_p <= 1.0):
            raise JaxLLMError(f"min_p={self.min_p} must be in [0, 1]")
        if self.max_tokens < 1:
            raise JaxLLMError(f"max_tokens={self.max_tokens} must be >= 1")
        if self.seed is not None and not (0 <= self.seed < 2**32):
            raise JaxLLMError(f"seed={self.seed} must be in [0, 2**32)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclasses.dataclass(frozen=True)
class SamplingArrays:
    """Per-row sampling parameters, [B] each."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    seed: jax.Array

    @classmethod
    def from_params(cls, params: Sequence[SamplingParams], batch: int) -> SamplingArrays:
        """Pad to `batch` rows with greedy rows; draw seeds for unseeded requests."""
        pad = [SamplingParams(temperature=0.0)] * (batch - len(params))
        rows = list(params) + pad
        rng = np.random.default_rng()
        seeds = [p.seed if p.seed is not None else int(rng.integers(2**32)) for p in rows]
        return cls(
            temperature=np.asarray([p.temperature for p in rows], np.float32),
            top_k=np.asarray([max(p.top_k, 0) for p in rows], np.int32),
            top_p=np.asarray([p.top_p for p in rows], np.float32),
            min_p=np.asarray([p.min_p for p in rows], np.float32),
            seed=np.asarray(seeds, np.uint32),
        )


jax.tree_util.register_dataclass(
    SamplingArrays,
    data_fields=["temperature", "top_k", "top_p", "min_p", "seed"],
    meta_fields=[],
)


def filter_logits(
    logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array, min_p: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Temperature, then top-k, top-p and min-p filters, in sorted order.

    logits [B, V] float32; parameters [B]. Returns (sorted_logits [B, V] with filtered entries
    at -inf, sorted_ids [B, V]), sorted by descending probability.
    """
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    order = jnp.argsort(-scaled, axis=-1, stable=True)
    sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
    rank = jnp.arange(logits.shape[-1])[None, :]
    keep = (top_k[:, None] <= 0) | (rank < top_k[:, None])
    # top-p on the distribution renormalised over the top-k survivors (as vLLM and HF do):
    # keep the smallest prefix whose mass reaches p; the first token always stays.
    probs = jax.nn.softmax(jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep &= mass_before < top_p[:, None]
    keep &= probs >= min_p[:, None] * probs[:, :1]
    return jnp.where(keep, sorted_logits, -jnp.inf), order


def sample(logits: jax.Array, params: SamplingArrays, step: jax.Array) -> jax.Array:
    """Next token per row. logits [B, V] float32 -> [B] int32.

    step: [] or [B], the index of the token being drawn in each row's output; with the row's
    seed it fixes the draw, whatever else is in the batch.
    """
    greedy_tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sampled(_):
        filtered, order = filter_logits(
            logits, params.temperature, params.top_k, params.top_p, params.min_p
        )

        def draw(seed, row, i):
            key = jax.random.fold_in(jax.random.PRNGKey(seed), i)
            return jax.random.categorical(key, row)

        steps = jnp.broadcast_to(jnp.asarray(step, jnp.int32), params.seed.shape)
        choice = jax.vmap(draw)(params.seed, filtered, steps)
        tokens = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
        return jnp.where(params.temperature > 0, tokens, greedy_tokens)

    # The full-vocabulary sort costs more than a decode step's matmuls on CPU: skip it when
    # every row is greedy.
    return jax.lax.cond(
        jnp.any(params.temperature > 0), sampled, lambda _: greedy_tokens, operand=None
    )
