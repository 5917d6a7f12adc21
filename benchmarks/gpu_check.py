"""Accelerator check: attention correctness and throughput against jax.nn.dot_product_attention
(cuDNN and XLA), and decode throughput of the static generator, in one short run.

    bash benchmarks/gpu_check.sh          # on a GPU machine (prints a table)
    python benchmarks/gpu_check.py --quick  # tiny shapes, any backend (a smoke test)
    bash benchmarks/gpu_check.sh --int8-only  # only the int8 weight-only rows (int8_check.py)

Random weights at real shapes (no checkpoint is needed: the GPU machines have no network).
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.reference import attention_reference


def timeit(f, *args, reps=10):
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def ours(q, k, v):
    """[B, T, H, D] with K/V [B, S, K, D] -> the reference's grouped layout and back."""
    b, t, h, d = q.shape
    kv = k.shape[2]
    mask = jnp.tril(jnp.ones((t, k.shape[1]), bool))[None]
    out = attention_reference(
        q.reshape(b, t, kv, h // kv, d),
        k.transpose(0, 2, 1, 3),
        v.transpose(0, 2, 1, 3),
        jnp.broadcast_to(mask, (b, t, k.shape[1])),
        sm_scale=d**-0.5,
    )
    return out.reshape(b, t, h, d)


def attention_check(b, t, h, kv, d, dtype):
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(keys[0], (b, t, h, d), dtype)
    k = jax.random.normal(keys[1], (b, t, kv, d), dtype)
    v = jax.random.normal(keys[2], (b, t, kv, d), dtype)
    flops = 4 * b * h * t * t * d / 2  # causal
    rows = []
    impls = {"jaxllm reference (XLA)": jax.jit(ours)}
    for impl in ("xla", "cudnn"):
        if impl == "cudnn" and jax.default_backend() != "gpu":
            continue
        impls[f"dot_product_attention[{impl}]"] = jax.jit(
            lambda q, k, v, impl=impl: jax.nn.dot_product_attention(
                q, k, v, is_causal=True, implementation=impl
            )
        )
    want = np.asarray(impls["jaxllm reference (XLA)"](q, k, v), np.float32)
    for name, f in impls.items():
        got = np.asarray(f(q, k, v), np.float32)
        err = float(np.abs(got - want).max())
        s = timeit(f, q, k, v)
        rows.append((name, err, s * 1e3, flops / s / 1e12))
    return rows


@functools.lru_cache(maxsize=2)
def _weights(model: str):
    from jaxllm.checkpoints.registry import load_model

    return load_model(model, log=lambda *a: None)  # random weights: made once, reused


def decode_check(
    model: str,
    batch: int,
    new_tokens: int,
    dtype: str,
    attention: str = "auto",
    quant: str | None = None,
    mode: str = "auto",
):
    """(decode tok/s, prefill tok/s) of the static generator, prompts of 128 tokens.
    `quant`: a quantization recipe; `mode`: the int8 kernel mode while it compiles."""
    from jaxllm.generate import Generator
    from jaxllm.model import Transformer
    from jaxllm.quant import quantize_model
    from jaxllm.quant.int8_kernel import int8_kernel_mode
    from jaxllm.sampling import SamplingParams

    loaded = _weights(model)
    net = Transformer(
        loaded.config, loaded.params, dtype=jnp.dtype(dtype), attention=attention,
        rope_factors=loaded.rope_factors,
    )  # fmt: skip
    if quant is not None:
        net = quantize_model(net, quant)
    gen = Generator(net)
    prompts = [list(range(1, 129))] * batch
    p = [SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)] * batch
    with int8_kernel_mode(mode):  # read when the steps are traced, and picks their program
        gen.generate(prompts, p)
        gen.generate(prompts, p)
    t = gen.last_timings
    return t.decode_steps * batch / t.decode_s, batch * 128 / t.prefill_s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-decode", action="store_true")
    ap.add_argument("--tune", action="store_true", help="also sweep paged-decode launches")
    ap.add_argument("--int8-only", action="store_true", help="only the int8 weight-only rows")
    args = ap.parse_args()
    import int8_check  # benchmarks/int8_check.py: int8 GEMV and decode rows
    import kernels  # benchmarks/kernels.py: kernel checks and throughput tables

    print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}")
    t0 = time.perf_counter()
    if args.int8_only:
        int8_check.run(decode_check, args.quick)
        return 1 if kernels.FAILED else 0
    kernels.checks(args.quick)
    print(f"(checks took {time.perf_counter() - t0:.0f} s)", flush=True)
    kernels.flash_table(args.quick)
    kernels.paged_table(args.quick)
    if args.tune:
        kernels.paged_tuning(args.quick)
    int8_check.gemv_table(args.quick)
    print(f"(kernel tables done at {time.perf_counter() - t0:.0f} s)", flush=True)
    if args.no_decode:
        return 1 if kernels.FAILED else 0
    decode = (
        [("tiny", 1, 16)] if args.quick else [("llama-3.2-1b", 1, 128), ("llama-3.2-1b", 16, 128)]
    )
    dtypes = ("float32",) if args.quick else ("bfloat16",)
    print(
        "\n| decode (random weights) | batch | dtype | attention | decode tok/s | prefill tok/s |"
    )
    print("|---|---|---|---|---|---|")
    float_batch1 = None  # the int8 rows' baseline
    for model, batch, new in decode:
        for dt in dtypes:
            # flash at batch 16 only: the check must finish in 5 minutes on a cold machine
            for attn in ("xla", "flash") if batch > 1 or args.quick else ("xla",):
                tps, pps = decode_check(model, batch, new, dt, attn)
                print(f"| {model} | {batch} | {dt} | {attn} | {tps:.1f} | {pps:.0f} |", flush=True)
                if batch == 1 and attn == "xla":
                    float_batch1 = tps
    int8_check.decode_rows(decode_check, args.quick, float_batch1)
    print(f"(total {time.perf_counter() - t0:.0f} s)")
    if kernels.FAILED:
        print(f"FAILED checks: {kernels.FAILED}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
