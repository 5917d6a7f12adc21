"""What the engine's reduced-precision configuration costs in quality: SmolLM2-135M's
perplexity on GPL-3 (the first N windows of 512 tokens, as benchmarks/quant.py) with float32
or bfloat16 weights (`LLM(weight_dtype=...)`: bf16 x bf16 products, float32 accumulation)
and a float32 or float16 KV cache, and the teacher-forced top-1 agreement with float32.

    python benchmarks/precision.py [--windows 4] [--out benchmarks/results/precision_cpu.md]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import LLM
from jaxllm.quant.evaluate import mean_nll, window_logits

TEXT = Path("/usr/share/common-licenses/GPL-3")
CONFIGS = [("float32", "float32"), ("float32", "float16"), ("bfloat16", "float32"),
           ("bfloat16", "float16")]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    models = {}
    rows, base = [], None
    for weights, kv in CONFIGS:
        if weights not in models:
            models[weights] = LLM("smollm2-135m", compilation_cache=False, log=lambda *a: None,
                                  engine=False, weight_dtype=weights)  # fmt: skip
        llm = models[weights]
        ids = llm.encode(TEXT.read_text())
        windows = [ids[i * 512 : (i + 1) * 512] for i in range(args.windows)]
        logits = window_logits(llm.model, windows, jnp.dtype(kv))
        top1 = [lg.argmax(-1) for lg in logits]
        if base is None:
            base = (mean_nll(logits, windows), top1)
        ppl = math.exp(mean_nll(logits, windows))
        agree = np.mean(np.concatenate([a == b for a, b in zip(top1, base[1])]))
        rows.append(
            f"| {weights} | {kv} | {ppl:.3f} | {100 * (ppl / math.exp(base[0]) - 1):+.2f}% | "
            f"{100 * agree:.2f}% |"
        )
    lines = [
        "| weights | KV cache | ppl | vs float32 | top-1 = float32's |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"smollm2-135m, GPL-3 first {args.windows} windows of 512 tokens, jax {jax.__version__} "
        f"on {jax.default_backend()}. float32 = the Q4_1 GGUF dequantized.",
    ]
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
