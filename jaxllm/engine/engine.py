"""The serving engine: requests in, tokens out, one scheduled step at a time.

    engine = LLMEngine(model, EngineConfig(num_pages=256))
    rid = engine.add_request([1, 2, 3], SamplingParams(max_tokens=8))
    while engine.has_unfinished():
        for update in engine.step():
            ...  # update.request_id, update.new_token, update.finished

State lives here and in the block manager/scheduler; the device work is the model runner's.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from jaxllm.engine.block_manager import BlockManager
from jaxllm.engine.model_runner import ModelRunner, kv_bytes_per_token
from jaxllm.engine.request import Request, Status
from jaxllm.engine.scheduler import Scheduler
from jaxllm.errors import JaxLLMError
from jaxllm.generate import stop_token_list
from jaxllm.model import Transformer
from jaxllm.sampling import SamplingParams


@dataclass(frozen=True)
class EngineConfig:
    """KV pool and step limits. The pool is `num_pages` pages, or what `kv_cache_bytes` holds."""

    page_size: int = 16
    num_pages: int | None = None
    kv_cache_bytes: int = 256 * 2**20
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    enable_prefix_caching: bool = True

    def pages_for(self, model: Transformer) -> int:
        if self.num_pages is not None:
            return self.num_pages
        kv_dtype = getattr(model, "kv_cache_dtype", None) or model.dtype
        per_page = kv_bytes_per_token(model.config, kv_dtype) * self.page_size
        return max(1, self.kv_cache_bytes // per_page)


@dataclass
class StepOutput:
    request_id: str
    new_token: int
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" once finished


class LLMEngine:
    def __init__(
        self,
        model: Transformer,
        config: EngineConfig = EngineConfig(),
        *,
        eos_token_ids: Sequence[int] = (),
    ):
        self.config = config
        self.model_config = model.config
        self.eos_token_ids = tuple(eos_token_ids)
        num_pages = config.pages_for(model)
        self.blocks = BlockManager(
            num_pages, config.page_size, enable_prefix_caching=config.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            self.blocks,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
        )
        self.runner = ModelRunner(model, num_pages, config.page_size)
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self._rng = np.random.default_rng()
        self.steps = 0

    # ------------------------------------------------------------------ requests
    def check_request(self, prompt: Sequence[int], params: SamplingParams) -> frozenset[int]:
        """Raise `JaxLLMError` naming the value and the limit if the request cannot run;
        returns its stop token ids."""
        prompt = [int(t) for t in prompt]
        limit = self.model_config.max_position_embeddings
        vocab = self.model_config.vocab_size
        if not prompt:
            raise JaxLLMError("empty prompt: at least one token is needed")
        if len(prompt) + params.max_tokens > limit:
            raise JaxLLMError(
                f"prompt of {len(prompt)} tokens + max_tokens {params.max_tokens} exceeds the "
                f"context of {limit} tokens"
            )
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise JaxLLMError(f"token id {bad[0]} is out of range [0, {vocab})")
        pages = -(-(len(prompt) + params.max_tokens) // self.config.page_size)
        if pages > self.blocks.num_pages:
            raise JaxLLMError(
                f"request needs {pages} KV pages (prompt {len(prompt)} + max_tokens "
                f"{params.max_tokens}), more than the pool's {self.blocks.num_pages}"
            )
        return frozenset(stop_token_list(params, self.eos_token_ids))

    def add_request(
        self,
        prompt: Sequence[int],
        params: SamplingParams,
        request_id: str | None = None,
    ) -> str:
        """Queue a request; a bad one raises `JaxLLMError` here and nothing else is touched."""
        prompt = [int(t) for t in prompt]
        stops = self.check_request(prompt, params)
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self.requests and not self.requests[rid].status.finished:
            raise JaxLLMError(f"request id {rid!r} is already in flight")
        if params.seed is None:  # fixed now, so a preempted request resamples the same way
            params = dataclasses.replace(params, seed=int(self._rng.integers(2**31)))
        req = Request(rid, prompt, params, stops)
        self.requests[rid] = req
        self.scheduler.add(req)
        return rid

    def abort(self, request_id: str) -> bool:
        req = self.scheduler.abort(request_id)
        if req is not None:
            req.finish_time = time.perf_counter()
        return req is not None

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # ------------------------------------------------------------------ stepping
    def step(self) -> list[StepOutput]:
        """Schedule, run and sample one step; returns each new token."""
        out = self.scheduler.schedule()
        if not out.seqs:
            if self.scheduler.has_work():
                raise JaxLLMError("no request fits in the KV pool (all pages in use)")
            return []
        tables = {s.request.request_id: self.blocks.table(s.request.request_id) for s in out.seqs}
        sampled = self.runner.execute(out, tables)
        now = time.perf_counter()
        self.scheduler.update(out, sampled, now)
        self.steps += 1
        updates = []
        for rid, tok in sampled.items():
            req = self.requests[rid]
            reason = req.status.value if req.status.finished else None
            updates.append(StepOutput(rid, tok, req.status.finished, reason))
        return updates

    def run(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]):
        """Add every request (all are validated first), then step until all finish.

        Returns the finished `Request`s in prompt order."""
        if len(prompts) != len(params):
            raise JaxLLMError(f"{len(params)} sampling params for {len(prompts)} prompts")
        for ids, p in zip(prompts, params):  # validate all before queueing any
            self.check_request(ids, p)
        rids = [self.add_request(ids, p) for ids, p in zip(prompts, params)]
        while self.has_unfinished():
            self.step()
        return [self.requests.pop(r) for r in rids]

    # ------------------------------------------------------------------ metrics
    def metrics(self) -> dict[str, float | int]:
        b = self.blocks
        return {
            "kv_pages_total": b.num_pages,
            "kv_pages_free": b.num_free,
            "kv_pages_used": b.num_pages - b.num_free,
            "prefix_cache_hit_rate": b.hits / b.queries if b.queries else 0.0,
            "prefix_cache_hit_tokens": b.hits,
            "preemptions": self.scheduler.num_preemptions,
            "steps": self.steps,
            "compiled_shapes": len(self.runner.compiled_shapes),
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
        }


__all__ = ["EngineConfig", "LLMEngine", "Status", "StepOutput"]
