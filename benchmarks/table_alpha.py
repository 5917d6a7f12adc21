"""Choose alpha for GPTQ of SmolLM2's tied embedding table, on calibration text only.

    python benchmarks/table_alpha.py [--recipe int4-g32] [--alphas 0.1,0.3,1,3,10] [--out f.md]

The calibration windows are GPL-3's last 4 of 512 tokens (the same ones GPTQ calibrates on,
disjoint from the first windows benchmarks/quant.py evaluates). `gptq_table.choose_alpha`
fits the table's Hessian on two of them and scores the model with only the table quantized on
the other two, both ways; the lowest held-out perplexity wins. The chosen value goes into
`jaxllm.quant.gptq_table.DEFAULT_ALPHA` by hand. `--variants` scores GPTQ's options
(static groups, act-order, damping) the same way.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax

from jaxllm import LLM
from jaxllm.quant.config import load_recipe
from jaxllm.quant.gptq import CALIBRATION_TEXT, calibration_windows
from jaxllm.quant.gptq_table import choose_alpha, head_grams


def variant_options(variant: str) -> dict:
    if variant == "dynamic":
        return {}
    if variant == "static":
        return dict(static_groups=True)
    if variant == "act-order":
        return dict(act_order=True)
    if variant.startswith("damp"):
        return dict(percdamp=float(variant[4:]))
    raise SystemExit(f"unknown variant {variant!r}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--recipe", default="int4-g32")
    ap.add_argument("--alphas", default="0.1,0.3,1,3,10")
    ap.add_argument(
        "--variants",
        default="dynamic",
        help="GPTQ variants to score at each alpha, e.g. dynamic,static,act-order,damp0.1 "
        "(dynamic: grids from the compensated weights as the sweep enters each group; static: "
        "from the original weights; act-order: largest Hessian diagonal first, static grids; "
        "dampX: dynamic with X * mean diagonal damping instead of 0.01)",
    )
    ap.add_argument("--out", default=None, help="also write the table (markdown) here")
    args = ap.parse_args(argv)

    qc = load_recipe(args.recipe)
    bits = qc.embed_bits
    group = qc.group_size if bits == 4 else None
    symmetric = qc.symmetric or bits == 8
    scale_options = {}  # the recipe's double-quantized group scales, for an int4 table
    if qc.scale_bits is not None and bits == 4:
        scale_options = dict(scale_bits=qc.scale_bits, scale_block=qc.scale_block)
    llm = LLM(args.model, log=lambda *a: print(*a, file=sys.stderr), engine=False)
    calib = calibration_windows(llm.encode(CALIBRATION_TEXT.read_text()), 512, count=4)
    t0 = time.perf_counter()
    alphas = [float(a) for a in args.alphas.split(",")]
    grams = head_grams(llm.model, calib)
    lines = ["| variant | alpha | held-out calibration ppl |", "|---|---|---|"]
    for variant in args.variants.split(","):
        best, scores = choose_alpha(
            llm.model, calib, alphas, bits, group, symmetric,
            log=lambda s, v=variant: print(v, s, file=sys.stderr),
            gptq_options={**variant_options(variant), **scale_options}, grams=grams,
        )  # fmt: skip
        lines += [
            f"| {variant} | {a:g} | {p:.4f}{' (best)' if a == best and len(alphas) > 1 else ''} |"
            for a, p in scores.items()
        ]
    note = (
        f"\n{args.model}, table {bits}-bit group {group} "
        f"{'symmetric' if symmetric else 'asymmetric'}; GPL-3's last 4 windows of 512 tokens, "
        "2-fold (Hessian on two windows, perplexity of the model with only the table quantized "
        f"on the other two). {time.perf_counter() - t0:.0f} s, jax {jax.__version__} on "
        f"{jax.devices()[0].device_kind}."
    )
    table = "\n".join(lines) + "\n" + note
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
