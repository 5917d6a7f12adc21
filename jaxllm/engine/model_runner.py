"""Runs a scheduled step on device: packs it into fixed shape buckets, calls the model over the
paged cache, and samples every sequence that reached its last known token.

Buckets (powers of two): tokens in the step, sequence slots, pages per sequence (and, for the
jnp CPU path only, decode rows, prefill chunks and chunk rows). A workload compiles one program
per bucket combination it meets, not one per step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax
import numpy as np
from flax import nnx

from jaxllm.attention import paged_reads_split
from jaxllm.engine.scheduler import SchedulerOutput
from jaxllm.keyed_jit import KeyedJit
from jaxllm.model import PagedMeta, Transformer, default_cache_dtype, init_pages
from jaxllm.quant.kv import kv_bytes_per_element
from jaxllm.quant.kv_bits import page_storage
from jaxllm.sampling import (
    SamplingArrays,
    SamplingParams,
    apply_penalties,
    sample,
    top_logprobs,
)


def pow2_bucket(n: int, minimum: int = 1) -> int:
    if n <= 0 and minimum <= 0:
        return 0
    b = max(minimum, 1)
    while b < n:
        b *= 2
    return b


@dataclass
class Draw:
    """One token to draw this step from the logits of scheduled sequence `seq` (an index
    into `SchedulerOutput.seqs`). A sequence forking into n samples has n draws."""

    seq: int
    params: SamplingParams
    seed: int
    step: int  # index of the token in the output: with the seed, it fixes the draw
    logprobs: int = -1  # -1: none; 0: the drawn token's log-probability; k: also the top k
    history: Sequence[int] = ()  # prompt + output ids, read when params has penalties
    num_prompt: int = 0


@dataclass
class DrawResult:
    token: int
    logprob: float | None  # the model's log-probability of `token` (before penalties)
    top: list[tuple[int, float]]  # the model's top-k (id, log-probability), best first


@dataclass
class PromptLogprob:
    position: int  # of the prompt token scored (>= 1)
    logprob: float
    top: list[tuple[int, float]]


def step_impl(
    graphdef, state_def, state, pages, tokens, positions, meta, logits_index, draw, extra,
    *, logprobs_k: int, prompt_k: int, penalties: bool,
):  # fmt: skip
    model = nnx.merge(graphdef, jax.tree.unflatten(state_def, state))
    if prompt_k < 0:  # the draws' hidden rows go to the head, not [S, V] logits to a gather
        index = logits_index[draw["row"]]
        rows, pages = model.forward_paged(tokens, positions, pages, meta, index, draw["count"])
    else:
        logits, pages = model.forward_paged(tokens, positions, pages, meta, logits_index)
        rows = logits[draw["row"]]
    adjusted = rows
    if penalties:
        adjusted = apply_penalties(
            rows, extra["history"], extra["history_is_output"], *extra["penalties"]
        )
    out = {"tokens": sample(adjusted, draw["params"], draw["step"])}
    if logprobs_k >= 0:
        out["logprob"], out["top_ids"], out["top_logprobs"] = top_logprobs(
            rows, out["tokens"], logprobs_k
        )
    if prompt_k >= 0:
        targets = extra["prompt_targets"]
        out["prompt_logprob"], out["prompt_top_ids"], out["prompt_top_logprobs"] = top_logprobs(
            logits, targets, prompt_k
        )
    return pages, out


@functools.lru_cache(maxsize=16)
def _step_program(graphdef, state_def) -> Callable:
    """One jitted step per model structure, shared by every runner of that model: a second
    engine on the same model (a new pool, a benchmark's timed run after its warm-up) reuses
    the programs the first compiled instead of compiling each bucket again. The state goes
    in as its flat list of arrays: flattening the model's ~300 nnx Variables in Python took
    ~0.5 ms of every step."""
    return KeyedJit(
        functools.partial(step_impl, graphdef, state_def),
        donate_argnums=(1,),
        static_argnames=("logprobs_k", "prompt_k", "penalties"),
    )


def copy_pages_impl(pages, src, dst):
    """Copy-on-write: pages [K, P, page, D] per layer, page src[i] copied to dst[i]."""
    # tree.map: an int8 page pool (`QuantizedKV`) copies its scales along with its values.
    return jax.tree.map(lambda x: x.at[:, dst].set(x[:, src]), pages)


_copy_pages = jax.jit(copy_pages_impl, donate_argnums=(0,))


class ModelRunner:
    def __init__(self, model: Transformer, num_pages: int, page_size: int, cache_dtype=None):
        self.config = model.config
        self.page_size = page_size
        self.num_pages = num_pages
        self.graphdef, state = nnx.split(model)
        self.state, self.state_def = jax.tree.flatten(state)
        cache_dtype = cache_dtype or default_cache_dtype(model)
        # On CPU bfloat16 pages are held as uint16 bits: XLA:CPU has no bfloat16 scatter.
        self.pages = page_storage(init_pages(self.config, num_pages, page_size, cache_dtype))
        self._step = _step_program(self.graphdef, self.state_def)
        self._copy = _copy_pages
        # The decode/prefill split metadata is only read by the jnp CPU path; leaving it
        # empty otherwise keeps it out of the compiled shapes.
        self.split = paged_reads_split(
            model.attention, self.config.group_size, page_size, cache_dtype, self.config.head_dim
        )
        self.compiled_shapes: set[tuple[int, ...]] = set()

    def execute(
        self,
        out: SchedulerOutput,
        tables: dict[str, list[int]],
        draws: Sequence[Draw],
        prompt_logprobs: dict[int, int] | None = None,
    ) -> tuple[list[DrawResult], dict[int, list[PromptLogprob]]]:
        """Run one step: every draw's token (and log-probabilities), and for each sequence
        index in `prompt_logprobs` (-> k) the scores of its prompt tokens computed this step."""
        if out.copies:
            src, dst = (np.asarray(x, np.int32) for x in zip(*out.copies))
            self.pages = self._copy(self.pages, src, dst)
        prompt_logprobs = prompt_logprobs or {}
        seqs = out.seqs
        ps = self.page_size
        t_b = pow2_bucket(out.num_tokens)
        s_b = pow2_bucket(len(seqs))
        p_b = pow2_bucket(max(len(tables[s.request.request_id]) for s in seqs))
        drop = self.num_pages * ps  # out of range: padding writes are dropped
        tokens = np.zeros(t_b, np.int32)
        positions = np.zeros(t_b, np.int32)
        slots = np.full(t_b, drop, np.int32)
        kv_lens = np.zeros(s_b, np.int32)
        block_tables = np.zeros((s_b, p_b), np.int32)
        cu = np.zeros(s_b + 1, np.int32)
        row = 0
        for i, s in enumerate(seqs):
            req = s.request
            table = tables[req.request_id]
            pos = np.arange(s.start, s.start + s.num_tokens)
            tokens[row : row + s.num_tokens] = req.tokens[s.start : s.start + s.num_tokens]
            positions[row : row + s.num_tokens] = pos
            slots[row : row + s.num_tokens] = np.asarray(table)[pos // ps] * ps + pos % ps
            row += s.num_tokens
            cu[i + 1] = row
            kv_lens[i] = s.start + s.num_tokens
            block_tables[i, : len(table)] = table
        cu[len(seqs) + 1 :] = row
        last_rows = cu[1 : len(seqs) + 1] - 1
        # Logits for each sequence's last token; for every token when prompts are scored.
        extra: dict = {}
        prompt_k = -1
        if prompt_logprobs:
            logits_index = np.arange(t_b, dtype=np.int32)
            draw_rows = last_rows
            prompt_k = pow2_bucket(max(prompt_logprobs.values()), 0)
            targets = np.zeros(t_b, np.int32)
            for i in prompt_logprobs:
                s = seqs[i]
                nxt = s.request.tokens[s.start + 1 : s.start + s.num_tokens + 1]
                targets[cu[i] : cu[i] + len(nxt)] = nxt
            extra["prompt_targets"] = targets
        else:
            logits_index = np.zeros(s_b, np.int32)
            logits_index[: len(seqs)] = last_rows
            draw_rows = np.arange(len(seqs), dtype=np.int32)
        r_b = max(s_b, pow2_bucket(len(draws)))
        seeds = [d.seed for d in draws]
        draw = {
            "row": np.zeros(r_b, np.int32),
            "step": np.zeros(r_b, np.int32),
            "params": SamplingArrays.from_params([d.params for d in draws], r_b, seeds=seeds),
            "count": np.int32(len(draws)),  # draws from here on are padding
        }
        for j, d in enumerate(draws):
            draw["row"][j] = draw_rows[d.seq]
            draw["step"][j] = d.step
        penalties = any(d.params.has_penalties for d in draws)
        if penalties:
            hist_len = pow2_bucket(max(len(d.history) for d in draws), 16)
            vocab = self.config.vocab_size
            history = np.full((r_b, hist_len), vocab, np.int32)
            is_output = np.zeros((r_b, hist_len), np.bool_)
            pen = np.zeros((3, r_b), np.float32)
            pen[0] = 1.0
            for j, d in enumerate(draws):
                if d.params.has_penalties:
                    history[j, : len(d.history)] = d.history
                    is_output[j, d.num_prompt : len(d.history)] = True
                    p = d.params
                    pen[:, j] = (p.repetition_penalty, p.presence_penalty, p.frequency_penalty)
            extra.update(history=history, history_is_output=is_output, penalties=tuple(pen))
        logprobs_k = max((d.logprobs for d in draws), default=-1)
        if logprobs_k > 0:
            logprobs_k = pow2_bucket(logprobs_k)
        # The CPU split: one-token sequences, then multi-token chunks padded to [C, R].
        dec = [i for i, s in enumerate(seqs) if s.num_tokens == 1] if self.split else []
        pre = [i for i, s in enumerate(seqs) if s.num_tokens > 1] if self.split else []
        n_b, c_b = pow2_bucket(len(dec), 0), pow2_bucket(len(pre), 0)
        rr_b = pow2_bucket(max((seqs[i].num_tokens for i in pre), default=0), 0)
        dec_rows = np.full(n_b, t_b, np.int32)
        dec_seq = np.zeros(n_b, np.int32)
        dec_rows[: len(dec)] = cu[dec]
        dec_seq[: len(dec)] = dec
        pre_rows = np.full((c_b, rr_b), t_b, np.int32)
        pre_seq = np.zeros(c_b, np.int32)
        for c, i in enumerate(pre):
            pre_rows[c, : seqs[i].num_tokens] = np.arange(cu[i], cu[i + 1])
            pre_seq[c] = i
        meta = PagedMeta(
            slot_mapping=slots,
            kv_lens=kv_lens,
            block_tables=block_tables,
            cu_q_lens=cu,
            num_seqs=np.int32(len(seqs)),
            dec_rows=dec_rows,
            dec_seq=dec_seq,
            pre_rows=pre_rows,
            pre_seq=pre_seq,
        )
        self.compiled_shapes.add(
            (t_b, s_b, p_b, n_b, c_b, rr_b, r_b, logprobs_k, prompt_k, penalties)
            + ((extra["history"].shape[1],) if penalties else ())
        )
        self.pages, res = self._step(
            self.state, self.pages, tokens, positions, meta, logits_index, draw, extra,
            logprobs_k=logprobs_k, prompt_k=prompt_k, penalties=penalties,
        )  # fmt: skip
        res = jax.device_get(res)
        results = []
        for j, d in enumerate(draws):
            top = []
            if d.logprobs > 0:
                ids, lps = res["top_ids"][j, : d.logprobs], res["top_logprobs"][j, : d.logprobs]
                top = [(int(a), float(b)) for a, b in zip(ids, lps)]
            lp = float(res["logprob"][j]) if d.logprobs >= 0 else None
            results.append(DrawResult(int(res["tokens"][j]), lp, top))
        scored: dict[int, list[PromptLogprob]] = {}
        for i, k in prompt_logprobs.items():
            s = seqs[i]
            n_prompt = len(s.request.prompt)
            items = []
            for r, pos in enumerate(range(s.start, s.start + s.num_tokens)):
                if pos + 1 >= n_prompt:
                    break
                top = []
                if k > 0:
                    ids = res["prompt_top_ids"][cu[i] + r, :k]
                    lps = res["prompt_top_logprobs"][cu[i] + r, :k]
                    top = [(int(a), float(b)) for a, b in zip(ids, lps)]
                items.append(PromptLogprob(pos + 1, float(res["prompt_logprob"][cu[i] + r]), top))
            scored[i] = items
        return results, scored


def kv_bytes_per_token(config, dtype) -> int:
    per_element = kv_bytes_per_element(dtype, config.head_dim)  # int8 counts its scales
    return int(2 * config.num_layers * config.num_kv_heads * config.head_dim * per_element)
