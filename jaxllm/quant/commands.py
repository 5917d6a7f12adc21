"""The `jaxllm quantize` and `jaxllm qat` commands (argument parsing stays in jaxllm/cli.py)."""

from __future__ import annotations

import argparse
import json
import sys

from jaxllm.errors import JaxLLMError


def add_parsers(sub) -> None:
    q = sub.add_parser("quantize", help="apply a quantization recipe and report on it")
    q.add_argument("--model", default="smollm2-135m")
    q.add_argument("--recipe", required=True, help="e.g. int8, int4-g128, int4-g32+gptq")
    q.add_argument("--report", action="store_true", help="per-layer bytes and error")
    q.add_argument("--json", action="store_true", help="print the report as JSON")

    t = sub.add_parser("qat", help="quantization-aware fine-tune (distils the float model)")
    t.add_argument("--model", default="smollm2-135m")
    t.add_argument("--recipe", default="int4-g128", help="weight recipe to train against")
    t.add_argument("--steps", type=int, default=40)
    t.add_argument("--lr", type=float, default=1e-5)
    t.add_argument("--window", type=int, default=512)
    t.add_argument("--train-windows", type=int, default=4, help="GPL-3's last N windows")
    t.add_argument("--eval-windows", type=int, default=8, help="GPL-3's first N windows")
    t.add_argument("--ckpt-dir", default=None, help="orbax checkpoints; resumes if present")
    t.add_argument("--save-every", type=int, default=10)


def _text_ids(llm) -> list[int]:
    from jaxllm.quant.gptq import CALIBRATION_TEXT

    if not CALIBRATION_TEXT.is_file():
        raise JaxLLMError(f"{CALIBRATION_TEXT} is missing: it is the offline text used here")
    return llm.encode(CALIBRATION_TEXT.read_text())


def quantize_command(args: argparse.Namespace) -> int:
    from flax import nnx

    from jaxllm.llm import LLM
    from jaxllm.quant.apply import quantize_for_llm
    from jaxllm.quant.report import format_report, layer_report

    log = lambda *a: print(*a, file=sys.stderr)  # noqa: E731
    llm = LLM(args.model, log=log, engine=False)
    quant = quantize_for_llm(nnx.clone(llm.model), args.recipe, llm.tokenizer, llm.source, log)
    rows = layer_report(llm.model, quant)
    if args.json:
        print(json.dumps(rows))
    elif args.report:
        print(format_report(rows))
    else:
        held, bf16 = sum(r["bytes"] for r in rows), sum(r["bf16_bytes"] for r in rows)
        print(f"{args.recipe}: {held / 1e6:.1f} MB of weights ({held / bf16:.3f}x bfloat16)")
    return 0


def qat_command(args: argparse.Namespace) -> int:
    from flax import nnx

    from jaxllm.llm import LLM
    from jaxllm.quant.apply import quantize_model
    from jaxllm.quant.config import load_recipe
    from jaxllm.quant.evaluate import perplexity, text_windows
    from jaxllm.quant.gptq import calibration_windows
    from jaxllm.quant.qat import qat_finetune

    if args.steps < 1:
        raise JaxLLMError(f"--steps={args.steps} must be at least 1")
    recipe = load_recipe(args.recipe)
    if recipe.weight_bits is None or recipe.method != "rtn":
        raise JaxLLMError(
            f"QAT trains against a round-to-nearest weight recipe, not {args.recipe!r}"
        )
    log = lambda *a: print(*a, file=sys.stderr)  # noqa: E731
    llm = LLM(args.model, log=log, engine=False)
    ids = _text_ids(llm)
    total = len(ids) // args.window
    if args.eval_windows + args.train_windows > total:
        raise JaxLLMError(
            f"{args.eval_windows} evaluation + {args.train_windows} training windows of "
            f"{args.window} tokens need more than the text's {total}"
        )
    evals = text_windows(ids, args.window, args.eval_windows)
    train = calibration_windows(ids, args.window, args.train_windows)
    float_ppl = perplexity(llm.model, evals)
    before = perplexity(quantize_model(nnx.clone(llm.model), recipe), evals)
    log(f"[jaxllm] float32 ppl {float_ppl:.3f}; {args.recipe} before QAT {before:.3f}")
    losses = qat_finetune(
        llm.model, recipe, train, steps=args.steps, learning_rate=args.lr,
        ckpt_dir=args.ckpt_dir, save_every=args.save_every, log=log,
    )  # fmt: skip
    after = perplexity(quantize_model(nnx.clone(llm.model), recipe), evals)
    result = dict(
        recipe=args.recipe, steps=args.steps, lr=args.lr, float_ppl=float_ppl,
        rtn_ppl_before=before, rtn_ppl_after=after, gap_before=before - float_ppl,
        gap_after=after - float_ppl, first_loss=losses[0] if losses else None,
        last_loss=losses[-1] if losses else None,
    )  # fmt: skip
    print(json.dumps(result))
    return 0
