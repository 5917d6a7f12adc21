"""Weight-only int8 on the accelerator: the Pallas GEMV against XLA's dequantize-then-dot and
the bf16 GEMV, then decode tok/s of a quantized model against bf16 (issue 5: int8 >= 1.5x bf16
at batch 1). Run by gpu_check.py (`--int8-only` for these rows alone; `--quick`: tiny shapes,
interpreted on CPU).

GEMV timing: one jit multiplies by LAYERS distinct weights, so they do not sit in L2 (50 MB on an
H100) and a launch's overhead is spread over several GEMVs.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
from kernels import FAILED, device_peak, timed

from jaxllm.quant.int8_kernel import int8_kernel_mode
from jaxllm.quant.matmul import qlinear
from jaxllm.quant.qtensor import QuantizedWeight, quantize
from pallas_kernels import quant_matmul
from pallas_kernels.quant_matmul import GemvConfig, int8_matmul, int8_matmul_reference

BASE_DEFAULT = quant_matmul.default_config


def bit_converting(rows: int, n_out: int, n_in: int) -> GemvConfig:
    """The default launch with the codes widened by bit operations (`int8_matmul` applies
    it to one row only)."""
    return dataclasses.replace(BASE_DEFAULT(rows, n_out, n_in), bit_convert=True)


LAYERS = 8  # distinct weights per timed call: 128 MB of int8 codes at 2048x8192, past L2
# (block_o, block_k, num_warps, num_stages) beside the defaults; num_splits automatic.
SWEEP = [(16, 512, 4, 3)]  # benchmarks/int8_sweep.py sweeps launches at length


def _many(gemv):
    """A jit of gemv(x, w_l) for every weight l, each product an output."""
    return jax.jit(lambda x, ws: [gemv(x, w) for w in ws])


def max_rel_err(got, want) -> float:
    want = jnp.asarray(want, jnp.float32)
    err = jnp.max(jnp.abs(jnp.asarray(got, jnp.float32) - want)) / jnp.max(jnp.abs(want))
    return float(jnp.where(jnp.isnan(err), jnp.inf, err))


def gemv_table(quick: bool) -> None:
    """One [1, I] x [O, I]^T product (Llama-3.2-1B's down projection): bf16 weights, int8
    through XLA's dequantize, the Pallas kernel at its defaults and a few other launches."""
    n_out, n_in = (64, 256) if quick else (2048, 8192)
    layers = 2 if quick else LAYERS
    keys = jax.random.split(jax.random.PRNGKey(5), layers + 1)
    x = jax.random.normal(keys[0], (1, n_in), jnp.bfloat16)
    floats = [jax.random.normal(k, (n_out, n_in), jnp.bfloat16) * 0.02 for k in keys[1:]]
    quants = [quantize(w, 8) for w in floats]
    kind, peak = device_peak()

    def xla_dequant(x, w: QuantizedWeight):
        with int8_kernel_mode("never"):
            return qlinear(x, w)

    def pallas(x, w: QuantizedWeight, **kw):
        return int8_matmul(x, w.values, w.scale, **kw)

    float_want = jnp.dot(x.astype(jnp.float32), floats[0].astype(jnp.float32).T)
    int8_want = int8_matmul_reference(x, quants[0].values, quants[0].scale)
    int8_bytes = n_out * n_in + 4 * n_out
    rows = [("bf16 GEMV (XLA)", lambda x, w: x @ w.T, floats, 2 * n_out * n_in, {}, float_want)]
    rows.append(("int8 dequantize + dot (XLA)", xla_dequant, quants, int8_bytes, {}, int8_want))
    rows.append(("int8 Pallas (defaults)", pallas, quants, int8_bytes, {}, int8_want))
    bits = dict(bit_convert=True)  # codes widened by bit operations, not I2F conversions
    rows.append(("int8 Pallas (defaults, bit_convert)", pallas, quants, int8_bytes, bits,
                 int8_want))  # fmt: skip
    for bo, bk, warps, stages in SWEEP[:1] if quick else SWEEP:
        kw = dict(block_o=bo, block_k=bk, num_warps=warps, num_stages=stages)
        name = f"int8 Pallas bo={bo} bk={bk} warps={warps} stages={stages}"
        rows.append((name, pallas, quants, int8_bytes, kw, int8_want))

    tol = 2.0**-7  # one bf16 rounding of the output
    print(f"\n| GEMV {kind}, [1, {n_in}] x [{n_out}, {n_in}]^T, bf16 x | µs | GB/s | "
          f"% of HBM peak | vs bf16 | max rel err (tol {tol:.3g}) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    bf16_s = None
    for name, gemv, weights, nbytes, kw, want in rows:
        try:
            f = _many(lambda x, w, gemv=gemv, kw=kw: gemv(x, w, **kw))
            err = max_rel_err(f(x, weights)[0], want)
            s = timed(f, x, weights, reps=5) / len(weights)
        except Exception as e:  # one failing variant must not hide the others
            FAILED.append(name)
            print(f"| {name} | failed: {type(e).__name__}: {str(e)[:300]} | | | | |", flush=True)
            continue
        if err > tol:
            FAILED.append(name)
        bf16_s = bf16_s or s
        gbs = nbytes / s / 1e9
        pct = f"{100 * gbs / (peak * 1e3):.0f}%" if peak else "-"
        ok = f"{err:.2g} {'ok' if err <= tol else 'FAIL'}"
        print(
            f"| {name} | {s * 1e6:.1f} | {gbs:.0f} | {pct} | {bf16_s / s:.2f}x | {ok} |", flush=True
        )


def decode_rows(decode_check, quick: bool, bf16_tps: float | None = None) -> None:
    """Batch-1 decode (llama-3.2-1b, random weights; tiny with `quick`): float weights vs int8
    weight-only through the Pallas kernel. `decode_check`:
    gpu_check's (it holds the random weights); `bf16_tps`: the float row if already measured."""
    model, new_tokens, dtype = (
        ("tiny", 16, "float32") if quick else ("llama-3.2-1b", 128, "bfloat16")
    )
    t0 = time.perf_counter()
    if bf16_tps is None:
        bf16_tps, _ = decode_check(model, 1, new_tokens, dtype, "xla")
    print(f"\n| int8 weight-only decode, {model}, batch 1, {new_tokens} new tokens | weights | "
          "decode tok/s | prefill tok/s | vs float |")  # fmt: skip
    print("|---|---|---|---|---|")
    print(f"| | {dtype} | {bf16_tps:.1f} | | 1.00x |", flush=True)
    # XLA's dequantize-then-dot path is left to the GEMV table (0.47x bf16 there, 0.48x in
    # decode on an H100): its decode row cost ~20 s of the check's 5 minutes.
    rows = (
        ("int8, Pallas GEMV (norm, SwiGLU, residual fused)", BASE_DEFAULT),
        ("int8, Pallas GEMV fused, bit_convert", bit_converting),
    )
    for label, launches in rows:
        quant_matmul.default_config = launches  # part of the trace key: a program per choice
        try:
            tps, pps = decode_check(model, 1, new_tokens, dtype, "xla", quant="int8",
                                    mode="always")  # fmt: skip
        except Exception as e:
            FAILED.append(f"decode {label}")
            print(f"| | {label} | failed: {type(e).__name__}: {str(e)[:200]} | | |", flush=True)
            continue
        finally:
            quant_matmul.default_config = BASE_DEFAULT
        print(f"| | {label} | {tps:.1f} | {pps:.0f} | {tps / bf16_tps:.2f}x |", flush=True)
    print(f"(int8 decode rows took {time.perf_counter() - t0:.0f} s)")


def run(decode_check, quick: bool) -> None:
    """The GEMV table, then the decode rows (`decode_check`: gpu_check's)."""
    t0 = time.perf_counter()
    gemv_table(quick)
    print(f"(GEMV table took {time.perf_counter() - t0:.0f} s)", flush=True)
    decode_rows(decode_check, quick)
