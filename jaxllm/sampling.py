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

from jaxllm import cpu_kernels
from jaxllm.errors import JaxLLMError

MAX_N = 64  # completions (or beams) per request
MAX_LOGPROBS = 20  # top log-probabilities returned per token (vLLM's default limit)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """What one request asks of the sampler (vLLM's names and meanings).

    temperature 0 is greedy; top_k 0 (or -1) and top_p 1 and min_p 0 turn those filters off.
    Penalties (1.0 / 0.0 = off): `repetition_penalty` divides positive logits (multiplies
    negative ones) of every token seen in the prompt or output; `presence_penalty` and
    `frequency_penalty` subtract from tokens of the output once / once per occurrence.
    `n` completions are returned, the best `n` by cumulative log-probability of `best_of`
    samples when `best_of > n`; with `use_beam_search`, beam search of width `best_of or n`
    (`length_penalty` divides a beam's score by its length to that power). `logprobs=k`
    returns the model's top-k log-probabilities (plus the chosen token's) per output token,
    `prompt_logprobs=k` per prompt token. Generation stops after a token of
    `stop_token_ids` or once the text contains one of `stop` (cut from the text unless
    `include_stop_str_in_output`). The engine serves all of these; the static generator
    serves the sampling filters, seeds and stop token ids.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    max_tokens: int = 16
    seed: int | None = None
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: Sequence[str] = ()
    include_stop_str_in_output: bool = False
    n: int = 1
    best_of: int | None = None
    use_beam_search: bool = False
    length_penalty: float = 1.0
    logprobs: int | None = None
    prompt_logprobs: int | None = None

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
        if not (0.0 < self.repetition_penalty <= 10.0):
            raise JaxLLMError(f"repetition_penalty={self.repetition_penalty} must be in (0, 10]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not (-2.0 <= getattr(self, name) <= 2.0):
                raise JaxLLMError(f"{name}={getattr(self, name)} must be in [-2, 2]")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise JaxLLMError(f"stop={list(self.stop)!r} must hold non-empty strings")
        if not (1 <= self.n <= MAX_N):
            raise JaxLLMError(f"n={self.n} must be in [1, {MAX_N}]")
        if self.best_of is not None and not (self.n <= self.best_of <= MAX_N):
            raise JaxLLMError(f"best_of={self.best_of} must be in [n={self.n}, {MAX_N}]")
        if self.use_beam_search and self.temperature != 0.0:
            raise JaxLLMError(
                f"use_beam_search needs temperature=0 (beams are deterministic), got "
                f"{self.temperature}"
            )
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and not (0 <= k <= MAX_LOGPROBS):
                raise JaxLLMError(f"{name}={k} must be in [0, {MAX_LOGPROBS}]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def num_samples(self) -> int:
        """Sequences the request runs: `best_of` (beams or samples), else `n`."""
        return self.best_of if self.best_of is not None else self.n

    @property
    def has_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )

    def engine_only(self) -> list[str]:
        """The options set here that only the serving engine implements."""
        names = []
        if self.has_penalties:
            names.append("penalties")
        if self.stop:
            names.append("stop")
        if self.num_samples > 1 or self.use_beam_search:
            names.append("n/best_of/use_beam_search")
        if self.logprobs is not None or self.prompt_logprobs is not None:
            names.append("logprobs/prompt_logprobs")
        return names


@dataclasses.dataclass(frozen=True)
class SamplingArrays:
    """Per-row sampling parameters, [B] each."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    seed: jax.Array

    @classmethod
    def from_params(
        cls,
        params: Sequence[SamplingParams],
        batch: int,
        seeds: Sequence[int] | None = None,
    ) -> SamplingArrays:
        """Pad to `batch` rows with greedy rows. Seeds: `seeds` when given, else each
        request's own, drawn at random for unseeded requests."""
        pad = [_GREEDY] * (batch - len(params))
        rows = list(params) + pad
        if seeds is not None:
            seeds = list(seeds) + [0] * len(pad)
        else:
            rng = np.random.default_rng()
            seeds = [p.seed if p.seed is not None else int(rng.integers(2**32)) for p in rows]
        return cls(
            temperature=np.asarray([p.temperature for p in rows], np.float32),
            top_k=np.asarray([max(p.top_k, 0) for p in rows], np.int32),
            top_p=np.asarray([p.top_p for p in rows], np.float32),
            min_p=np.asarray([p.min_p for p in rows], np.float32),
            seed=np.asarray(seeds, np.uint32),
        )


_GREEDY = SamplingParams(temperature=0.0)

jax.tree_util.register_dataclass(
    SamplingArrays,
    data_fields=["temperature", "top_k", "top_p", "min_p", "seed"],
    meta_fields=[],
)


def apply_penalties(
    logits: jax.Array,
    history: jax.Array,
    history_is_output: jax.Array,
    repetition: jax.Array,
    presence: jax.Array,
    frequency: jax.Array,
) -> jax.Array:
    """Repetition, presence and frequency penalties (vLLM's/HF's definitions).

    logits [R, V] float32; history [R, L] int32 token ids of each row's prompt and output
    (ids >= V are padding); history_is_output [R, L] bool; penalties [R]. Returns [R, V].
    """
    rows, vocab = logits.shape
    r = jnp.arange(rows)[:, None]
    counts = jnp.zeros((rows, vocab), jnp.float32)
    counts = counts.at[r, history].add(history_is_output.astype(jnp.float32), mode="drop")
    seen = jnp.zeros((rows, vocab), jnp.bool_).at[r, history].set(True, mode="drop")
    rep = repetition[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    return logits - frequency[:, None] * counts - presence[:, None] * (counts > 0)


def top_logprobs(logits: jax.Array, chosen: jax.Array, k: int):
    """The model's log-probabilities: of `chosen` [R] and, when k > 0, the top k.

    logits [R, V] float32. Returns (chosen_logprob [R], top_ids [R, k], top_logprobs [R, k]).
    """
    logp = jax.nn.log_softmax(logits, axis=-1)
    chosen_lp = jnp.take_along_axis(logp, chosen[:, None], axis=-1)[:, 0]
    if k == 0:
        empty = jnp.zeros((logits.shape[0], 0))
        return chosen_lp, empty.astype(jnp.int32), empty
    top_lp, top_ids = jax.lax.top_k(logp, k)
    return chosen_lp, top_ids.astype(jnp.int32), top_lp


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


def greedy_argmax(logits: jax.Array) -> jax.Array:
    """The first index of each row's maximum, logits [B, V] -> [B] int32 (jnp.argmax's answer
    for rows without NaN). On CPU the native kernel (`cpu_kernels/argmax.cc`, one pass:
    XLA:CPU took 7-9 ms over a 64 x 49152 decode step's logits). Elsewhere a max and a min
    over a mask: XLA:CPU ran jnp.argmax's (value, index) pair reduction at about half the
    speed of this."""
    if cpu_kernels.uses_native_argmax(logits):
        return cpu_kernels.argmax(logits)
    v = logits.shape[-1]
    top = jnp.max(logits, axis=-1, keepdims=True)
    first = jnp.min(jnp.where(logits == top, jnp.arange(v, dtype=jnp.int32), v), axis=-1)
    return jnp.minimum(first, v - 1)  # a NaN row matches nowhere: keep the index in range


def sample(logits: jax.Array, params: SamplingArrays, step: jax.Array) -> jax.Array:
    """Next token per row. logits [B, V] float32 -> [B] int32.

    step: [] or [B], the index of the token being drawn in each row's output; with the row's
    seed it fixes the draw, whatever else is in the batch.
    """
    greedy_tokens = greedy_argmax(logits)

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
