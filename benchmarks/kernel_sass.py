"""What the one-row int8 GEMV compiles to on a Hopper GPU, read on a machine without one.

jax lowers a Pallas call for CUDA on any machine (the Triton lowering runs at trace time), so
this script lowers `int8_matmul` for a shape and launch, compiles the Triton IR with the
`triton` package from PyPI for sm_90 (its own ptxas; its version need not match the Triton
inside jaxlib's CUDA plugin, so counts are close, not identical), and counts each thread's
SASS instructions, a loop's body times its trip count. From the counts and Hopper's rates
per SM per clock (128 float32 ops, 64 integer/logic ops, 16 conversions such as I2F, 4 warp
instructions issued) it prints, per code byte, the instructions of each kind and the time
each pipe needs for the whole product against the time to read the codes from HBM: a
kernel whose busiest pipe needs longer than memory cannot run at the memory rate.

The model leaves out latency, occupancy and the tail of the grid: a lower bound on time.

    pip install triton            # into any Python 3.10+; pass it with --triton-python
    python benchmarks/kernel_sass.py --shape 16384x2048 --fusion swiglu --set bit_convert=1
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile

# Per-SM rates of sm_90 (lanes per clock) for the instruction kinds a GEMV uses.
PIPE_RATE = {"fp32": 128, "int": 64, "convert": 16, "memory": 32, "issue": 128}
FP32 = {"FADD", "FMUL", "FFMA", "FMNMX", "FSETP", "FSEL"}
CONVERT = {"I2F", "F2I", "F2F", "I2FP", "F2IP", "MUFU"}
MEMORY = {"LDG", "STG", "LDS", "STS", "SHFL", "LDSM", "ATOMG", "RED"}
FREE = {"NOP", "BRA", "EXIT", "BAR", "S2R", "S2UR", "ULDC", "UMOV", "ULEA", "UIADD3", "USHF"}
SM_COUNT, CLOCK_GHZ, HBM_TBS = 132, 1.755, 3.35  # H100 SXM: SMs, sustained clock, HBM peak

COMPILE = r"""
import collections, json, os, re, subprocess, sys, triton
from triton.backends.compiler import GPUTarget
path, warps, stages = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
k = triton.compile(path, target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": warps, "num_stages": stages})
cubin = path + ".cubin"
open(cubin, "wb").write(k.asm["cubin"])
tool = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
print(subprocess.run([tool, "-sass", cubin], capture_output=True, text=True, check=True).stdout)
"""


def int8_matmul_ir(n_out: int, n_in: int, fusion: str, overrides: dict) -> tuple[str, object]:
    """(Triton IR text, launch) of `int8_matmul` for one row, lowered for CUDA here."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels import quant_matmul as qm
    from pallas_kernels.common import triton_ir

    cfg = dataclasses.replace(qm.default_config(1, n_out, n_in), **overrides)
    if cfg.num_splits not in (None, 1):
        sys.exit(f"num_splits={cfg.num_splits}: this count assumes unsplit products")
    kw = {}
    if fusion in ("norm", "swiglu"):
        kw["norm_weight"] = jnp.ones((n_in,), jnp.bfloat16)
    if fusion == "swiglu":
        kw["swiglu"] = True
    width = n_out // 2 if fusion == "swiglu" else n_out
    if fusion == "residual":
        kw["residual"] = jnp.zeros((1, width), jnp.bfloat16)

    def f(x, codes, scale):
        return qm.int8_matmul(x, codes, scale, config=cfg, interpret=False, **kw)

    args = (
        jax.ShapeDtypeStruct((1, n_in), jnp.bfloat16),
        jax.ShapeDtypeStruct((n_out, n_in), jnp.int8),
        jax.ShapeDtypeStruct((n_out,), jnp.float32),
    )
    # jaxlib's Triton prints a load's eviction policy in an older form than the wheel parses
    text = triton_ir(f, *args)[0].replace(
        "evictionPolicy = evict_first",
        "{cachePolicy = #tt.cache_policy<cache_modifier = none, eviction_policy = evict_first>}",
    )
    return text, cfg


def per_thread_counts(sass: str, trips: int) -> collections.Counter:
    """Instruction counts of one thread: a backward branch's body counted `trips` times."""
    lines = []
    for line in sass.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_]+)(\S*)\s*(.*)", line)
        if m:
            lines.append((int(m.group(1), 16), m.group(3), m.group(5)))
    loops = []
    for addr, op, rest in lines:
        target = re.match(r"(0x[0-9a-f]+)", rest)
        if op == "BRA" and target and int(target.group(1), 16) < addr:
            loops.append((int(target.group(1), 16), addr))
    counts = collections.Counter()
    for addr, op, _ in lines:
        inside = any(lo <= addr <= hi for lo, hi in loops)
        counts[op] += trips if inside else 1
    return counts


def pipe_of(op: str) -> str | None:
    if op in FREE:
        return None
    if op in FP32:
        return "fp32"
    if op in CONVERT:
        return "convert"
    if op in MEMORY:
        return "memory"
    return "int"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="2048x8192", help="codes [O]x[I]")
    ap.add_argument("--fusion", choices=("none", "norm", "swiglu", "residual"), default="none")
    ap.add_argument("--set", action="append", default=[], help="a GemvConfig field, k=v")
    ap.add_argument("--triton-python", default=sys.executable, help="a Python with triton")
    ap.add_argument("--json", action="store_true", help="one JSON line instead of the table")
    args = ap.parse_args()
    n_out, n_in = (int(v) for v in args.shape.split("x"))
    from pallas_kernels.quant_matmul import GemvConfig

    kinds = {f.name: f.type for f in dataclasses.fields(GemvConfig)}
    overrides = {}
    for item in args.set:
        k, v = item.split("=")
        if k not in kinds:
            sys.exit(f"--set {item}: GemvConfig has no field {k!r} (fields: {', '.join(kinds)})")
        overrides[k] = bool(int(v)) if kinds[k] in (bool, "bool") else int(v)
    ir, cfg = int8_matmul_ir(n_out, n_in, args.fusion, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "int8_matmul.ttir")
        with open(path, "w") as f:
            f.write(ir)
        env = dict(os.environ, TRITON_DEFAULT_FP_FUSION="1")  # what the plugin's Triton does
        run = subprocess.run(
            [args.triton_python, "-c", COMPILE, path, str(cfg.num_warps), str(cfg.num_stages)],
            capture_output=True, text=True, env=env,
        )  # fmt: skip
        if run.returncode:
            sys.exit(f"compiling the Triton IR failed (is triton installed for "
                     f"{args.triton_python}?):\n{run.stderr[-2000:]}")  # fmt: skip
    from pallas_kernels.quant_matmul import fit_block

    width = n_out // 2 if args.fusion == "swiglu" else n_out
    bo = fit_block(width, cfg.block_o, 2 if args.fusion == "swiglu" else 4)
    bk = fit_block(n_in, cfg.block_k)
    counts = per_thread_counts(run.stdout, n_in // bk)
    threads, programs = 32 * cfg.num_warps, width // bo
    codes_per_program = n_out * n_in // programs
    per_code = {op: c * threads / codes_per_program for op, c in counts.items()}
    pipes = collections.Counter()
    for op, c in per_code.items():
        if pipe_of(op):
            pipes[pipe_of(op)] += c
            pipes["issue"] += c
    clocks = SM_COUNT * CLOCK_GHZ * 1e3  # SM-clocks per µs
    codes = n_out * n_in
    pipe_us = {p: codes * pipes[p] / PIPE_RATE[p] / clocks for p in PIPE_RATE}
    hbm_us = codes / (HBM_TBS * 1e6)
    if args.json:
        print(json.dumps({"config": dataclasses.asdict(cfg), "per_code": pipes,
                          "pipe_us": pipe_us, "hbm_us": hbm_us}))  # fmt: skip
        return
    print(f"int8_matmul [1, {n_in}] x [{n_out}, {n_in}]^T, fusion {args.fusion}: {cfg}")
    top = sorted(per_code.items(), key=lambda t: -t[1])[:12]
    print("per code byte: " + ", ".join(f"{op} {c:.3f}" for op, c in top))
    print("| pipe | instructions per code | µs for the product (H100 model) |")
    print("|---|---|---|")
    for p in PIPE_RATE:
        print(f"| {p} | {pipes[p]:.3f} | {pipe_us[p]:.2f} |")
    print(f"| HBM read of the codes | | {hbm_us:.2f} |")


if __name__ == "__main__":
    main()
