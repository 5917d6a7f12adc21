"""Where batch-1 decode time goes on a GPU, and which int8 GEMV launches shorten it (issue 5:
int8 weight-only decode >= 1.5x bf16 at batch 1).

1. The fused GEMVs of one Llama-3.2-1B layer and the head, each launch candidate (the default
   with bit_convert, prefetch or late_norm, elementwise launches around it) run as one jit over
   several distinct weights (past L2), its kernel timed by the GPU itself (a jax.profiler
   trace): wall-clock time per call measured launch and host overheads as much as the
   kernels (a first run of this script picked launches by wall clock that were 2x slower
   in decode).
2. Batch-1 decode tok/s (128-token prompt, 128 new tokens): bf16 and int8 (the default
   launches; with bit_convert; with bit_convert and evict_first, whose L2 effect only a
   whole decode step shows; this run's best launch per shape) under XLA's attention, then
   the same under the `decode` backend (RoPE, cache writes and attention in one kernel a
   layer; no sweep picks there).
3. For the profiled rows, a trace of 16 and of 48 decode steps: the difference over 32 tokens
   gives each kernel's GPU time per token, the kernels per token and the GPU's idle time.

Optional: `--attention-s N`, a sweep of the decode-attention kernel's launches (N seconds),
then its default launch at 1024 and 4096 cache slots; `--launch-overhead`, wall and GPU µs
per tiny Pallas kernel against a tiny XLA fusion in one while loop (whether launching, not
the GPU, sets a program's pace); `--no-profile`; `--no-sweep` (no GEMV sweep).

    python benchmarks/int8_probe.py [--quick] [--budget-s 35] [--attention-s 20]
        [--launch-overhead] [--no-profile]

`--quick`: tiny shapes and model, interpreted on CPU (checks that the script runs).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import glob
import itertools
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))

import jax
import jax.numpy as jnp
from int8_check import BASE_DEFAULT, bit_converting
from int8_fused import CHAIN_BYTES, PRODUCTS, QUICK_PRODUCTS, fusion_args, rel_err
from kernels import device_peak, timed

from pallas_kernels import quant_matmul as qm
from pallas_kernels.quant_matmul import GemvConfig, int8_matmul, int8_matmul_reference

# the four layer products, then the tied head (10% of an int8 token on the H100)
PROBE_PRODUCTS = [*PRODUCTS, ("head", (128256, 2048), "none")]


def candidates(n_out: int, n_in: int, fusion: str) -> list[tuple[str, GemvConfig]]:
    """The default launch, with prefetch and (a norm fused) late_norm, and elementwise
    launches around it: whole 2048-wide chunks, loops over narrower ones, and for long rows
    (down: I = 8192) wider chunks, with and without prefetch. Splits of I are no candidates:
    a fused epilogue needs whole sums in one program, so the kernel runs them unsplit.
    (Dot-path launches lost on every product in the eleventh session, late_norm on narrower
    chunks in the twelfth: results/int8_probe_h100.md.) `bit_convert` launches come second:
    the thirteenth session found the codes widened by I2F conversions in the kernel's SASS
    (compiled offline for sm_90), at 16 a clock per SM about one per HBM byte."""
    base = BASE_DEFAULT(1, n_out, n_in)
    bits = dataclasses.replace(base, bit_convert=True)
    # bit_convert first: the sweep's budget may run out before the end of the list
    out = [("default", base), ("default+bits", bits)]
    out.append(("default+bits, no chunk reduce", dataclasses.replace(bits, chunk_reduce=False)))
    for bo, w in ((4, 4), (8, 4), (8, 8), (16, 4), (16, 8)):  # kernel_sass.py's fewest issued
        cfg = dataclasses.replace(bits, block_o=bo, num_warps=w)
        if cfg != bits:
            out.append((f"bits bo{bo} w{w}", cfg))
    out.append(("default+pf", dataclasses.replace(base, prefetch=True)))
    if fusion in ("norm", "swiglu"):
        out.append(("default+late", dataclasses.replace(base, late_norm=True)))
    for bo in (2, 4, 8) if fusion == "swiglu" else (4, 8, 16):
        for w in (4, 8, 16):
            cfg = GemvConfig(bo, 2048, 1, w, 3, True)
            if cfg != base:
                out.append((f"bo{bo} bk2048 w{w}", cfg))
    for bo, bk, w in itertools.product((4, 8), (512, 1024), (4, 8)):
        out.append((f"bo{bo} bk{bk} w{w}", GemvConfig(bo, bk, 1, w, 3, True)))
    if n_in > 2048:
        for bk, w, pf in itertools.product((4096, 8192), (8, 16), (False, True)):
            if bk <= n_in:
                cfg = GemvConfig(4, bk, 1, w, 3, True, prefetch=pf)
                out.append((f"bo4 bk{bk} w{w}{' pf' if pf else ''}", cfg))
    return out


def traced(run) -> str:
    """Run `run()` under a jax.profiler trace; returns the trace's xplane file."""
    d = tempfile.mkdtemp()
    jax.profiler.start_trace(d)
    try:
        run()
    finally:
        jax.profiler.stop_trace()
    return glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)[0]


def gpu_kernels(path: str):
    """The kernels (events of the GPU's stream lines) in an xplane file."""
    from jax.profiler import ProfileData

    data = ProfileData.from_file(path)
    for plane in data.planes:
        if plane.name.startswith("/device:GPU"):
            for line in plane.lines:
                if line.name.startswith("Stream"):
                    yield from line.events


def gpu_us(f, args, name: str | None, interpret: bool, calls: int = 5) -> float:
    """Median µs of kernel `name` over `calls` calls of f as the GPU ran it (a jax.profiler
    trace: launch gaps and host time are not in it); with name None, µs per call of all its
    kernels but copies. Interpreted on CPU (no GPU plane): wall µs per call."""
    if interpret:
        return timed(f, *args, reps=3) * 1e6
    path = traced(lambda: jax.block_until_ready([f(*args) for _ in range(calls)]))
    evs = [ev for ev in gpu_kernels(path)
           if "copy" not in ev.name.lower() and not ev.name.startswith("Memcpy")]  # fmt: skip
    if name is None:
        return sum(ev.duration_ns for ev in evs) / calls / 1e3
    times = sorted(ev.duration_ns for ev in evs if ev.name.startswith(name))
    return times[len(times) // 2] / 1e3


def kernel_us(f, args, interpret: bool) -> tuple[float, float]:
    """(median µs of one `int8_matmul` kernel as the GPU ran it; wall-clock µs per call)."""
    wall = timed(f, *args, reps=10)
    if interpret:
        return wall * 1e6, wall * 1e6
    return gpu_us(f, args, "int8_matmul", interpret, calls=3), wall * 1e6


def sweep(products, budget_s: float, interpret: bool) -> dict:
    """Per product: GPU µs of each candidate launch's kernel; returns the best per shape."""
    kind, peak = device_peak()
    peak = peak or float("nan")
    best = {}
    for name, (n_out, n_in), fusion in products:
        t0 = time.perf_counter()
        layers = int(min(32, max(2, CHAIN_BYTES // (n_out * n_in))))
        keys = jax.random.split(jax.random.PRNGKey(n_out + n_in), layers + 2)
        x = jax.random.normal(keys[0], (1, n_in), jnp.bfloat16)
        codes = [jax.random.randint(k, (n_out, n_in), -127, 128, jnp.int8) for k in keys[2:]]
        scale = jnp.full((n_out,), 0.002, jnp.float32)
        args = fusion_args(fusion, n_out, n_in, keys[1]) if fusion != "none" else {}
        want = int8_matmul_reference(x, codes[0], scale, **args)
        print(f"\n| {kind} {name}: [1, {n_in}] x [{n_out}, {n_in}]^T, {layers} per call | "
              "kernel µs | GB/s | % HBM | wall µs per GEMV | rel err |")  # fmt: skip
        print("|---|---|---|---|---|---|")
        results = []
        for label, cfg in candidates(n_out, n_in, fusion):
            if time.perf_counter() - t0 > budget_s:
                print("| (budget spent) | | | | | |")
                break
            try:
                f = jax.jit(
                    lambda x, cs, cfg=cfg, s=scale, a=args: [
                        int8_matmul(x, c, s, config=cfg, interpret=interpret, **a) for c in cs
                    ]
                )
                err = rel_err(f(x, codes)[0], want)
                t, wall = kernel_us(f, (x, codes), interpret)
            except Exception as e:  # one failing launch must not hide the others
                print(f"| {label} | failed: {type(e).__name__}: {str(e)[:120]} | | | | |")
                continue
            ok = err <= 2.0**-6
            gbs = n_out * n_in / t / 1e3
            pct = 100 * gbs / 1e3 / peak
            flag = "" if ok else " FAIL"
            print(f"| {label} | {t:.2f} | {gbs:.0f} | {pct:.0f}% | {wall / layers:.2f} | "
                  f"{err:.2g}{flag} |", flush=True)  # fmt: skip
            if ok:
                results.append((t, label, cfg))
        if results:
            t, label, cfg = min(results, key=lambda r: r[0])
            best[(n_out, n_in)] = cfg
            print(f"best: {label} {cfg} {t:.2f} µs")
    return best


def _attention_case(b, kh, g, d, s):
    ks = jax.random.split(jax.random.PRNGKey(7), 4)
    qkv = jax.random.normal(ks[0], (b, kh, g + 2, d), jnp.bfloat16)
    ang = jax.random.uniform(ks[1], (b, d // 2)) * 6.0
    kc = jax.random.normal(ks[2], (b, kh, s, d), jnp.bfloat16)
    vc = jax.random.normal(ks[3], (b, kh, s, d), jnp.bfloat16)
    slot = jnp.int32(s // 2 + 1)
    return qkv, jnp.cos(ang), jnp.sin(ang), kc, vc, jnp.arange(s)[None] <= slot, slot


def attention_sweep(budget_s: float, interpret: bool):
    """GPU µs of each `decode_attention` launch for one Llama-3.2-1B decode step (B=1, K=8,
    G=4, D=64, a 256-slot bf16 cache, as the probe's decode rows), against the op-by-op
    reference's kernels in the same run (f32 einsums at HIGHEST precision: slower than the
    model's `xla` path, which the decode profiles time); then the default launch at longer
    caches. Cache copies (the calls here do not donate the caches they update) are left out
    on both sides. Returns the fastest launch that matches the reference."""
    from pallas_kernels import decode_attention as da

    b, kh, g, d = (1, 2, 2, 32) if interpret else (1, 8, 4, 64)
    lengths = (64, 128) if interpret else (256, 1024, 4096)
    ref = jax.jit(functools.partial(da.decode_attention_reference, sm_scale=d**-0.5))

    def run(launch, args, want, d=d):  # (µs, error) of one launch
        f = jax.jit(functools.partial(da.decode_attention, sm_scale=d**-0.5, launch=launch,
                                      interpret=interpret))  # fmt: skip
        got = f(*args)
        err = max(rel_err(a, w) for a, w in zip(got, want, strict=True))
        return gpu_us(f, args, "decode_attention", interpret), err

    args = _attention_case(b, kh, g, d, lengths[0])
    want = ref(*args)
    print(f"\n| decode_attention [B={b}, K={kh}, G={g}, D={d}, S={lengths[0]}] bf16 | GPU µs | "
          "max err (out, caches) |\n|---|---|---|")  # fmt: skip
    print(
        f"| op-by-op reference (its kernels) | {gpu_us(ref, args, None, interpret):.2f} | 0 |",
        flush=True,
    )
    t0, results = time.perf_counter(), []
    for bs, w, stages in itertools.product((64, 128, 256), (2, 4, 8), (1, 2)):
        if time.perf_counter() - t0 > budget_s:
            break
        launch = da.DecodeLaunch(min(bs, lengths[0]), w, stages)
        try:
            t, err = run(launch, args, want)
        except Exception as e:  # one failing launch must not hide the others
            print(f"| {launch} | failed: {type(e).__name__}: {str(e)[:120]} | |")
            continue
        ok = err <= 2.0**-6
        print(f"| {launch} | {t:.2f} | {err:.2g}{'' if ok else ' FAIL'} |", flush=True)
        if ok:
            results.append((t, launch))
    print("\n| launch | D | S | GPU µs | op-by-op reference µs | max err |\n"
          "|---|---|---|---|---|---|")  # fmt: skip
    rows = [(da.default_launch, d, s) for s in lengths[1:]]
    if not interpret:  # 8B-class heads: is the 256-slot block too wide for D=128's registers?
        rows += [(da.default_launch, 128, 1024), (da.DecodeLaunch(128, 4, 1), 128, 1024)]
    for launch, d_, s in rows:
        args = _attention_case(b, kh, g, d_, s)
        want = jax.jit(functools.partial(da.decode_attention_reference, sm_scale=d_**-0.5))
        try:
            t, err = run(launch, args, want(*args), d_)
            t_ref = gpu_us(want, args, None, interpret)
            print(f"| {launch} | {d_} | {s} | {t:.2f} | {t_ref:.2f} | {err:.2g} |", flush=True)
        except Exception as e:
            print(f"| {launch} | {d_} | {s} | failed: {type(e).__name__}: {str(e)[:120]} | | |")
    if not results:
        return None
    t, best = min(results, key=lambda r: r[0])
    print(f"best: {best} {t:.2f} µs")
    return best


def launch_overhead(interpret: bool) -> None:
    """Wall µs per kernel of a loop of tiny kernels, each variant as one jitted fori_loop (a
    while loop, as the decode loop is): a Pallas kernel against an XLA fusion doing the same
    work. Where wall µs per kernel exceeds GPU µs per kernel the host's launches, not the GPU,
    set the pace; Pallas kernels reach XLA through a custom call, fusions do not."""
    from jax.experimental import pallas as pl

    def pallas_step(x):
        def kernel(x_ref, o_ref):
            o_ref[...] = x_ref[...] * 0.5 + 1.0

        return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
                              interpret=interpret)(x)  # fmt: skip

    def xla_step(x):  # the reduction keeps consecutive steps from fusing into one kernel
        return x * 0.5 + jnp.sum(x) * 1e-9 + 1.0

    steps, per_step = (2, 2) if interpret else (200, 16)
    x = jnp.zeros((1, 1024), jnp.float32)
    print("\n| tiny kernels in a while loop | kernels per step | wall µs per kernel | "
          "GPU µs per kernel |\n|---|---|---|---|")  # fmt: skip
    for name, op in (("Pallas (custom call)", pallas_step), ("XLA fusion", xla_step)):

        def body(_, x, op=op):
            for _ in range(per_step):
                x = op(x)
            return x

        f = jax.jit(lambda x, body=body: jax.lax.fori_loop(0, steps, body, x))
        wall = timed(f, x, reps=3)
        if interpret:
            print(f"| {name} | - | {wall * 1e6 / steps / per_step:.1f} | - |")
            continue
        evs = [ev for ev in gpu_kernels(traced(lambda f=f: jax.block_until_ready(f(x))))
               if not ev.name.startswith("Memcpy")]  # fmt: skip
        n = len(evs) / steps
        busy = sum(ev.duration_ns for ev in evs) / 1e3 / len(evs)
        print(f"| {name} | {n:.1f} | {wall * 1e6 / steps / n:.2f} | {busy:.2f} |", flush=True)


def launches(picks: dict):
    """A `default_config` taking one-row launches from `picks` (per shape) where it has one."""

    def config(rows, n_out, n_in):
        if rows == 1 and (n_out, n_in) in picks:
            return picks[(n_out, n_in)]
        return BASE_DEFAULT(rows, n_out, n_in)

    return config


def streaming(rows: int, n_out: int, n_in: int) -> GemvConfig:
    """bit_convert launches whose code loads leave L2 to the data the next token rereads."""
    return dataclasses.replace(bit_converting(rows, n_out, n_in), evict_first=True)


def kernel_times(path: str):
    """(count per kernel, ns per kernel, launch details per kernel, busy ns, span ns) of the
    GPU's stream lines; a kernel is its name and grid (the GEMVs share one name)."""
    count, total, details = collections.Counter(), collections.Counter(), {}
    starts, ends, busy = [], [], 0.0
    for ev in gpu_kernels(path):
        stats = {str(k): str(v) for k, v in ev.stats}
        info = stats.get("kernel_details", "")
        grid = next((f for f in info.split() if f.startswith("grid:")), "")
        name = (ev.name if len(ev.name) < 48 else ev.name[:45] + "...") + " " + grid
        count[name] += 1
        total[name] += ev.duration_ns
        details.setdefault(name, info[:110])
        busy += ev.duration_ns
        starts.append(ev.start_ns)
        ends.append(ev.start_ns + ev.duration_ns)
    span = (max(ends) - min(starts)) if starts else 0.0
    return count, total, details, busy, span


def profile(gen, prompts, label: str) -> None:
    from jaxllm.sampling import SamplingParams

    def decoding(new_tokens: int):
        p = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
        return lambda: gen.generate(prompts, [p] * len(prompts))

    try:
        a, b = traced(decoding(16)), traced(decoding(48))
        ca, ta, _, busy_a, span_a = kernel_times(a)
        cb, tb, details, busy_b, span_b = kernel_times(b)
    except Exception as e:  # a diagnostic: its failure must not stop the rest
        print(f"profile {label} failed: {type(e).__name__}: {str(e)[:300]}")
        return
    n = 32
    kernels = (sum(cb.values()) - sum(ca.values())) / n
    busy = (busy_b - busy_a) / n / 1e3
    span = (span_b - span_a) / n / 1e3
    print(f"\nprofile {label}: per token {kernels:.0f} kernels, {busy:.1f} µs busy, "
          f"{span:.1f} µs span, {span - busy:.1f} µs idle")  # fmt: skip
    print("| kernel | per token | µs each | µs per token | launch |")
    print("|---|---|---|---|---|")
    rows = [(k, (cb[k] - ca[k]) / n, (tb[k] - ta[k]) / n / 1e3) for k in cb]
    for k, c, t in sorted(rows, key=lambda r: -r[2])[:20]:
        if c > 0:
            print(f"| {k} | {c:.1f} | {t / c:.2f} | {t:.1f} | {details.get(k, '')} |")


def decode(model, dtype, quant, config, attention, prof, quick: bool, attn_launch=None,
           prompt_len: int = 128):  # fmt: skip
    from gpu_check import _weights

    from jaxllm.generate import Generator
    from jaxllm.model import Transformer
    from jaxllm.quant import quantize_model
    from jaxllm.quant.int8_kernel import int8_kernel_mode
    from jaxllm.sampling import SamplingParams

    loaded = _weights(model)
    net = Transformer(loaded.config, loaded.params, dtype=jnp.dtype(dtype), attention=attention,
                      rope_factors=loaded.rope_factors)  # fmt: skip
    if quant:
        net = quantize_model(net, quant)
    gen = Generator(net)
    tokens = 16 if quick else 128
    prompts = [[1 + i % 1000 for i in range(prompt_len)]]
    p = [SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)]
    from pallas_kernels import decode_attention as da

    qm.default_config = config
    base_launch = da.default_launch
    da.default_launch = attn_launch or base_launch
    try:
        with int8_kernel_mode("always" if quant else "never"):
            out = gen.generate(prompts, p)
            rates = []
            for _ in range(3):
                gen.generate(prompts, p)
                t = gen.last_timings
                rates.append(t.decode_steps / t.decode_s)
            if prof:
                profile(gen, prompts, prof)
    finally:
        qm.default_config = BASE_DEFAULT
        da.default_launch = base_launch
    return sorted(rates)[1], out[0].token_ids


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--budget-s", type=float, default=20, help="sweep seconds per product")
    ap.add_argument("--no-sweep", action="store_true", help="no GEMV launch sweep")
    ap.add_argument(
        "--attention-s",
        type=float,
        default=0,
        help="seconds for a decode_attention launch sweep (0: none)",
    )
    ap.add_argument(
        "--launch-overhead",
        action="store_true",
        help="wall and GPU µs per tiny Pallas / XLA kernel in a while loop",
    )
    ap.add_argument(
        "--attentions",
        default="xla,decode",
        help="attention backends of the decode rows, comma-separated (auto, flash, ...)",
    )
    ap.add_argument("--prompt-len", type=int, default=128, help="prompt tokens of the decode rows")
    ap.add_argument("--no-profile", action="store_true", help="no per-kernel decode profiles")
    args = ap.parse_args()
    t0 = time.perf_counter()
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}", flush=True)
    picks = {}
    if not args.no_sweep:
        products = QUICK_PRODUCTS if args.quick else PROBE_PRODUCTS
        picks = sweep(products, args.budget_s, args.quick)
        print("\nPICKS =", picks)
        print(f"(sweep done at {time.perf_counter() - t0:.0f} s)", flush=True)
    if args.launch_overhead:
        try:
            launch_overhead(args.quick)
        except Exception as e:  # a diagnostic: its failure must not stop the decode rows
            print(f"launch overhead failed: {type(e).__name__}: {str(e)[:300]}")
    attn = attention_sweep(args.attention_s, args.quick) if args.attention_s else None
    model, dtype = ("tiny", "float32") if args.quick else ("llama-3.2-1b", "bfloat16")
    # (label, quantization, launches, attention backend, profile label)
    runs = []
    for att in args.attentions.split(","):
        profiled = att == "decode"  # the fused attention's rows are profiled (--no-profile: none)
        runs += [
            (f"{dtype}, {att} attention", None, BASE_DEFAULT, att,
             f"bf16-{att}" if profiled else None),
            (f"int8 fused, default launches, {att} attention", "int8", BASE_DEFAULT, att,
             f"int8-{att}" if profiled else None),
        ]  # fmt: skip
        runs.append((f"int8 fused, default launches + bit_convert, {att} attention", "int8",
                     bit_converting, att, None))  # fmt: skip
        runs.append((f"int8 fused, default launches + bit_convert + evict_first, {att} "
                     "attention", "int8", streaming, att, None))  # fmt: skip
        if picks and att == "xla":
            runs.append(("int8 fused, this run's picks, xla attention", "int8", launches(picks),
                         "xla", "int8-picks"))  # fmt: skip
    results, first_tokens = [], {}  # tokens of the first run of each quantization
    for label, quant, config, attention, prof in runs:
        prof = None if args.no_profile else prof
        try:
            tps, ids = decode(model, dtype, quant, config, attention, prof, args.quick, attn,
                              args.prompt_len)  # fmt: skip
        except Exception as e:
            print(f"| {label} | failed: {type(e).__name__}: {str(e)[:300]} |", flush=True)
            continue
        same = ids == first_tokens.setdefault(quant, ids)
        results.append((label, attention, quant, tps, same))
        print(f"{label}: {tps:.1f} tok/s (at {time.perf_counter() - t0:.0f} s)", flush=True)
    print(f"\n| decode {model} batch 1, {args.prompt_len}-token prompt | tok/s | vs {dtype}, "
          "same attention | same tokens as the first run of its weights |")  # fmt: skip
    print("|---|---|---|---|")
    floats = {att: tps for _, att, quant, tps, _ in results if quant is None}
    for label, att, _, tps, same in results:
        print(f"| {label} | {tps:.1f} | {tps / floats.get(att, float('nan')):.2f}x | {same} |")
    print(f"(total {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
