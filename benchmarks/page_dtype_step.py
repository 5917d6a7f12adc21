"""One engine decode step at a wide batch, by KV page dtype: float32 vs float16 vs bfloat16.

Fills the engine with `--batch` requests of `--context`-token prompts, runs their prefill,
then times `--steps` steps in which every request decodes one token, and prints the median
step time per page dtype. Each dtype has its own engine over the same model (pool sized by
the default `kv_cache_bytes`, so 16-bit pools hold twice the pages of a float32 one), and
the engines take their timed steps in turn.

    nice -n 15 python benchmarks/page_dtype_step.py                 # SmolLM2-135M
    nice -n 15 python benchmarks/page_dtype_step.py --model tiny    # random tiny model
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

DTYPES = ("float32", "float16", "bfloat16")


def filled_engine(model, dtype: str, batch: int, context: int, steps: int):
    """An engine whose `batch` requests are past prefill: each further step decodes one token
    for every request."""
    from jaxllm import SamplingParams
    from jaxllm.engine import EngineConfig, LLMEngine

    engine = LLMEngine(model, EngineConfig(kv_cache_dtype=dtype, max_num_seqs=batch))
    rng = np.random.default_rng(0)
    vocab = model.config.vocab_size
    params = SamplingParams(temperature=0, max_tokens=steps + 8, ignore_eos=True)
    for _ in range(batch):
        engine.add_request([int(t) for t in rng.integers(3, vocab, context)], params)
    while any(len(r.output) == 0 for r in engine.requests.values()):
        engine.step()
    engine.step()  # compiles the decode bucket
    return engine


def decode_step_times(engines: dict, steps: int) -> dict[str, list[float]]:
    """Steps taken in turn, one engine after the other, so that load from elsewhere on the
    machine falls on every dtype alike."""
    times: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(steps):
        for name, engine in engines.items():
            t0 = time.perf_counter()
            engine.step()
            times[name].append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=200)
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--dtypes", default=",".join(DTYPES))
    args = ap.parse_args()

    from jaxllm import LLM

    llm = LLM(args.model, log=lambda *a, **k: None)
    print(f"{args.model}: batch {args.batch}, {args.context}-token prompts, {args.steps} steps")
    names = args.dtypes.split(",")
    engines = {n: filled_engine(llm.model, n, args.batch, args.context, args.steps) for n in names}
    times = decode_step_times(engines, args.steps)
    print(f"{'kv dtype':>10} {'pool pages':>10} {'median ms':>10} {'min ms':>8}")
    for name in names:
        t, pages = times[name], engines[name].runner.num_pages
        print(f"{name:>10} {pages:>10} {1e3 * statistics.median(t):>10.1f} {1e3 * min(t):>8.1f}")


if __name__ == "__main__":
    main()
