"""Choose the super-block of int4's double-quantized group scales, on calibration text only.

    python benchmarks/scale_block.py [--recipe int4-g32] [--blocks row,6] [--out f.md]

Scores round-to-nearest of the recipe with each super-block size (groups per float16
super-scale; `row`: one per row) and with float16 scales, by perplexity on GPL-3's last 4
windows of 512 tokens: the windows GPTQ calibrates on, disjoint from the first windows
benchmarks/quant.py evaluates. The chosen size goes into the recipe's YAML by hand.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import jax
from flax import nnx

from jaxllm import LLM
from jaxllm.quant import quantize_model
from jaxllm.quant.config import load_recipe
from jaxllm.quant.evaluate import perplexity
from jaxllm.quant.gptq import CALIBRATION_TEXT, calibration_windows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--recipe", default="int4-g32")
    ap.add_argument("--blocks", default="row,6", help="groups per super-scale; row: per row")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    llm = LLM(args.model, log=lambda *a: print(*a, file=sys.stderr), engine=False)
    calib = calibration_windows(llm.encode(CALIBRATION_TEXT.read_text()), 512, count=4)
    base = load_recipe(args.recipe)
    variants = {"float16 scales": dataclasses.replace(base, scale_bits=None, scale_block=None)}
    for b in args.blocks.split(","):
        block = None if b == "row" else int(b)
        variants[f"scale_bits 8, super-block {b}"] = dataclasses.replace(
            base, scale_bits=8, scale_block=block
        )
    lines = ["| scales | calibration ppl (RTN) |", "|---|---|"]
    lines.append(f"| float32 model | {perplexity(llm.model, calib):.4f} |")
    for label, qc in variants.items():
        ppl = perplexity(quantize_model(nnx.clone(llm.model), qc), calib)
        lines.append(f"| {label} | {ppl:.4f} |")
        print(lines[-1], file=sys.stderr, flush=True)
    table = "\n".join(lines) + (
        f"\n\n{args.model}, recipe {args.recipe} round-to-nearest, GPL-3's last 4 windows of 512 "
        f"tokens (calibration only), jax {jax.__version__} on {jax.devices()[0].device_kind}.\n"
    )
    print(table)
    if args.out:
        Path(args.out).write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
