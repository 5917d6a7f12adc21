"""Runs a scheduled step on device: packs it into fixed shape buckets, calls the model over the
paged cache, and samples every sequence that reached its last known token.

Buckets (powers of two): tokens in the step, sequence slots, pages per sequence (and, for the
jnp CPU path only, decode rows, prefill chunks and chunk rows). A workload compiles one program
per bucket combination it meets, not one per step.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from jaxllm.attention import paged_uses_native_cpu, resolve_backend
from jaxllm.engine.scheduler import SchedulerOutput
from jaxllm.model import PagedMeta, Transformer, init_pages
from jaxllm.quant.kv import kv_bytes_per_element
from jaxllm.sampling import SamplingArrays, sample


def pow2_bucket(n: int, minimum: int = 1) -> int:
    if n <= 0 and minimum <= 0:
        return 0
    b = max(minimum, 1)
    while b < n:
        b *= 2
    return b


class ModelRunner:
    def __init__(self, model: Transformer, num_pages: int, page_size: int, cache_dtype=None):
        self.config = model.config
        self.page_size = page_size
        self.num_pages = num_pages
        self.graphdef, self.state = nnx.split(model)
        cache_dtype = cache_dtype or getattr(model, "kv_cache_dtype", None) or model.dtype
        self.pages = init_pages(self.config, num_pages, page_size, cache_dtype)
        self._step = jax.jit(self._step_impl, donate_argnums=(1,))
        self._copy = jax.jit(self._copy_impl, donate_argnums=(0,))
        # The decode/prefill split metadata is only read by the jnp CPU path; leaving it
        # empty otherwise keeps it out of the compiled shapes.
        self.split = resolve_backend(model.attention) == "xla" and not paged_uses_native_cpu(
            self.config.group_size, page_size, cache_dtype
        )
        self.compiled_shapes: set[tuple[int, ...]] = set()

    def _step_impl(self, state, pages, tokens, positions, meta, logits_index, sp, steps):
        model = nnx.merge(self.graphdef, state)
        logits, pages = model.forward_paged(tokens, positions, pages, meta, logits_index)
        return pages, sample(logits, sp, steps)

    @staticmethod
    def _copy_impl(pages, src, dst):
        # tree.map: an int8 page pool (`QuantizedKV`) copies its scales along with its values.
        return jax.tree.map(lambda x: x.at[:, dst].set(x[:, src]), pages)

    def execute(self, out: SchedulerOutput, tables: dict[str, list[int]]) -> dict[str, int]:
        """Run one step; returns the sampled token of each sequence that samples."""
        if out.copies:
            src, dst = (np.asarray(x, np.int32) for x in zip(*out.copies))
            self.pages = self._copy(self.pages, src, dst)
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
        logits_index = np.zeros(s_b, np.int32)
        steps = np.zeros(s_b, np.int32)
        params = []
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
            logits_index[i] = row - 1
            steps[i] = len(req.output)
            params.append(req.params)
        cu[len(seqs) + 1 :] = row
        # The CPU split: one-token sequences, then multi-token chunks padded to [C, R].
        dec = [i for i, s in enumerate(seqs) if s.num_tokens == 1] if self.split else []
        pre = [i for i, s in enumerate(seqs) if s.num_tokens > 1] if self.split else []
        n_b, c_b = pow2_bucket(len(dec), 0), pow2_bucket(len(pre), 0)
        r_b = pow2_bucket(max((seqs[i].num_tokens for i in pre), default=0), 0)
        dec_rows = np.full(n_b, t_b, np.int32)
        dec_seq = np.zeros(n_b, np.int32)
        dec_rows[: len(dec)] = cu[dec]
        dec_seq[: len(dec)] = dec
        pre_rows = np.full((c_b, r_b), t_b, np.int32)
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
        sp = SamplingArrays.from_params(params, s_b)
        self.compiled_shapes.add((t_b, s_b, p_b, n_b, c_b, r_b))
        self.pages, next_tokens = self._step(
            self.state, self.pages, tokens, positions, meta, logits_index, sp, steps
        )
        next_tokens = np.asarray(next_tokens)
        return {s.request.request_id: int(next_tokens[i]) for i, s in enumerate(seqs) if s.samples}


def kv_bytes_per_token(config, dtype) -> int:
    per_element = kv_bytes_per_element(dtype, config.head_dim)  # int8 counts its scales
    return int(2 * config.num_layers * config.num_kv_heads * config.head_dim * per_element)
