"""Iteration-level scheduling: every step, one token budget shared by decode tokens and prefill
chunks (no separate prefill phase), FCFS over a running and a waiting queue.

Running requests go first, in arrival order: each gets the tokens it has not computed yet (one
for a decode, the rest of the prompt for a prefill) up to the remaining budget, so a long
prompt is prefilled in chunks across steps. When pages run out, the newest running request is
preempted: its pages are freed and it returns to the front of the waiting queue, to be
recomputed later (its full pages usually come back from the prefix cache). Waiting requests are
then admitted while budget, sequence slots and pages last.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from jaxllm.engine.block_manager import BlockManager
from jaxllm.engine.request import Request, Status


@dataclass
class Scheduled:
    request: Request
    start: int  # first token position computed this step
    num_tokens: int

    @property
    def samples(self) -> bool:
        """Whether this step reaches the end of the request's known tokens (so it samples)."""
        return self.start + self.num_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    seqs: list[Scheduled] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)  # page copy-on-write (src, dst)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.seqs)


class Scheduler:
    def __init__(self, blocks: BlockManager, *, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request_id: str) -> Request | None:
        """Drop a request wherever it is and free its pages at once."""
        for queue in (self.running, self.waiting):
            for req in list(queue):
                if req.request_id == request_id:
                    queue.remove(req)
                    self.blocks.free_seq(request_id)
                    req.status = Status.FINISHED_ABORTED
                    return req
        return None

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self.blocks.free_seq(req.request_id)
        req.num_computed = 0
        req.status = Status.WAITING
        req.preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)
        out.preempted.append(req)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed, budget)
            if n == 0:  # a beam waiting for the rest of its group to be scored
                i += 1
                continue
            while not self.blocks.can_allocate(req.request_id, req.num_computed + n):
                victim = self.running.pop()  # the newest
                self._preempt(victim, out)
                if victim is req:
                    break
            else:
                out.copies += self.blocks.allocate(req.request_id, req.num_computed + n)
                out.seqs.append(Scheduled(req, req.num_computed, n))
                budget -= n
                i += 1
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            # Scoring the prompt needs every prompt token computed, so no cache lookup then.
            lookup = req.params.prompt_logprobs is None or bool(req.output)
            cached = self.blocks.allocate_prompt(req.request_id, req.tokens, lookup)
            n = min(req.num_tokens - cached, budget)
            if not self.blocks.can_allocate(req.request_id, cached + n):
                self.blocks.free_seq(req.request_id)  # its cached pages stay cached
                break
            self.waiting.popleft()
            req.num_computed = cached
            if req.preemptions == 0 or not req.output:
                req.num_cached = min(cached, len(req.prompt))
            req.status = Status.RUNNING
            out.copies += self.blocks.allocate(req.request_id, cached + n)
            self.running.append(req)
            out.seqs.append(Scheduled(req, cached, n))
            budget -= n
        return out

    def advance(self, out: SchedulerOutput) -> None:
        """After a step ran: advance computed counts and register newly full pages."""
        for s in out.seqs:
            req = s.request
            if req.status is not Status.RUNNING:  # aborted meanwhile
                continue
            req.num_computed = s.start + s.num_tokens
            self.blocks.commit_full_pages(req.request_id, req.tokens[: req.num_computed])

    def remove(self, req: Request) -> None:
        """Take a request out of either queue and free its pages (finished, or a beam that
        fell out of its group)."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.blocks.free_seq(req.request_id)

    def add_running(self, req: Request) -> None:
        """A sequence forked from a running one (its pages are already shared)."""
        req.status = Status.RUNNING
        self.running.append(req)

    def update(self, out: SchedulerOutput, sampled: dict[str, int], now: float) -> list[Request]:
        """`advance`, then append each sampled token; returns the requests that finished this
        step (their pages are freed)."""
        self.advance(out)
        finished = []
        for s in out.seqs:
            req = s.request
            if s.samples and req.status is Status.RUNNING:
                req.append(sampled[req.request_id], now)
                if req.status.finished:
                    self.remove(req)
                    finished.append(req)
        return finished
