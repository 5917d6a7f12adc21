"""Static-batch generation: one jit-compiled prefill, then a `lax.while_loop` of decode steps.

Prompts are left-padded to a shared length bucket T, so every sequence's next token lands in
the same cache slot and one `dynamic_update_slice` writes the whole batch. Sequence b's
tokens occupy slots [start_b, T); its RoPE position is slot - start_b, and its queries see
slots [start_b, current]. Shapes are bucketed (batch, prompt length, cache length to powers
of two) so a run over many prompt lengths compiles a handful of programs.

Axes: batch B, prompt slots T, cache slots S, vocab V.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.config import ModelConfig
from jaxllm.errors import JaxLLMError
from jaxllm.keyed_jit import KeyedJit
from jaxllm.model import Transformer, default_cache_dtype, init_cache
from jaxllm.sampling import SamplingArrays, SamplingParams, sample

MIN_PROMPT_BUCKET = 16
MAX_STOP_IDS = 8


def bucket(n: int, minimum: int = MIN_PROMPT_BUCKET) -> int:
    """Smallest power of two >= max(n, minimum)."""
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def stop_token_list(p: SamplingParams, eos_token_ids: Sequence[int]) -> list[int]:
    """The ids that end request `p`: the model's EOS (unless ignored) and its stop ids."""
    stops = [] if p.ignore_eos else list(eos_token_ids)
    stops += [x for x in p.stop_token_ids if x not in stops]
    if len(stops) > MAX_STOP_IDS:
        raise JaxLLMError(
            f"{len(p.stop_token_ids)} stop_token_ids plus the model's "
            f"{len(stops) - len(p.stop_token_ids)} EOS ids make {len(stops)}; "
            f"at most {MAX_STOP_IDS} are supported"
        )
    return stops


@dataclasses.dataclass
class Generation:
    """One sequence's result."""

    token_ids: list[int]
    finish_reason: str  # "stop" (a stop/EOS token) or "length" (max_tokens)
    prompt_len: int


@dataclasses.dataclass
class BatchTimings:
    prefill_s: float = 0.0
    decode_s: float = 0.0
    first_token_s: float = 0.0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    decode_steps: int = 0


@dataclasses.dataclass(frozen=True)
class GeneratorPrograms:
    """What the generator's programs depend on besides their array arguments: the model's
    structure and the cache dtype. Hashable, so that every generator with an equal one shares
    one set of jitted programs (`programs_for`): a second generator on the same model, or on
    one of the same structure, compiles nothing the first compiled. A sharded generator
    (jaxllm/sharded_run.py) subclasses it: the model call, the cache and the outputs' placement."""

    graphdef: Any
    config: ModelConfig
    cache_dtype: Any

    def model(self, state):
        return nnx.merge(self.graphdef, state)

    def new_cache(self, batch: int, length: int):
        return init_cache(self.config, batch, length, self.cache_dtype)

    def cache_slots(self, cache) -> int:
        return cache[0][0].shape[2]

    def prefill(self, state, tokens, starts, sp: SamplingArrays, cache_len: int):
        return prefill_impl(self, state, tokens, starts, sp, cache_len)

    def decode(self, state, cache, first, starts, prompt_len, max_new, stop_ids, sp):
        return decode_impl(self, state, cache, first, starts, prompt_len, max_new, stop_ids, sp)

    def forward(self, state, tokens):
        return forward_impl(self, state, tokens)


def prefill_impl(programs: GeneratorPrograms, state, tokens, starts, sp, cache_len: int):
    """tokens [B, T] left-padded, starts [B] -> (cache, first tokens [B])."""
    model = programs.model(state)
    b, t = tokens.shape
    cache = programs.new_cache(b, cache_len)
    slots = jnp.arange(t)
    positions = jnp.maximum(slots[None, :] - starts[:, None], 0)
    kv = jnp.arange(cache_len)[None, None, :]
    mask = (kv <= slots[None, :, None]) & (kv >= starts[:, None, None])
    logits, cache = model(tokens, positions, mask, cache, jnp.int32(0), last_only=True)
    return cache, sample(logits[:, -1], sp, jnp.int32(0))


def decode_impl(
    programs: GeneratorPrograms, state, cache, first, starts, prompt_len, max_new, stop_ids, sp
):
    """Decode until every row hit a stop id or its max_new tokens.

    first [B] (token at slot prompt_len), max_new [B], stop_ids [B, MAX_STOP_IDS] (-1 pad).
    Returns (cache, tokens [B, S] (row b's first n_b are its output), n [B], steps).
    """
    model = programs.model(state)
    b = first.shape[0]
    s = programs.cache_slots(cache)
    kv = jnp.arange(s)[None, None, :]

    def is_stop(tok):
        return jnp.any(tok[:, None] == stop_ids, axis=-1)

    out = jnp.zeros((b, s), jnp.int32).at[:, 0].set(first)
    n = jnp.ones((b,), jnp.int32)
    done = is_stop(first) | (n >= max_new)

    def cond(c):
        _, _, step, _, done, _ = c
        return (step < s - prompt_len) & ~jnp.all(done)

    def body(c):
        cache, tok, step, out, done, n = c
        slot = prompt_len + step - 1  # where `tok` goes
        positions = (slot - starts)[:, None]
        mask = (kv >= starts[:, None, None]) & (kv <= slot)
        logits, cache = model(tok[:, None], positions, mask, cache, slot)
        nxt = sample(logits[:, -1], sp, step)
        nxt = jnp.where(done, 0, nxt)
        out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, step))
        n = n + (~done).astype(jnp.int32)
        done = done | is_stop(nxt) | (n >= max_new)
        return cache, nxt, step + 1, out, done, n

    init = (cache, first, jnp.int32(1), out, done, n)
    cache, _, steps, out, _, n = jax.lax.while_loop(cond, body, init)
    return cache, out, n, steps


def forward_impl(programs: GeneratorPrograms, state, tokens):
    """Full-sequence logits [B, T, V] with a causal mask and no cache."""
    model = programs.model(state)
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t)[None], (b, t))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool))[None], (b, t, t))
    logits, _ = model(tokens, positions, mask)
    return logits


@functools.lru_cache(maxsize=16)
def programs_for(programs: GeneratorPrograms) -> tuple[Callable, Callable, Callable]:
    """The jitted (prefill, decode, forward) of `programs`, one set per equal value."""
    return (
        KeyedJit(programs.prefill, static_argnums=(4,)),
        KeyedJit(programs.decode, donate_argnums=(1,)),
        KeyedJit(programs.forward),
    )


class Generator:
    """Holds the split model and its compiled prefill/decode/forward programs."""

    def __init__(self, model: Transformer, *, max_batch: int = 64, cache_dtype=None):
        self.config = model.config
        self.graphdef, self.state = nnx.split(model)
        self.cache_dtype = jnp.dtype(cache_dtype or default_cache_dtype(model))
        self.max_batch = max_batch
        self.batch_multiple = 1  # batches are padded to a multiple of this (the data axis)
        self.programs = self._programs()
        self._prefill, self._decode, self._forward = programs_for(self.programs)
        self.last_timings = BatchTimings()

    def _programs(self) -> GeneratorPrograms:
        """What the programs are traced from (a sharded generator returns its own kind)."""
        return GeneratorPrograms(self.graphdef, self.config, self.cache_dtype)

    def _new_cache(self, batch: int, length: int):
        return self.programs.new_cache(batch, length)

    # ------------------------------------------------------------------ host side
    def check_prompt(self, ids: Sequence[int], max_tokens: int) -> None:
        limit = self.config.max_position_embeddings
        if len(ids) == 0:
            raise JaxLLMError("prompt is empty (0 tokens); at least 1 token is needed")
        if len(ids) + max_tokens > limit:
            raise JaxLLMError(
                f"prompt of {len(ids)} tokens + max_tokens={max_tokens} exceeds the "
                f"context of {limit} tokens"
            )
        bad = [t for t in ids if not 0 <= int(t) < self.config.vocab_size]
        if bad:
            raise JaxLLMError(f"token id {bad[0]} is out of range [0, {self.config.vocab_size})")

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: Sequence[SamplingParams],
        *,
        eos_token_ids: Sequence[int] = (),
        on_first_tokens: Callable[[list[int]], None] | None = None,
    ) -> list[Generation]:
        """Generate for every prompt; batches of up to max_batch run together."""
        if len(params) != len(prompts):
            raise JaxLLMError(f"{len(params)} sampling params for {len(prompts)} prompts")
        # Every request is checked before any batch runs: a bad one fails alone, early.
        for ids, p in zip(prompts, params):
            self.check_prompt(ids, p.max_tokens)
            stop_token_list(p, eos_token_ids)
            if p.engine_only():
                raise JaxLLMError(
                    f"{', '.join(p.engine_only())} need the serving engine; the static "
                    "generator (LLM(..., engine=False)) does not implement them"
                )
        results: list[Generation] = []
        totals = BatchTimings()
        for i in range(0, len(prompts), self.max_batch):
            chunk = slice(i, i + self.max_batch)
            results += self._generate_batch(
                prompts[chunk], params[chunk], eos_token_ids, on_first_tokens, totals
            )
        self.last_timings = totals
        return results

    def _generate_batch(self, prompts, params, eos_token_ids, on_first_tokens, totals):
        n_real = len(prompts)
        b = -(-bucket(n_real, minimum=1) // self.batch_multiple) * self.batch_multiple
        lens = [len(p) for p in prompts]
        t = bucket(max(lens))
        max_new = max(p.max_tokens for p in params)
        s = bucket(t + max_new)
        tokens = np.zeros((b, t), np.int32)
        starts = np.full((b,), t - 1, np.int32)
        for row, ids in enumerate(prompts):
            tokens[row, t - len(ids) :] = ids
            starts[row] = t - len(ids)
        stop_ids = np.full((b, MAX_STOP_IDS), -1, np.int32)
        max_new_rows = np.ones((b,), np.int32)
        for row, p in enumerate(params):
            stops = stop_token_list(p, eos_token_ids)
            stop_ids[row, : len(stops)] = stops
            max_new_rows[row] = p.max_tokens
        sp = SamplingArrays.from_params(params, b)

        t0 = time.perf_counter()
        cache, first = self._prefill(self.state, tokens, starts, sp, s)
        first_host = np.asarray(first)
        t1 = time.perf_counter()
        if on_first_tokens is not None:
            on_first_tokens([int(x) for x in first_host[:n_real]])
        _, out, n, steps = self._decode(
            self.state, cache, first, starts, np.int32(t), max_new_rows, stop_ids, sp
        )
        out, n = np.asarray(out), np.asarray(n)
        t2 = time.perf_counter()
        if totals.first_token_s == 0.0:
            totals.first_token_s = t1 - t0
        totals.prefill_s += t1 - t0
        totals.decode_s += t2 - t1
        totals.prompt_tokens += sum(lens)
        totals.decode_steps += int(steps) - 1

        results = []
        for row in range(n_real):
            ids = out[row, : n[row]].tolist()
            stopped = bool(ids) and ids[-1] in set(stop_ids[row].tolist()) - {-1}
            totals.generated_tokens += len(ids)
            results.append(Generation(ids, "stop" if stopped else "length", lens[row]))
        return results

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """float32 logits [T, V] at every position of one sequence."""
        self.check_prompt(token_ids, 0)
        t = len(token_ids)
        tb = bucket(t)
        tokens = np.zeros((1, tb), np.int32)
        tokens[0, :t] = token_ids  # right padding: causal attention keeps it out of [0, t)
        return np.asarray(self._forward(self.state, tokens))[0, :t]
