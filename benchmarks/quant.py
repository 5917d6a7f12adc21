"""Quantization quality, size and speed on SmolLM2-135M, one row per recipe, one table.

    python benchmarks/quant.py --windows 8 [--recipes float32,int8,...] [--out results.md]

Perplexity: GPL-3 (/usr/share/common-licenses/GPL-3), the first N non-overlapping windows of
512 tokens, no BOS, each window run as a prefill through the KV cache (so a `kv-int8` row
attends over the int8 cache). GPTQ calibrates on the text's last 4 windows, disjoint from the
evaluated ones; it covers the tied embedding / head table too (`jaxllm.quant.gptq_table`).
Weight bytes: every matrix (embedding included, norms not) with its scales, against the same
matrices in bfloat16. KV bytes: per token, all layers, K and V. Decode tok/s:
the static generator, 64 greedy tokens after 32-token prompts, at batch 1 and 16, timed on a
second run (the first compiles).

The default model's GGUF is Q4_1: its "float32" weights are dequantized 4-bit values, so the
float32 row is already a 4-bit model's quality, and re-quantizing those weights is what every
other row measures; the `gguf` row runs the file's own Q4_1/Q8_0 blocks natively.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm import LLM, JaxLLMError, SamplingParams
from jaxllm.generate import Generator
from jaxllm.model import Embedding, Linear
from jaxllm.quant.apply import linear_slots, quantize_model
from jaxllm.quant.config import load_recipe
from jaxllm.quant.evaluate import perplexity
from jaxllm.quant.gguf_native import native_weights
from jaxllm.quant.gptq import CALIBRATION_TEXT, calibration_windows, gptq_quantizer
from jaxllm.quant.kv import kv_bytes_per_element
from jaxllm.quant.layers import QuantizedEmbedding, QuantizedLinear
from jaxllm.quant.qtensor import check_groups, super_block_count
from jaxllm.quant.smoothquant import input_absmax

DEFAULT_RECIPES = (
    "float32,gguf,int8,w8a8,w8a8+smoothquant,kv-int8,int4-g128,int4-g64,int4-g64+gptq,"
    "int4-g32,int4-g32+gptq,int4-g32-sym,int4-g32-sym+gptq,int4-g32-e8,int4-g64+kv-int8"
)


def weight_bytes(model) -> tuple[int, int]:
    """(bytes as held, bytes of the same matrices in bfloat16)."""
    held = bf16 = 0
    mods = [getattr(p, a) for _, p, a in linear_slots(model)] + [model.embed]
    for m in mods:
        if isinstance(m, (QuantizedLinear, QuantizedEmbedding)):
            qw = m.qweight
            held += qw.nbytes
            bf16 += qw.shape[0] * qw.shape[1] * 2
        else:
            w = m.weight[...] if isinstance(m, Linear) else m.table[...]
            assert isinstance(m, (Linear, Embedding))
            held += w.nbytes
            bf16 += w.size * 2
    return held, bf16


def check_recipe_fits(recipe: str, cfg) -> None:
    """JaxLLMError when the recipe's groups do not divide the model's matrices."""
    if recipe == "float32":
        return
    qc = load_recipe(recipe)
    if qc.group_size is not None:
        for n_in in (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim):
            check_groups((1, n_in), qc.group_size, f"a {n_in}-input matrix")
            if qc.scale_bits is not None:
                groups = n_in // qc.group_size
                super_block_count(groups, qc.scale_block, f"a {n_in}-input matrix")


def decode_rate(model, prompts, batch: int, new_tokens: int) -> float:
    gen = Generator(model, max_batch=batch)
    sp = [SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)] * batch
    for _ in range(2):  # the first run compiles
        gen.generate(prompts[:batch], sp)
    t = gen.last_timings
    return batch * t.decode_steps / t.decode_s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--recipes", default=DEFAULT_RECIPES)
    ap.add_argument("--windows", type=int, default=8, help="evaluated windows of 512 tokens")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--no-speed", action="store_true", help="skip the decode timings")
    ap.add_argument("--no-ppl", action="store_true", help="skip the perplexities (speed only)")
    ap.add_argument("--out", default=None, help="also write the table (markdown) and JSON here")
    args = ap.parse_args(argv)

    llm = LLM(args.model, log=lambda *a: print(*a, file=sys.stderr), engine=False)
    cfg = llm.config
    ids = llm.encode(CALIBRATION_TEXT.read_text())
    window = 512
    total = len(ids) // window
    calib = calibration_windows(ids, window, count=4)
    if args.windows > total - 4:
        raise SystemExit(f"only {total - 4} windows are disjoint from the calibration windows")
    windows = [ids[i * window : (i + 1) * window] for i in range(args.windows)]
    prompts = [ids[40 * i : 40 * i + 32] for i in range(16)]
    print(
        f"GPL-3: {len(ids)} tokens, {total} windows of {window}; evaluating the first "
        f"{args.windows}, calibrating GPTQ on the last 4",
        file=sys.stderr,
    )
    float_model = llm.model
    hessian_quantizer = None
    rows = []
    for recipe in args.recipes.split(","):
        t0 = time.perf_counter()
        try:
            check_recipe_fits(recipe, cfg)
        except JaxLLMError as e:  # e.g. int4-g128 on a hidden size of 576
            rows.append(dict(recipe=recipe, error=str(e)))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            continue
        if recipe == "float32":
            model, qc = float_model, None
        else:
            qc = load_recipe(recipe)
            quantizer, native, act_absmax = None, None, None
            if qc.smoothquant is not None:
                act_absmax = input_absmax(nnx.clone(float_model), calib)
            if qc.method == "gguf":
                native = native_weights(llm.source, cfg)
            if qc.method == "gptq":
                if hessian_quantizer is None:
                    hessian_quantizer = gptq_quantizer(float_model, calib, log=print)
                quantizer = hessian_quantizer
            model = quantize_model(nnx.clone(float_model), qc, quantizer, native, act_absmax)
        quant_s = time.perf_counter() - t0
        kv_dtype = jnp.int8 if qc is not None and qc.kv_bits == 8 else jnp.float32
        ppl = float("nan") if args.no_ppl else perplexity(model, windows, kv_dtype)
        held, bf16 = weight_bytes(model)
        kv_bf16 = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2
        kv = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim
        kv = kv * kv_bytes_per_element(kv_dtype, cfg.head_dim)
        row = dict(
            recipe=recipe,
            ppl=ppl,
            weight_mb=held / 1e6,
            weight_vs_bf16=held / bf16,
            kv_bytes_per_token=kv,
            kv_vs_bf16=kv / kv_bf16,
            quantize_s=quant_s,
        )
        if not args.no_speed:
            row["tok_s_b1"] = decode_rate(model, prompts, 1, args.new_tokens)
            row["tok_s_b16"] = decode_rate(model, prompts, 16, args.new_tokens)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        del model

    base = rows[0]["ppl"] if rows[0]["recipe"] == "float32" else float("nan")
    head = "| recipe | ppl | vs float32 | weight MB | vs bf16 | KV B/token | vs bf16 |"
    head += "" if args.no_speed else " tok/s b=1 | tok/s b=16 |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['recipe']} | n/a: {r['error']} |")
            continue
        line = (
            f"| {r['recipe']} | {r['ppl']:.3f} | {100 * (r['ppl'] / base - 1):+.2f}% "
            f"| {r['weight_mb']:.1f} | {r['weight_vs_bf16']:.3f}x | {r['kv_bytes_per_token']:.0f} "
            f"| {r['kv_vs_bf16']:.3f}x |"
        )
        if not args.no_speed:
            line += f" {r['tok_s_b1']:.1f} | {r['tok_s_b16']:.1f} |"
        lines.append(line)
    note = (
        f"\n{args.model}, GPL-3 first {args.windows} windows of {window} tokens, "
        f"jax {jax.__version__} on {jax.devices()[0].device_kind}. float32 = the Q4_1 GGUF "
        "dequantized."
    )
    table = "\n".join(lines) + "\n" + note
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
        Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
