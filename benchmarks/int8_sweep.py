"""Sweep the int8 GEMV's launches on a GPU for each linear layer of Llama-3.2-1B at batch 1,
then decode with the best launch per shape against bf16, and profile both decode steps.

    python benchmarks/int8_sweep.py [--out DIR] [--budget-s 200] [--quick]

Prints one table per shape (µs per GEMV, GB/s, % of HBM peak), the chosen launches as a
Python dict (paste into `quant_matmul.TUNED`), decode tok/s, and, from a profiler trace,
the kernels of one decode step (count, busy time, the largest). `--quick`: tiny shapes,
interpreted on CPU (checks that the script runs).
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import math
import os
import sys
import time
from collections import defaultdict

sys.path.insert(0, os.path.dirname(__file__))

import jax
import jax.numpy as jnp
from kernels import device_peak, timed

from pallas_kernels import quant_matmul as qm
from pallas_kernels.quant_matmul import GemvConfig, int8_matmul, int8_matmul_reference

# Llama-3.2-1B: fused qkv, o, fused gate/up, down, the tied head.
SHAPES = [(3072, 2048), (2048, 2048), (16384, 2048), (2048, 8192), (128256, 2048)]
CONFIGS = [
    GemvConfig(),
    GemvConfig(16, 512, 1, 4, 3, True),
    GemvConfig(8, 1024, 1, 4, 3, True),
    GemvConfig(4, 2048, 1, 4, 3, True),
    GemvConfig(4, 2048, 1, 4, 4, True),
    GemvConfig(8, 2048, 1, 8, 3, True),
    GemvConfig(8, 2048, 1, 8, 4, True),
    GemvConfig(16, 2048, 1, 8, 3, True),
    GemvConfig(16, 2048, 1, 16, 3, True),
    GemvConfig(32, 2048, 1, 16, 3, True),
    GemvConfig(16, 1024, 1, 8, 3, True),
    GemvConfig(16, 512, None, 4, 3, True),
    GemvConfig(8, 2048, 2, 8, 3, True),
    GemvConfig(8, 2048, 4, 8, 3, True),
    GemvConfig(4, 2048, 4, 4, 3, True),
    GemvConfig(16, 2048, 2, 8, 3, True),
    GemvConfig(8, 4096, 2, 8, 3, True),
    GemvConfig(64, 256, None, 4, 3, False),
    GemvConfig(4, 8192, 1, 8, 3, True),
    GemvConfig(8, 8192, 1, 8, 3, True),
]
# More launches for long rows (the down projection, I = 8192).
LONG_ROW_CONFIGS = [
    GemvConfig(),
    GemvConfig(4, 4096, 1, 8, 3, True),
    GemvConfig(4, 2048, 1, 8, 4, True),
    GemvConfig(8, 2048, 2, 8, 3, True),
    GemvConfig(16, 1024, 2, 4, 3, True),
    GemvConfig(4, 2048, 2, 4, 3, True),
    GemvConfig(32, 256, None, 8, 4, False),
    GemvConfig(64, 256, None, 4, 3, False),
]
# XLA flags tried for the whole decode loop: CUDA graphs (command buffers) for every thunk
# kind including while loops, so a decode step's ~100 kernels launch as one graph.
FLAG_VARIANTS = {
    "default": "",
    "command buffers incl. while": "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,"
    "CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL --xla_gpu_graph_min_graph_size=1",
}
CHAIN_BYTES = 160e6  # int8 bytes per timed call: past the 50 MB L2 of an H100


def rel_err(got, want) -> float:
    want = jnp.asarray(want, jnp.float32)
    e = jnp.max(jnp.abs(jnp.asarray(got, jnp.float32) - want)) / jnp.max(jnp.abs(want))
    return float(jnp.where(jnp.isnan(e), jnp.inf, e))


def chain(gemv):
    """One jit applying gemv(x, w) to every weight of a list."""
    return jax.jit(lambda x, ws: [gemv(x, w) for w in ws])


def sweep(shapes, configs, budget_s: float, interpret: bool) -> dict:
    kind, peak = device_peak()
    peak = peak or float("nan")  # unknown device: no percentage
    best = {}
    t_start = time.perf_counter()
    for n_out, n_in in shapes:
        layers = int(min(32, max(2, math.ceil(CHAIN_BYTES / (n_out * n_in)))))
        keys = jax.random.split(jax.random.PRNGKey(n_out + n_in), layers + 1)
        x = jax.random.normal(keys[0], (1, n_in), jnp.bfloat16)
        codes = [jax.random.randint(k, (n_out, n_in), -127, 128, jnp.int8) for k in keys[1:]]
        scale = jnp.full((n_out,), 0.01, jnp.float32)
        floats = [c.astype(jnp.bfloat16) for c in codes]
        want = int8_matmul_reference(x, codes[0], scale)
        nbytes = n_out * n_in
        print(f"\n| {kind} [1, {n_in}] x [{n_out}, {n_in}]^T, {layers} weights per call | µs | "
              "GB/s (int8 bytes) | % HBM | vs bf16 | err |")  # fmt: skip
        print("|---|---|---|---|---|---|")
        bf = chain(lambda x, w: x @ w.T)
        t_bf = timed(bf, x, floats, reps=20) / layers
        gbs = 2 * nbytes / t_bf / 1e9
        print(f"| bf16 XLA (2 bytes/weight) | {t_bf * 1e6:.1f} | {gbs:.0f} "
              f"| {100 * gbs / 1e3 / peak:.0f}% | 1.00x | |", flush=True)  # fmt: skip
        xla = chain(lambda x, w, s=scale: (x @ w.astype(jnp.bfloat16).T) * s.astype(jnp.bfloat16))
        t = timed(xla, x, codes, reps=20) / layers
        gbs = nbytes / t / 1e9
        print(f"| XLA dot(x, convert(int8)) | {t * 1e6:.1f} | {gbs:.0f} | "
              f"{100 * gbs / 1e3 / peak:.0f}% | {t_bf / t:.2f}x | |", flush=True)  # fmt: skip
        results = []
        for cfg in configs:
            if time.perf_counter() - t_start > budget_s:
                print("| (sweep budget spent) | | | | | |")
                break
            name = (f"bo={cfg.block_o} bk={cfg.block_k} splits={cfg.num_splits} "
                    f"w={cfg.num_warps} s={cfg.num_stages} cr={int(cfg.chunk_reduce)}")  # fmt: skip
            try:
                f = chain(
                    lambda x, c, cfg=cfg, s=scale: int8_matmul(
                        x, c, s, config=cfg, interpret=interpret
                    )
                )
                err = rel_err(f(x, codes)[0], want)
                t = timed(f, x, codes, reps=20) / layers
            except Exception as e:  # one failing launch must not hide the others
                print(f"| {name} | failed: {type(e).__name__}: {str(e)[:160]} | | | | |")
                continue
            ok = err <= 2.0**-7
            print(f"| {name} | {t * 1e6:.1f} | {nbytes / t / 1e9:.0f} | "
                  f"{100 * nbytes / t / 1e12 / peak:.0f}% | {t_bf / t:.2f}x | "
                  f"{err:.2g}{'' if ok else ' FAIL'} |", flush=True)  # fmt: skip
            if ok:
                results.append((t, cfg))
        if results:
            t, cfg = min(results, key=lambda r: r[0])
            best[(n_out, n_in)] = cfg
            print(f"best: {cfg} {t * 1e6:.1f} µs = {t_bf / t:.2f}x bf16")
    return best


def kernel_summary(trace_dir: str, steps: int) -> None:
    """Device kernels in a perfetto trace: count and busy time per decode step, top names."""
    files = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not files:
        print("no perfetto trace written")
        return
    with gzip.open(files[0]) as fh:
        events = json.load(fh)
    events = events["traceEvents"] if isinstance(events, dict) else events
    names = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}  # fmt: skip
    dev = [e for e in events if e.get("ph") == "X" and "GPU" in str(names.get(e.get("pid")))]
    if not dev:
        print("trace has no GPU events; processes:", sorted(set(map(str, names.values())))[:8])
        return
    by = defaultdict(lambda: [0, 0.0])
    for e in dev:
        by[e["name"]][0] += 1
        by[e["name"]][1] += e.get("dur", 0)
    busy = sum(v[1] for v in by.values())
    span = max(e["ts"] + e.get("dur", 0) for e in dev) - min(e["ts"] for e in dev)
    print(f"GPU events {len(dev)} ({len(dev) / steps:.0f} per step), busy {busy / steps:.0f} µs "
          f"per step, span {span / steps:.0f} µs per step")  # fmt: skip
    for n, (c, d) in sorted(by.items(), key=lambda kv: -kv[1][1])[:14]:
        print(f"  {d / steps:8.1f} µs/step  x{c / steps:5.1f}  {n[:90]}")


def decode_rows(best: dict, out: str | None, quick: bool) -> None:
    from gpu_check import decode_check

    model, tokens, dtype = ("tiny", 16, "float32") if quick else ("llama-3.2-1b", 128, "bfloat16")
    base = qm.default_config

    def tuned(rows, n_out, n_in):
        return (
            best.get((n_out, n_in), base(rows, n_out, n_in))
            if rows == 1
            else base(rows, n_out, n_in)
        )

    bf16, _ = decode_check(model, 1, tokens, dtype, "xla")
    print(f"\ndecode {model} batch 1: {dtype} {bf16:.1f} tok/s", flush=True)
    d8, _ = decode_check(model, 1, tokens, dtype, "xla", quant="int8", mode="always")
    print(f"int8 Pallas (defaults) {d8:.1f} tok/s = {d8 / bf16:.2f}x", flush=True)
    qm.default_config = tuned
    try:
        dt, _ = decode_check(model, 1, tokens, dtype, "xla", quant="int8", mode="always")
        print(f"int8 Pallas (tuned) {dt:.1f} tok/s = {dt / bf16:.2f}x", flush=True)
        if out and not quick:  # --profile
            for label, quant in (("bf16", None), ("int8tuned", "int8")):
                d = os.path.join(out, f"trace_{label}")
                with jax.profiler.trace(d, create_perfetto_trace=True):
                    decode_check(model, 1, 32, dtype, "xla", quant=quant, mode="always")
                print(f"\nprofile {label} (prefill + 32 decode steps, twice: compile + timed run)")
                kernel_summary(d, 64)
    finally:
        qm.default_config = base


def decode_flags(quick: bool) -> None:
    """Batch-1 decode, bf16 and int8 (default launches), in one subprocess per XLA flag set."""
    import subprocess

    model, tokens, dtype = ("tiny", 16, "float32") if quick else ("llama-3.2-1b", 128, "bfloat16")
    code = (
        "import sys; from gpu_check import decode_check\n"
        f"b, _ = decode_check({model!r}, 1, {tokens}, {dtype!r}, 'xla')\n"
        f"q, _ = decode_check({model!r}, 1, {tokens}, {dtype!r}, 'xla', quant='int8', "
        "mode='always')\n"
        "print(f'RESULT {b:.1f} {q:.1f}')"
    )
    print(f"\n| decode {model} batch 1, XLA flags | {dtype} tok/s | int8 tok/s | int8 / {dtype} |")
    print("|---|---|---|---|")
    for name, flags in FLAG_VARIANTS.items():
        env = dict(os.environ)
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flags).strip()
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # beside a parent that holds memory
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        line = [x for x in r.stdout.splitlines() if x.startswith("RESULT")]
        if not line:
            err = [x for x in r.stderr.splitlines() if "Error" in x][-1:]
            print(f"| {name} | failed: {err} | | |", flush=True)
            continue
        b, q = map(float, line[0].split()[1:])
        print(f"| {name} | {b:.1f} | {q:.1f} | {q / b:.2f}x |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--budget-s", type=float, default=200)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--profile", action="store_true", help="trace the decode steps into --out")
    ap.add_argument("--long-rows", action="store_true", help="sweep only the down projection")
    ap.add_argument("--flags", action="store_true", help="only decode under XLA flag sets")
    args = ap.parse_args()
    t0 = time.perf_counter()
    if args.long_rows:
        sweep([(64, 1024)] if args.quick else [(2048, 8192)], LONG_ROW_CONFIGS, 60, args.quick)
    if args.flags:
        decode_flags(args.quick)
    if args.long_rows or args.flags:
        print(f"(total {time.perf_counter() - t0:.0f} s)")
        return
    shapes = [(64, 256), (32, 512)] if args.quick else SHAPES
    best = sweep(shapes, CONFIGS[:3] if args.quick else CONFIGS, args.budget_s, args.quick)
    print("\nTUNED =", {k: v for k, v in best.items()})
    print(f"(sweep took {time.perf_counter() - t0:.0f} s)", flush=True)
    decode_rows(best, args.out if args.profile else None, args.quick)
    print(f"(total {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
