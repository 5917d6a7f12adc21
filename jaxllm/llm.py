"""The offline Python API: `LLM(model).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from types import SimpleNamespace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.attention import resolve_backend
from jaxllm.checkpoints.registry import cache_dir, load_model
from jaxllm.errors import JaxLLMError
from jaxllm.generate import BatchTimings, Generator
from jaxllm.model import Transformer
from jaxllm.sampling import SamplingParams

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass
class CompletionOutput:
    """One of a prompt's `n` completions (vLLM's shape)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str
    stop_reason: int | str | None = None
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, float]] | None = None  # per token: {id: logprob}, top-k + chosen


@dataclasses.dataclass
class RequestOutput:
    """One prompt's result. `outputs` holds its n completions (best first for best_of and
    beam search); `token_ids`, `text` and `finish_reason` are those of the first."""

    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    outputs: list[CompletionOutput] = dataclasses.field(default_factory=list)
    prompt_logprobs: list[dict[int, float] | None] | None = None


def enable_compilation_cache() -> None:
    """Persist compiled programs under the jaxllm cache, so a second run skips compiling."""
    if jax.config.jax_compilation_cache_dir:
        return
    path = os.environ.get("JAXLLM_XLA_CACHE", str(cache_dir() / "xla"))
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


class LLM:
    """A loaded model ready to generate.

    Args:
      model: `smollm2-135m`, a .gguf file, an HF directory (config.json + *.safetensors),
        or a shapes-only config name from configs/models (random weights).
      dtype: float32 | bfloat16 | float16 for weights and activations.
      weight_dtype: store the weight matrices in this dtype instead (`bfloat16` under
        float32: half the weight bytes, bf16 products with float32 accumulation; the
        activations, norms, softmax and logits stay in `dtype`).
      attention: attention backend (`auto`, `xla`, `flash`, `flash-prefill`, `decode`, `paged`).
      max_batch: most sequences decoded together.
      engine: run `generate`/`chat`/`stream` on the serving engine (paged KV cache,
        continuous batching; the default) or, with False, on the static batched generator.
      engine_config: the engine's KV pool and step limits (`jaxllm.engine.EngineConfig`).
      mesh: run sharded over a device mesh: `"data=2,pipeline=1,tensor=4"`, a configs/mesh
        name, a `sharding.mesh.MeshConfig` or a `jax.sharding.Mesh` (see jaxllm/parallel.py).
        On a mesh, generation uses the static generator unless engine=True (meshes
        without pipeline stages: KV pages split by KV head over `tensor`).
      microbatches: pipeline microbatches per batch (default: one per stage).
      quantization: a recipe from configs/quant (`int8`, `int4-g128`, `w8a8`, `kv-int8`,
        joined with `+`) or a `jaxllm.quant.QuantConfig`, applied before anything is jitted.
    """

    def __init__(
        self,
        model: str | os.PathLike = "smollm2-135m",
        dtype: str = "float32",
        *,
        attention: str = "auto",
        max_batch: int = 64,
        compilation_cache: bool = True,
        log: Any = print,
        engine: bool | None = None,
        engine_config: Any = None,
        mesh: Any = None,
        microbatches: int = 0,
        quantization: Any = None,
        weight_dtype: str | None = None,
    ):
        for name, value in (("dtype", dtype), ("weight_dtype", weight_dtype or dtype)):
            if value not in _DTYPES:
                raise JaxLLMError(f"{name} {value!r} is not one of {', '.join(_DTYPES)}")
        if compilation_cache:
            enable_compilation_cache()
        loaded = load_model(model, log=log)
        self.config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.source = loaded.source
        self.mesh = None
        if mesh is not None and quantization is not None:
            raise JaxLLMError(
                f"quantization={quantization!r} with mesh={mesh!r}: quantized weights do not "
                "shard yet; use one or the other"
            )
        if mesh is not None and weight_dtype not in (None, dtype):
            raise JaxLLMError(
                f"weight_dtype={weight_dtype!r} with mesh={mesh!r}: sharded models hold their "
                f"weights in dtype={dtype!r}"
            )
        if mesh is not None:
            from jaxllm.sharded_run import shard_generator

            self.generator: Generator = shard_generator(
                loaded.config, loaded.params, mesh, dtype=_DTYPES[dtype],
                attention=resolve_backend(attention), rope_factors=loaded.rope_factors,
                max_batch=max_batch, microbatches=microbatches,
            )  # fmt: skip
            self.mesh = self.generator.mesh
            self.model = self.generator.sharded.model
            if engine and self.generator.sharded.pipelined:
                raise JaxLLMError("engine=True: the serving engine runs on meshes with pipeline=1")
            engine = bool(engine)
        else:
            self.model = Transformer(
                loaded.config,
                loaded.params,
                dtype=_DTYPES[dtype],
                attention=resolve_backend(attention),
                rope_factors=loaded.rope_factors,
                weight_dtype=_DTYPES[weight_dtype or dtype],
            )
            if quantization is not None:
                from jaxllm.quant.apply import quantize_for_llm

                quantize_for_llm(self.model, quantization, self.tokenizer, self.source, log=log)
            self.generator = Generator(self.model, max_batch=max_batch)
        del loaded
        # llama.cpp's arithmetic (recipe gguf-llamacpp) is bit-exact in the static generator,
        # which evaluates a prompt as one batch and each new token alone, as llama.cpp does.
        exact = getattr(self.model, "numerics", None) == "ggml"
        if exact:
            from jaxllm.quant import ggml_exact

            exact = ggml_exact.available()  # CPU only; elsewhere the recipe's jnp path
        self.use_engine = engine if engine is not None else not exact
        self._engine_config = engine_config
        self._engine: Any = None
        self._log = log
        self._timings = BatchTimings()
        eos = list(self.config.eos_token_ids)
        if self.tokenizer is not None:
            eos += [t for t in self.tokenizer.eos_token_ids if t not in eos]
        self.eos_token_ids = tuple(eos)

    # ------------------------------------------------------------------ helpers
    def _require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise JaxLLMError(f"model {self.source!r} has no tokenizer; pass token ids instead")
        return self.tokenizer

    def encode(self, text: str) -> list[int]:
        return self._require_tokenizer().encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._require_tokenizer().decode(ids)

    # ------------------------------------------------------------------ API
    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        on_first_tokens: Any = None,
    ) -> list[RequestOutput]:
        """Generate for a prompt or a list of prompts (text, or lists of token ids)."""
        if isinstance(prompts, str) or (
            isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], (int, np.integer))
        ):
            prompts = [prompts]  # type: ignore[list-item]
        texts: list[str | None] = []
        ids: list[list[int]] = []
        for p in prompts:  # type: ignore[union-attr]
            if isinstance(p, str):
                texts.append(p)
                ids.append(self.encode(p))
            else:
                texts.append(None)
                ids.append([int(x) for x in p])
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(ids)
        else:
            params = list(sampling_params)
        if self.use_engine:
            done = self._run_engine(ids, params, on_first_tokens)
        else:
            gens = self.generator.generate(
                ids, params, eos_token_ids=self.eos_token_ids, on_first_tokens=on_first_tokens
            )
            self._timings = self.generator.last_timings
            done = [
                SimpleNamespace(
                    completions=[
                        SimpleNamespace(index=0, token_ids=g.token_ids, text=None,
                                        finish_reason=g.finish_reason, stop_reason=None,
                                        cumulative_logprob=None, logprobs=None)
                    ],
                    prompt_logprobs=None,
                    metrics={},
                )
                for g in gens
            ]  # fmt: skip
        results = []
        for text, pids, res in zip(texts, ids, done):
            outs = [
                CompletionOutput(
                    index=c.index,
                    text=c.text if c.text is not None else self._text(c.token_ids),
                    token_ids=c.token_ids,
                    finish_reason=c.finish_reason,
                    stop_reason=c.stop_reason,
                    cumulative_logprob=c.cumulative_logprob,
                    logprobs=c.logprobs,
                )
                for c in res.completions
            ]
            results.append(
                RequestOutput(
                    prompt=text,
                    prompt_token_ids=pids,
                    token_ids=outs[0].token_ids,
                    text=outs[0].text,
                    finish_reason=outs[0].finish_reason,
                    metrics=res.metrics,
                    outputs=outs,
                    prompt_logprobs=res.prompt_logprobs,
                )
            )
        return results

    def _text(self, ids: Sequence[int]) -> str:
        return self.decode(ids) if self.tokenizer is not None else ""

    @property
    def engine(self) -> Any:
        """The serving engine (`jaxllm.engine.LLMEngine`), made on first use."""
        if self._engine is None:
            from jaxllm.engine import EngineConfig, LLMEngine

            self._engine = LLMEngine(
                self.model,
                self._engine_config or EngineConfig(),
                eos_token_ids=self.eos_token_ids,
                detokenize=self.decode if self.tokenizer is not None else None,
            )
            if self.mesh is not None:
                from jaxllm.sharded_run import shard_engine

                shard_engine(self._engine, self.mesh)
        return self._engine

    def _run_engine(self, ids, params, on_first_tokens) -> list[Any]:
        eng = self.engine
        if len(params) != len(ids):
            raise JaxLLMError(f"{len(params)} sampling params for {len(ids)} prompts")
        for p, sp in zip(ids, params):  # every request is checked before any is queued
            eng.check_request(p, sp)
        t0 = time.perf_counter()
        rids = [eng.add_request(p, sp) for p, sp in zip(ids, params)]
        pending, firsts = set(rids), {}
        first_at, steps_after = None, 0
        show = len(rids) >= 8 and self._log is print
        n_done, generated = 0, 0
        while pending:
            updates = eng.step()
            for u in updates:
                firsts.setdefault(u.request_id, u.new_token)
                generated += 1
            for r in [r for r in pending if eng.is_finished(r)]:
                pending.discard(r)
                n_done += 1
            if first_at is None and len(firsts) >= len(rids):
                first_at = time.perf_counter()
                if on_first_tokens is not None:
                    on_first_tokens([firsts[r] for r in rids])
            elif first_at is not None:
                steps_after += 1
            if show:
                rate = generated / max(time.perf_counter() - t0, 1e-9)
                print(f"\r[jaxllm] {n_done}/{len(rids)} requests, {rate:.1f} tok/s",
                      end="", file=sys.stderr, flush=True)  # fmt: skip
        end = time.perf_counter()
        if show:
            print(file=sys.stderr)
        done = [eng.collect(r) for r in rids]
        first_at = first_at or end
        self._timings = BatchTimings(
            prefill_s=first_at - t0,
            decode_s=end - first_at,
            first_token_s=first_at - t0,
            prompt_tokens=sum(len(p) for p in ids),
            generated_tokens=sum(len(c.token_ids) for r in done for c in r.completions),
            decode_steps=steps_after,
        )
        return done

    def stream(
        self, prompt: str | Sequence[int], sampling_params: SamplingParams | None = None
    ) -> Iterator[str]:
        """Yield the text as it is generated, in deltas (whole characters only)."""
        ids = self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        eng = self.engine
        params = sampling_params or SamplingParams()
        if params.num_samples > 1 or params.use_beam_search:
            raise JaxLLMError(
                f"stream yields one sequence; n={params.n}, best_of={params.best_of}, "
                f"use_beam_search={params.use_beam_search} need generate()"
            )
        rid = eng.add_request(ids, params)
        sent = ""
        try:
            while True:
                eng.step()
                req = eng.requests[rid]
                text = req.text if req.text is not None else self.decode(req.output)
                if not req.status.finished and text.endswith("\ufffd"):
                    continue  # a character split across tokens: wait for the rest
                if len(text) > len(sent):
                    yield text[len(sent) :]
                    sent = text
                if req.status.finished:
                    return
        finally:
            eng.abort(rid)
            eng.requests.pop(rid, None)

    def chat(
        self,
        messages: Sequence[dict[str, str]] | Sequence[Sequence[dict[str, str]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        **kwargs: Any,
    ) -> list[RequestOutput]:
        """One conversation (a list of {role, content}) or a list of them."""
        tok = self._require_tokenizer()
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        texts = [tok.apply_chat_template(c, add_generation_prompt=True) for c in convs]
        # The template writes any BOS itself: encoding must not add a second one.
        outs = self.generate(
            [tok.encode(t, add_bos=False) for t in texts], sampling_params, **kwargs
        )
        for out, text in zip(outs, texts):
            out.prompt = text
        return outs

    @property
    def timings(self) -> Any:
        """Timings of the last `generate` call (prefill = until every first token)."""
        return self._timings

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """float32 logits [seq, vocab] at every position."""
        return self.generator.logits([int(t) for t in token_ids])

    def perplexity(self, text: str | Sequence[int], window: int = 512) -> float:
        """exp(mean NLL) over non-overlapping windows of `window` tokens (no BOS added)."""
        ids = self.encode(text) if isinstance(text, str) else [int(t) for t in text]
        if len(ids) < 2:
            raise JaxLLMError(f"perplexity needs at least 2 tokens, got {len(ids)}")
        if not 2 <= window <= self.config.max_position_embeddings:
            raise JaxLLMError(
                f"window={window} must be in [2, {self.config.max_position_embeddings}]"
            )
        nll, count = 0.0, 0
        for start in range(0, len(ids), window):
            chunk = ids[start : start + window]
            if len(chunk) < 2:
                break
            logits = self.logits(chunk).astype(np.float64)
            logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1))
            logz += logits.max(-1)
            targets = np.asarray(chunk[1:])
            nll += float((logz[:-1] - logits[np.arange(len(chunk) - 1), targets]).sum())
            count += len(chunk) - 1
        return math.exp(nll / count)
