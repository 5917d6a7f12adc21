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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxllm.engine.block_manager import BlockManager
from jaxllm.engine.model_runner import Draw, DrawResult, ModelRunner, kv_bytes_per_token
from jaxllm.engine.request import Request, Status
from jaxllm.engine.scheduler import Scheduler
from jaxllm.errors import JaxLLMError
from jaxllm.generate import stop_token_list
from jaxllm.model import Transformer, default_cache_dtype
from jaxllm.sampling import SamplingParams

KV_CACHE_DTYPES = (None, "float32", "float16", "bfloat16")


@dataclass(frozen=True)
class EngineConfig:
    """KV pool and step limits. The pool is `num_pages` pages, or what `kv_cache_bytes` holds
    (at most enough for `max_num_seqs` sequences of the model's full context).

    The pool sets how many requests decode together, and decode only reaches the GEMM rate
    at wide batches (see JAX_NOTES), so it is sized like vLLM's: generously. 1.5 GiB holds
    about 34k tokens of SmolLM2-135M in float32, every request of a 64-request workload.

    `kv_cache_dtype` (None: the model's) stores the pages in float16 or bfloat16: half the
    bytes per token, and decode reads the whole cache every step (llama.cpp's default cache
    is float16). The native CPU attention reads such pages in place."""

    page_size: int = 16
    num_pages: int | None = None
    kv_cache_bytes: int = 1536 * 2**20
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    enable_prefix_caching: bool = True
    kv_cache_dtype: str | None = None

    def __post_init__(self) -> None:
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise JaxLLMError(
                f"kv_cache_dtype={self.kv_cache_dtype!r} is not one of "
                f"{', '.join(str(d) for d in KV_CACHE_DTYPES)}"
            )

    def cache_dtype(self, model: Transformer) -> Any:
        """The pages' dtype: `kv_cache_dtype`, else the model's (a KV quantization recipe's
        `kv_cache_dtype`, else its compute dtype)."""
        if self.kv_cache_dtype is not None:
            return jnp.dtype(self.kv_cache_dtype)
        return default_cache_dtype(model)

    def pages_for(self, model: Transformer) -> int:
        if self.num_pages is not None:
            return self.num_pages
        kv_dtype = self.cache_dtype(model)
        per_page = kv_bytes_per_token(model.config, kv_dtype) * self.page_size
        full = self.max_num_seqs * -(-model.config.max_position_embeddings // self.page_size)
        return max(1, min(self.kv_cache_bytes // per_page, full))


@dataclass
class StepOutput:
    request_id: str
    new_token: int
    finished: bool  # this sequence is done (see `LLMEngine.is_finished` for the request)
    finish_reason: str | None  # "stop" | "length" | "abort" once finished
    index: int = 0  # which of the request's sequences (n > 1 samples, beams)


@dataclass
class Completion:
    """One finished sequence of a request."""

    index: int
    token_ids: list[int]
    text: str | None  # the text cut at a stop string; None = decode `token_ids`
    finish_reason: str
    stop_reason: int | str | None
    cumulative_logprob: float | None
    logprobs: list[dict[int, float]] | None


@dataclass
class EngineOutput:
    """A request's result: `n` completions (best first for best_of and beams)."""

    request_id: str
    prompt: list[int]
    completions: list[Completion]
    prompt_logprobs: list[dict[int, float] | None] | None
    metrics: dict[str, float | int | None]

    @property
    def output(self) -> list[int]:
        return self.completions[0].token_ids


@dataclass
class SampleGroup:
    """n (or best_of) samples of one prompt: the prompt is computed once, then forked."""

    params: SamplingParams
    seqs: list[Request]


@dataclass
class BeamGroup:
    """Beam search of width W: every step, the W live beams' top 2W continuations compete;
    the best W that do not end in a stop token live on, those that do (ranked within the
    first W) join the finished hypotheses, until W hypotheses are finished or the beams
    reach max_tokens (HF's early_stopping=True rule)."""

    request_id: str
    params: SamplingParams
    width: int
    live: list[Request]
    pending: dict[str, list[tuple[int, float]]] = dataclasses.field(default_factory=dict)
    finished: list[tuple[float, list[int], float, str, int | None]] = dataclasses.field(
        default_factory=list
    )  # (normalised score, tokens, cumulative logprob, finish reason, stop token)
    forks: int = 0

    def score(self, logprob: float, length: int) -> float:
        return logprob / max(length, 1) ** self.params.length_penalty


class LLMEngine:
    def __init__(
        self,
        model: Transformer,
        config: EngineConfig = EngineConfig(),
        *,
        eos_token_ids: Sequence[int] = (),
        detokenize: Callable[[list[int]], str] | None = None,
    ):
        """`detokenize` (token ids -> text) is needed only by requests with stop strings."""
        self.config = config
        self.model_config = model.config
        self.eos_token_ids = tuple(eos_token_ids)
        self.detokenize = detokenize
        num_pages = config.pages_for(model)
        self.blocks = BlockManager(
            num_pages, config.page_size, enable_prefix_caching=config.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            self.blocks,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
        )
        self.runner = ModelRunner(model, num_pages, config.page_size, config.cache_dtype(model))
        self.requests: dict[str, Request] = {}  # request id -> its first sequence
        self.groups: dict[str, SampleGroup | BeamGroup] = {}
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
        if params.num_samples > self.config.max_num_seqs:
            raise JaxLLMError(
                f"{params.num_samples} sequences (n/best_of) exceed max_num_seqs="
                f"{self.config.max_num_seqs}"
            )
        if params.use_beam_search and 2 * params.num_samples > vocab:
            raise JaxLLMError(f"beam width {params.num_samples} needs 2x <= vocab {vocab}")
        if params.stop and self.detokenize is None:
            raise JaxLLMError(f"stop strings {list(params.stop)!r} need a tokenizer")
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
        if rid in self.requests and not self.is_finished(rid):
            raise JaxLLMError(f"request id {rid!r} is already in flight")
        if params.seed is None:  # fixed now, so a preempted request resamples the same way
            params = dataclasses.replace(params, seed=int(self._rng.integers(2**31)))
        req = Request(rid, prompt, params, stops, seed=params.seed)
        width = params.num_samples
        if params.use_beam_search:
            req.group = BeamGroup(rid, params, width, [req])
            req.logprobs_k = 2 * width
        elif width > 1:
            req.group = SampleGroup(params, [req])
            req.fanout = width
            # best_of ranks the samples by cumulative log-probability.
            req.logprobs_k = params.logprobs if params.logprobs is not None else -1
            if width > params.n:
                req.logprobs_k = max(req.logprobs_k, 0)
        else:
            req.logprobs_k = params.logprobs if params.logprobs is not None else -1
        if params.prompt_logprobs is not None:
            req.prompt_logprobs = [None]
        self.requests[rid] = req
        self.groups.pop(rid, None)
        if req.group is not None:
            self.groups[rid] = req.group
        self.scheduler.add(req)
        return rid

    def _members(self, rid: str) -> list[Request]:
        group = self.groups.get(rid)
        if isinstance(group, SampleGroup):
            return list(group.seqs)
        if isinstance(group, BeamGroup):
            return list(group.live)
        return [self.requests[rid]]

    def is_finished(self, request_id: str) -> bool:
        group = self.groups.get(request_id)
        if isinstance(group, BeamGroup):
            return not group.live
        return all(r.status.finished for r in self._members(request_id))

    def abort(self, request_id: str) -> bool:
        if request_id not in self.requests or self.is_finished(request_id):
            return False
        now = time.perf_counter()
        for req in self._members(request_id):
            if self.scheduler.abort(req.request_id) is not None:
                req.finish_time = now
        group = self.groups.get(request_id)
        if isinstance(group, BeamGroup):
            group.live.clear()
        self.requests[request_id].status = Status.FINISHED_ABORTED
        return True

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
        draws: list[Draw] = []
        prompt_lp: dict[int, int] = {}
        for i, s in enumerate(out.seqs):
            req = s.request
            k = req.params.prompt_logprobs
            if k is not None and s.start < len(req.prompt) - 1:
                prompt_lp[i] = k
            if not s.samples:
                continue
            history = req.tokens if req.params.has_penalties else ()
            for c in range(req.fanout if not req.output else 1):
                seed = (req.seed + c) % 2**32
                draws.append(
                    Draw(i, req.params, seed, len(req.output), req.logprobs_k, history,
                         len(req.prompt))
                )  # fmt: skip
        results, scored = self.runner.execute(out, tables, draws, prompt_lp)
        now = time.perf_counter()
        self.scheduler.advance(out)
        self.steps += 1
        for i, items in scored.items():
            req = out.seqs[i].request
            for item in items:
                if item.position == len(req.prompt_logprobs):  # not again after a preemption
                    tok = req.prompt[item.position]
                    req.prompt_logprobs.append({tok: item.logprob, **dict(item.top)})
        updates: list[StepOutput] = []
        by_seq: dict[int, list[DrawResult]] = {}
        for d, r in zip(draws, results):
            by_seq.setdefault(d.seq, []).append(r)
        for i, res in by_seq.items():
            req = out.seqs[i].request
            if req.status is not Status.RUNNING:  # aborted meanwhile
                continue
            if isinstance(req.group, BeamGroup):
                req.group.pending[req.request_id] = res[0].top
                if len(req.group.pending) == len(req.group.live):
                    updates += self._advance_beams(req.group, now)
                continue
            if len(res) > 1:  # the prompt is done: fork into the request's n samples
                children = [req] + [self._fork(req, c) for c in range(1, len(res))]
                req.fanout = 1
                for child in children[1:]:
                    self.scheduler.add_running(child)
                    req.group.seqs.append(child)
            else:
                children = [req]
            for child, r in zip(children, res):
                self._append(child, r, now)
                reason = child.status.value if child.status.finished else None
                updates.append(
                    StepOutput(req.root_id or req.request_id, r.token, child.status.finished,
                               reason, child.index)
                )  # fmt: skip
        return updates

    def _fork(self, parent: Request, index: int, seq_id: str | None = None) -> Request:
        """A sequence sharing every page (and token) of `parent`, sampling with its own seed."""
        root = parent.root_id or parent.request_id
        child = Request(
            seq_id or f"{root}#{index}",
            list(parent.prompt),
            parent.params,
            parent.stop_ids,
            arrival=parent.arrival,
            output=list(parent.output),
            num_computed=parent.num_computed,
            num_cached=parent.num_cached,
            first_token_time=parent.first_token_time,
            seed=(parent.seed + index) % 2**32,
            index=index,
            group=parent.group,
            logprobs_k=parent.logprobs_k,
            cumulative_logprob=parent.cumulative_logprob,
            logprobs=list(parent.logprobs),
            prompt_logprobs=parent.prompt_logprobs,
            root_id=root,
        )
        if parent.request_id in self.blocks.seqs:
            self.blocks.fork(parent.request_id, child.request_id)
        return child

    def _append(self, req: Request, r: DrawResult, now: float) -> None:
        """Append a drawn token, with its log-probabilities, and apply the stop rules."""
        if r.logprob is not None:
            req.cumulative_logprob += r.logprob
            if req.params.logprobs is not None:
                req.logprobs.append({r.token: r.logprob, **dict(r.top[: req.params.logprobs])})
        req.append(r.token, now)
        if req.params.stop:
            self._check_stop_strings(req, now)
        if req.status.finished:
            self.scheduler.remove(req)

    def _check_stop_strings(self, req: Request, now: float) -> None:
        text = self.detokenize(req.output)  # type: ignore[misc]
        hits = [(text.find(s), s) for s in req.params.stop if s in text]
        if not hits:
            return
        at, stop = min(hits)
        req.text = text[: at + len(stop)] if req.params.include_stop_str_in_output else text[:at]
        req.stop_reason = stop
        req.status = Status.FINISHED_STOPPED
        req.finish_time = now

    def _advance_beams(self, group: BeamGroup, now: float) -> list[StepOutput]:
        """Every live beam has its top 2W continuations: pick the next W beams."""
        width = group.width
        cands = []
        for order, beam in enumerate(group.live):
            for rank, (tok, lp) in enumerate(group.pending[beam.request_id]):
                cands.append((-(beam.cumulative_logprob + lp), order, rank, beam, tok, lp))
        cands.sort(key=lambda c: c[:3])
        chosen: list[tuple[Request, int, float]] = []
        for pos, (_, _, _, beam, tok, lp) in enumerate(cands):
            if tok in beam.stop_ids:
                if pos < width:
                    total = beam.cumulative_logprob + lp
                    n = len(beam.output) + 1
                    group.finished.append(
                        (group.score(total, n), beam.output + [tok], total, "stop", tok)
                    )
            else:
                chosen.append((beam, tok, lp))
            if len(chosen) == width:
                break
        group.pending.clear()
        first_use: set[str] = set()
        live: list[tuple[Request, int, float]] = []
        for beam, tok, lp in chosen:
            if beam.request_id not in first_use:
                first_use.add(beam.request_id)
                live.append((beam, tok, lp))
                continue
            group.forks += 1
            nxt = self._fork(beam, beam.index, f"{beam.root_id or beam.request_id}#b{group.forks}")
            if beam.status is Status.RUNNING:
                self.scheduler.add_running(nxt)
            else:  # the parent was preempted: the fork waits (and recomputes) too
                nxt.status, nxt.num_computed = Status.WAITING, 0
                self.scheduler.waiting.appendleft(nxt)
            live.append((nxt, tok, lp))
        # Forks first, appends after: a fork must copy its parent's tokens before the append.
        for beam in group.live:
            if beam.request_id not in first_use:
                self.scheduler.remove(beam)
                beam.status = Status.FINISHED_ABORTED
        updates = []
        new_live = []
        for nxt, tok, lp in live:
            nxt.output.append(tok)
            nxt.cumulative_logprob += lp
            if nxt.first_token_time is None:
                nxt.first_token_time = now
            new_live.append(nxt)
            updates.append(StepOutput(nxt.root_id or nxt.request_id, tok, False, None, 0))
        group.live = new_live
        max_tokens = group.params.max_tokens
        at_length = bool(new_live) and len(new_live[0].output) >= max_tokens
        if len(group.finished) >= width or not new_live or at_length:
            for beam in group.live:
                if at_length:
                    total, n = beam.cumulative_logprob, len(beam.output)
                    hyp = (group.score(total, n), list(beam.output), total, "length", None)
                    group.finished.append(hyp)
                self.scheduler.remove(beam)
                beam.status = Status.FINISHED_LENGTH
                beam.finish_time = now
            group.live = []
            self.requests[group.request_id].finish_time = now
        return updates

    def collect(self, request_id: str) -> EngineOutput:
        """Take a finished request's result out of the engine."""
        if not self.is_finished(request_id):
            raise JaxLLMError(f"request {request_id!r} has not finished")
        first = self.requests.pop(request_id)
        group = self.groups.pop(request_id, None)
        p = first.params
        if isinstance(group, BeamGroup):
            best = sorted(group.finished, key=lambda h: -h[0])[: p.n]
            comps = [
                Completion(i, toks, None, reason, stop, total, None)
                for i, (_, toks, total, reason, stop) in enumerate(best)
            ]
        else:
            seqs = group.seqs if isinstance(group, SampleGroup) else [first]
            if p.num_samples > p.n:
                seqs = sorted(seqs, key=lambda r: -r.cumulative_logprob)[: p.n]
            comps = [
                Completion(
                    r.index,
                    list(r.output),
                    r.text,
                    r.status.value,
                    r.stop_reason,
                    r.cumulative_logprob if r.logprobs_k >= 0 else None,
                    r.logprobs if p.logprobs is not None else None,
                )
                for r in seqs
            ]
        if not comps:  # aborted before any token
            comps = [Completion(0, list(first.output), None, "abort", None, None, None)]
        metrics = first.metrics
        metrics["generated_tokens"] = sum(len(c.token_ids) for c in comps)
        prompt_lp = first.prompt_logprobs if p.prompt_logprobs is not None else None
        return EngineOutput(request_id, list(first.prompt), comps, prompt_lp, metrics)

    def run(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]):
        """Add every request (all are validated first), then step until all finish.

        Returns each request's `EngineOutput`, in prompt order."""
        if len(prompts) != len(params):
            raise JaxLLMError(f"{len(params)} sampling params for {len(prompts)} prompts")
        for ids, p in zip(prompts, params):  # validate all before queueing any
            self.check_request(ids, p)
        rids = [self.add_request(ids, p) for ids, p in zip(prompts, params)]
        while self.has_unfinished():
            self.step()
        return [self.collect(r) for r in rids]

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


__all__ = ["Completion", "EngineConfig", "EngineOutput", "LLMEngine", "Status", "StepOutput"]
