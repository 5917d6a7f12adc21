"""A request's state as it moves through the engine."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from jaxllm.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"  # a stop/EOS token
    FINISHED_LENGTH = "length"  # max_tokens
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (Status.FINISHED_STOPPED, Status.FINISHED_LENGTH, Status.FINISHED_ABORTED)


@dataclass
class Request:
    """Token ids in, token ids out. `num_computed` tokens of `tokens` have K/V in the cache."""

    request_id: str
    prompt: list[int]
    params: SamplingParams  # with a fixed seed (drawn at arrival when the user gave none)
    stop_ids: frozenset[int]
    arrival: float = field(default_factory=time.perf_counter)
    output: list[int] = field(default_factory=list)
    num_computed: int = 0
    num_cached: int = 0  # prompt tokens found in the prefix cache (last admission)
    status: Status = Status.WAITING
    preemptions: int = 0
    first_token_time: float | None = None
    finish_time: float | None = None
    # What the engine tracks beside the tokens (see `LLMEngine`).
    seed: int = 0  # this sequence's sampling seed (a request's n samples use seed + i)
    index: int = 0  # which of its request's sequences this is
    group: Any = None  # the `SampleGroup`/`BeamGroup` of a request with several sequences
    fanout: int = 1  # draws at the prompt's end (a parent about to fork into n samples)
    logprobs_k: int = -1  # per output token: -1 nothing, 0 the token's logprob, k the top k
    cumulative_logprob: float = 0.0
    logprobs: list[dict[int, float]] = field(default_factory=list)
    prompt_logprobs: list[dict[int, float] | None] = field(default_factory=list)
    text: str | None = None  # the output text, cut at a stop string (only when one is set)
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    root_id: str = ""  # the request's id, for a sequence forked from its first

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    def append(self, token: int, now: float) -> None:
        self.output.append(token)
        if self.first_token_time is None:
            self.first_token_time = now
        if token in self.stop_ids:
            self.status = Status.FINISHED_STOPPED
            self.stop_reason = token
        elif len(self.output) >= self.params.max_tokens:
            self.status = Status.FINISHED_LENGTH
        if self.status.finished:
            self.finish_time = now

    @property
    def metrics(self) -> dict[str, float | int | None]:
        """Time to first token, time per output token (seconds), token counts."""
        ttft = None if self.first_token_time is None else self.first_token_time - self.arrival
        tpot = None
        if self.finish_time is not None and self.first_token_time is not None:
            if len(self.output) > 1:
                tpot = (self.finish_time - self.first_token_time) / (len(self.output) - 1)
        return {
            "time_to_first_token_s": ttft,
            "time_per_output_token_s": tpot,
            "prompt_tokens": len(self.prompt),
            "cached_prompt_tokens": self.num_cached,
            "generated_tokens": len(self.output),
            "preemptions": self.preemptions,
        }
