"""Attention kernels: correctness against the jnp references, then throughput beside peers.

    python benchmarks/kernels.py            # on a GPU: checks, then TFLOP/s and GB/s tables
    python benchmarks/kernels.py --quick    # tiny shapes, interpret mode on CPU (a smoke test)

Flash attention (forward, and forward+backward) is timed beside
`jax.nn.dot_product_attention` with implementation='cudnn' and 'xla' (and
`tokamax.dot_product_attention` when importable); paged decode beside the jnp reference (XLA
gather + attention), as GB/s of K/V read against the chip's HBM peak; one row reads int8
pages (codes + per-token scales, the int8 KV cache) beside the same pool in bf16.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.decode_attention import decode_attention, decode_attention_reference
from pallas_kernels.flash_attention import BlockSizes, flash_attention
from pallas_kernels.paged_attention import paged_attention
from pallas_kernels.ragged_paged_attention import ragged_paged_attention
from pallas_kernels.reference import (
    flash_attention_reference,
    paged_attention_reference,
    ragged_paged_attention_reference,
)

HBM_PEAK_TBS = {"H100": 3.35, "H200": 4.8, "A100": 2.0}  # TB/s, vendor figures
FAILED: list[str] = []


def device_peak() -> tuple[str, float | None]:
    kind = jax.devices()[0].device_kind
    for name, tbs in HBM_PEAK_TBS.items():
        if name in kind:
            return kind, tbs
    return kind, None


def timed(f, *args, reps: int = 10) -> float:
    """Median seconds per call; calls are queued back to back, then waited for."""
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        out = None
        for _ in range(reps):
            out = f(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / reps)
    return float(np.median(times))


def report(name: str, got, want, tol: float) -> None:
    err = float(jnp.max(jnp.abs(jnp.asarray(got, jnp.float32) - jnp.asarray(want, jnp.float32))))
    ok = err <= tol and not bool(jnp.isnan(jnp.asarray(got, jnp.float32)).any())
    if not ok:
        FAILED.append(name)
    print(f"| {name} | {err:.3g} | {tol:g} | {'ok' if ok else 'FAIL'} |", flush=True)


def random_paged(key, b, h, kh, d, page_size, ctx, dtype, lengths=None):
    """A shuffled page pool holding `lengths` tokens per sequence (ctx each by default)."""
    max_pages = -(-ctx // page_size)
    num_pages = b * max_pages
    ks = jax.random.split(key, 4)
    kp = jax.random.normal(ks[0], (kh, num_pages, page_size, d), dtype)
    vp = jax.random.normal(ks[1], (kh, num_pages, page_size, d), dtype)
    tables = jax.random.permutation(ks[2], num_pages).reshape(b, max_pages).astype(jnp.int32)
    if lengths is None:
        lengths = jnp.full((b,), ctx, jnp.int32)
    q = jax.random.normal(ks[3], (b, h, d), dtype)
    return q, kp, vp, jnp.asarray(lengths, jnp.int32), tables


def int8_pages(pages):
    """float pages [K, P, page, D] -> (int8 codes, float32 scales [K, P, page]) with one absmax
    scale per token per head, as `jaxllm.quant.kv.quantize_kv` makes them (jaxllm is not
    imported here: its YAML/tokenizer needs may be missing on a bare GPU machine)."""
    x = pages.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=-1)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    return jnp.clip(jnp.round(x / scale[..., None]), -127, 127).astype(jnp.int8), scale


def dequantized(codes, scale):
    return codes.astype(jnp.float32) * scale[..., None]


def checks(quick: bool) -> None:
    print("\n| check | max abs err vs reference | tolerance | |\n|---|---|---|---|")
    key = jax.random.PRNGKey(0)
    shapes = [(1, 64, 64, 8, 2, 64)] if quick else [(2, 1000, 1000, 8, 2, 128),
                                                    (1, 512, 1536, 9, 3, 64)]  # fmt: skip
    for b, t, s, h, kh, d in shapes:
        for dtype, tol in ((jnp.float32, 2e-3), (jnp.bfloat16, 3e-2)):
            ks = jax.random.split(key, 4)
            q = jax.random.normal(ks[0], (b, t, h, d), dtype)
            k = jax.random.normal(ks[1], (b, s, kh, d), dtype)
            v = jax.random.normal(ks[2], (b, s, kh, d), dtype)
            do = jax.random.normal(ks[3], (b, t, h, d), dtype)
            for causal in (True, False):
                ours = jax.jit(lambda q, k, v, c=causal: flash_attention(q, k, v, causal=c))
                ref = jax.jit(
                    lambda q, k, v, c=causal, d=d: flash_attention_reference(
                        q, k, v, causal=c, sm_scale=d**-0.5
                    )
                )
                tag = f"flash {jnp.dtype(dtype).name} causal={causal} {[b, t, s, h, kh, d]}"
                report(tag + " out", ours(q, k, v), ref(q, k, v), tol)
                loss = lambda f, do=do: lambda *qkv: jnp.sum(f(*qkv).astype(jnp.float32) * do)
                g1 = jax.jit(jax.grad(loss(ours), argnums=(0, 1, 2)))(q, k, v)
                g2 = jax.jit(jax.grad(loss(ref), argnums=(0, 1, 2)))(q, k, v)
                for n, a, r in zip("qkv", g1, g2):
                    scale = float(jnp.max(jnp.abs(r.astype(jnp.float32)))) or 1.0
                    report(f"{tag} d{n} (tol x max|d{n}|={scale:.3g})", a / scale, r / scale, tol)
    for dtype, tol in ((jnp.float32, 2e-3), (jnp.bfloat16, 3e-2)):
        lengths = [0, 1, 17, 300] if quick else [0, 1, 17, 1000, 4096, 2049, 5, 64]
        b = len(lengths)
        args = random_paged(key, b, 32, 8, 128, 16, max(lengths), dtype, lengths)
        got = jax.jit(paged_attention)(*args)
        want = jax.jit(lambda *a: paged_attention_reference(*a, sm_scale=128**-0.5))(*args)
        report(f"paged {jnp.dtype(dtype).name} lengths={lengths}", got, want, tol)
        q_lens = [0, 1, 17, 200] if quick else [0, 1, 17, 1000, 1, 2049, 5, 64]
        cu = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
        t = int(cu[-1])
        q = jax.random.normal(key, (t, 32, 128), dtype)
        ra = (q, args[1], args[2], args[3], args[4], cu, b)
        got = jax.jit(ragged_paged_attention, static_argnums=6)(*ra)
        want = jax.jit(
            lambda *a: ragged_paged_attention_reference(*a, sm_scale=128**-0.5), static_argnums=6
        )(*ra)
        report(f"ragged {jnp.dtype(dtype).name} q_lens={q_lens}", got, want, tol)
        # int8 pages read in place against the float reference on the dequantized pool.
        (kc, ks), (vc, vs) = int8_pages(args[1]), int8_pages(args[2])
        kd, vd = dequantized(kc, ks), dequantized(vc, vs)
        got = jax.jit(paged_attention)(args[0], kc, vc, args[3], args[4], k_scales=ks, v_scales=vs)
        want = jax.jit(lambda *a: paged_attention_reference(*a, sm_scale=128**-0.5))(
            args[0].astype(jnp.float32), kd, vd, args[3], args[4]
        )
        report(f"paged int8 pages, q {jnp.dtype(dtype).name} lengths={lengths}", got, want, tol)
        got = jax.jit(ragged_paged_attention, static_argnums=6)(
            q, kc, vc, args[3], args[4], cu, b, k_scales=ks, v_scales=vs
        )
        want = jax.jit(
            lambda *a: ragged_paged_attention_reference(*a, sm_scale=128**-0.5), static_argnums=6
        )(q.astype(jnp.float32), kd, vd, args[3], args[4], cu, b)
        report(f"ragged int8 pages, q {jnp.dtype(dtype).name} q_lens={q_lens}", got, want, tol)
    try:  # a lowering failure here must not cost the tables after it
        decode_attention_checks(key, quick)
    except Exception as e:
        FAILED.append("decode attention")
        print(f"| decode attention | failed: {type(e).__name__}: {str(e)[:300]} | | FAIL |")


def decode_attention_checks(key, quick: bool) -> None:
    """The fused decode step (RoPE, cache write, attention) against its op-by-op reference:
    Llama-3.2-1B's heads (8 KV heads of 4 queries, D = 64), left padding, a mid-cache slot."""
    b, kh, g, d, s, slot = (1, 2, 4, 64, 64, 40) if quick else (2, 8, 4, 64, 512, 300)
    for dtype, tol in ((jnp.float32, 2e-3), (jnp.bfloat16, 3e-2)):
        ks = jax.random.split(key, 4)
        qkv = jax.random.normal(ks[0], (b, kh, g + 2, d), dtype)
        angles = jax.random.uniform(ks[1], (b, d // 2)) * 6.0
        kc = jax.random.normal(ks[2], (b, kh, s, d), dtype)
        vc = jax.random.normal(ks[3], (b, kh, s, d), dtype)
        starts = jnp.arange(b)[:, None] * 7
        valid = (jnp.arange(s)[None] >= starts) & (jnp.arange(s)[None] <= slot)
        args = (qkv, jnp.cos(angles), jnp.sin(angles))
        want = jax.jit(lambda *a: decode_attention_reference(*a, sm_scale=d**-0.5))(
            *args, kc, vc, valid, jnp.int32(slot)
        )
        got = jax.jit(lambda *a: decode_attention(*a, sm_scale=d**-0.5))(
            *args, kc, vc, valid, jnp.int32(slot)
        )
        for name, a, w in zip(("out", "k cache", "v cache"), got, want, strict=True):
            report(f"decode attention {jnp.dtype(dtype).name} {[b, kh, g, d, s]} {name}", a, w, tol)


def flash_table(quick: bool) -> None:
    on_gpu = jax.default_backend() == "gpu"
    seqs = [128] if quick else [1024, 4096, 16384]
    h, d, dtype = (4, 64, jnp.float32) if quick else (16, 128, jnp.bfloat16)
    impls = {"jaxllm flash": lambda q, k, v, c: flash_attention(q, k, v, causal=c)}
    if on_gpu:  # the portable (Triton) kernels alone, without the Hopper forward
        portable = BlockSizes(mosaic_gpu=False)
        impls["jaxllm portable"] = lambda q, k, v, c: flash_attention(
            q, k, v, causal=c, block_sizes=portable
        )
    impls["dpa[xla]"] = lambda q, k, v, c: jax.nn.dot_product_attention(
        q, k, v, is_causal=c, implementation="xla"
    )
    if on_gpu:
        impls["dpa[cudnn]"] = lambda q, k, v, c: jax.nn.dot_product_attention(
            q, k, v, is_causal=c, implementation="cudnn"
        )
        try:
            import tokamax

            impls["tokamax"] = lambda q, k, v, c: tokamax.dot_product_attention(
                q, k, v, is_causal=c
            )
        except ImportError:
            pass
    print(
        f"\n| flash, {jnp.dtype(dtype).name}, H={h}, D={d}, batch x seq = 16k tokens | causal | "
        + " | ".join(f"{n} fwd | {n} fwd+bwd" for n in impls)
        + " | ours/cudnn fwd | ours/cudnn fwd+bwd |"
    )
    print("|---|---|" + "---|---|" * len(impls) + "---|---|")
    for s in seqs:
        b = max(1, 16384 // s) if not quick else 1
        ks = jax.random.split(jax.random.PRNGKey(1), 3)
        q = jax.random.normal(ks[0], (b, s, h, d), dtype)
        k = jax.random.normal(ks[1], (b, s, h, d), dtype)
        v = jax.random.normal(ks[2], (b, s, h, d), dtype)
        for causal in (True, False):
            flops = 4 * b * h * s * s * d * (0.5 if causal else 1.0)
            cells, tf = [], {}
            for name, f in impls.items():
                if name == "dpa[xla]" and s > 8192:
                    cells += ["-", "-"]
                    continue
                fwd = jax.jit(lambda q, k, v, f=f, c=causal: f(q, k, v, c))
                both = jax.jit(
                    jax.grad(
                        lambda q, k, v, f=f, c=causal: jnp.sum(f(q, k, v, c).astype(jnp.float32)),
                        argnums=(0, 1, 2),
                    )
                )
                try:
                    t_f = timed(fwd, q, k, v)
                    t_b = timed(both, q, k, v)
                except Exception as e:  # a peer may not support a shape; say so, go on
                    cells += [f"error: {type(e).__name__}", "-"]
                    continue
                tf[name] = (flops / t_f / 1e12, 3.5 * flops / t_b / 1e12)
                cells += [f"{tf[name][0]:.1f}", f"{tf[name][1]:.1f}"]
            ratio = ["-", "-"]
            if "dpa[cudnn]" in tf and "jaxllm flash" in tf:
                ratio = [f"{tf['jaxllm flash'][i] / tf['dpa[cudnn]'][i]:.2f}" for i in (0, 1)]
            print(f"| {b}x{s} | {causal} | " + " | ".join(cells + ratio) + " |", flush=True)


def paged_table(quick: bool) -> None:
    kind, peak = device_peak()
    h, kh, d, page = 32, 8, 128, 16
    dtype = jnp.float32 if quick else jnp.bfloat16
    grid = [(2, 256)] if quick else [(8, 1024), (8, 4096), (32, 4096), (64, 1024),
                                    (64, 4096), (64, 8192), (128, 4096)]  # fmt: skip
    print(
        f"\n| paged decode {kind}, H={h}, K={kh}, D={d}, page={page} | batch | context | "
        "jaxllm µs | jaxllm GB/s | % of HBM peak | reference (XLA) µs | reference GB/s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for b, ctx in grid:
        args = random_paged(jax.random.PRNGKey(2), b, h, kh, d, page, ctx, dtype)
        kv_bytes = 2 * b * ctx * kh * d * jnp.dtype(dtype).itemsize
        ours = jax.jit(paged_attention)
        ref = jax.jit(lambda *a: paged_attention_reference(*a, sm_scale=d**-0.5))
        t_o = timed(ours, *args)
        t_r = timed(ref, *args)
        gbs = kv_bytes / t_o / 1e9
        pct = f"{100 * gbs / (peak * 1e3):.0f}%" if peak else "-"
        print(
            f"| | {b} | {ctx} | {t_o * 1e6:.0f} | {gbs:.0f} | {pct} | {t_r * 1e6:.0f} | "
            f"{kv_bytes / t_r / 1e9:.0f} |",
            flush=True,
        )
    paged_int8_row(quick)


def paged_int8_row(quick: bool) -> None:
    """One shape: decode over int8 pages (codes + scales) against the same pool in bf16."""
    kind, peak = device_peak()
    b, ctx, h, kh, d, page = (2, 256, 8, 2, 64, 16) if quick else (64, 4096, 32, 8, 128, 16)
    q, kp, vp, lens, tables = random_paged(
        jax.random.PRNGKey(4), b, h, kh, d, page, ctx, jnp.bfloat16
    )
    (kc, ks), (vc, vs) = int8_pages(kp), int8_pages(vp)
    tokens = b * ctx * kh  # per K and per V
    bytes_bf16 = 2 * tokens * d * 2
    bytes_int8 = 2 * tokens * (d + 4)  # codes and one float32 scale per token per head
    ours = jax.jit(paged_attention)
    int8 = jax.jit(lambda q, k, v, n, t, ks, vs: paged_attention(q, k, v, n, t, k_scales=ks,
                                                                 v_scales=vs))  # fmt: skip
    ref = jax.jit(
        lambda q, k, v, n, t, ks, vs: paged_attention_reference(
            q, k, v, n, t, sm_scale=d**-0.5, k_scales=ks, v_scales=vs
        )
    )
    want = jax.jit(lambda *a: paged_attention_reference(*a, sm_scale=d**-0.5))(
        q.astype(jnp.float32), dequantized(kc, ks), dequantized(vc, vs), lens, tables
    )
    print("\n| check | max abs err vs reference | tolerance | |\n|---|---|---|---|")
    got = int8(q, kc, vc, lens, tables, ks, vs)
    report(f"paged int8 pages B={b} ctx={ctx} vs dequantized pool", got, want, 3e-2)
    t_bf16 = timed(ours, q, kp, vp, lens, tables)
    t_int8 = timed(int8, q, kc, vc, lens, tables, ks, vs)
    t_ref = timed(ref, q, kc, vc, lens, tables, ks, vs)
    pct = lambda gbs: f"{100 * gbs / (peak * 1e3):.0f}%" if peak else "-"
    print(
        f"\n| paged decode {kind}, int8 vs bf16 pages, B={b}, ctx={ctx}, H={h}, K={kh}, D={d}, "
        f"page={page} | pages | K/V MB | µs | GB/s | % of HBM peak | bf16 µs / this µs |"
    )
    print("|---|---|---|---|---|---|---|")
    rows = (
        ("jaxllm, bf16", bytes_bf16, t_bf16),
        ("jaxllm, int8 + scales", bytes_int8, t_int8),
        ("reference (XLA), int8 + scales", bytes_int8, t_ref),
    )
    for name, nbytes, t in rows:
        gbs = nbytes / t / 1e9
        print(
            f"| {name} | {'int8' if nbytes == bytes_int8 else 'bf16'} | {nbytes / 1e6:.1f} | "
            f"{t * 1e6:.0f} | {gbs:.0f} | {pct(gbs)} | {t_bf16 / t:.2f} |",
            flush=True,
        )


def paged_tuning(quick: bool) -> None:
    """GB/s of paged decode at batch 64, context 4096 over launch choices (GPU)."""
    b, ctx, h, kh, d, page = (64, 4096, 32, 8, 128, 16) if not quick else (2, 256, 8, 2, 64, 16)
    args = random_paged(jax.random.PRNGKey(3), b, h, kh, d, page, ctx, jnp.bfloat16)
    kv_bytes = 2 * b * ctx * kh * d * 2
    print(f"\n| paged tuning B={b} ctx={ctx} | pages/block | splits | warps | stages | GB/s |")
    print("|---|---|---|---|---|---|")
    launches = ((4, 3), (8, 3))
    grid = (
        [(4, 1, 4, 3)]
        if quick
        else [(ppb, sp, w, st) for ppb in (4, 8, 16) for sp in (1, 2) for w, st in launches]
    )
    best = (0.0, None)
    for ppb, sp, w, st in grid:
        f = jax.jit(
            lambda *a, ppb=ppb, sp=sp, w=w, st=st: paged_attention(
                *a, pages_per_block=ppb, num_splits=sp, num_warps=w, num_stages=st
            )
        )
        try:
            gbs = kv_bytes / timed(f, *args) / 1e9
        except Exception as e:  # a launch choice may not compile; report it and go on
            print(f"| | {ppb} | {sp} | {w} | {st} | error: {type(e).__name__} |")
            continue
        best = max(best, (gbs, (ppb, sp, w, st)))
        print(f"| | {ppb} | {sp} | {w} | {st} | {gbs:.0f} |", flush=True)
    print(f"best: {best}")
    paged_int8_tuning(quick)


def paged_int8_tuning(quick: bool) -> None:
    """Decode over int8 pages at batch 64, context 4096 over pages per block and splits (GPU):
    an int8 tile is half the bytes of a bf16 one, so the best block may differ."""
    b, ctx, h, kh, d, page = (64, 4096, 32, 8, 128, 16) if not quick else (2, 256, 8, 2, 64, 16)
    q, kp, vp, lens, tables = random_paged(
        jax.random.PRNGKey(3), b, h, kh, d, page, ctx, jnp.bfloat16
    )
    (kc, ks), (vc, vs) = int8_pages(kp), int8_pages(vp)
    t_bf16 = timed(jax.jit(paged_attention), q, kp, vp, lens, tables)
    print(f"\n| int8 pages tuning B={b} ctx={ctx} (bf16 default: {t_bf16 * 1e6:.0f} µs) | "
          "pages/block | splits | µs | bf16 µs / this µs |")  # fmt: skip
    print("|---|---|---|---|---|")
    grid = [(4, 1)] if quick else [(ppb, sp) for ppb in (4, 8, 16) for sp in (1, 2, 4)]
    for ppb, sp in grid:
        f = jax.jit(
            lambda q, k, v, n, t, ks, vs, ppb=ppb, sp=sp: paged_attention(
                q, k, v, n, t, k_scales=ks, v_scales=vs, pages_per_block=ppb, num_splits=sp
            )
        )
        try:
            t = timed(f, q, kc, vc, lens, tables, ks, vs)
        except Exception as e:  # a launch choice may not compile; report it and go on
            print(f"| | {ppb} | {sp} | error: {type(e).__name__} | |")
            continue
        print(f"| | {ppb} | {sp} | {t * 1e6:.0f} | {t_bf16 / t:.2f} |", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke test)")
    ap.add_argument("--skip-checks", action="store_true")
    ap.add_argument("--tune", action="store_true", help="sweep paged-decode launch choices")
    args = ap.parse_args()
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.devices()[0].device_kind}")
    if not args.skip_checks:
        checks(args.quick)
    flash_table(args.quick)
    paged_table(args.quick)
    if args.tune:
        paged_tuning(args.quick)
    if FAILED:
        print(f"\nFAILED checks: {FAILED}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
