"""`jaxllm generate ...`: text generation from the command line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from jaxllm.errors import JaxLLMError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxllm", description="LLM inference on JAX/XLA")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text from a prompt")
    g.add_argument("--model", default="smollm2-135m", help="name, .gguf file or HF directory")
    prompt = g.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt")
    prompt.add_argument("--prompt-ids", default=None, help="token ids, e.g. 1,2,3")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    g.add_argument("--system", default=None, help="system message (with --chat)")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    g.add_argument("--attention", default="auto")
    g.add_argument("--quant", default=None, help="quantization recipe, e.g. int8, int4-g128")
    g.add_argument("--json", action="store_true", help="print token ids and timings as JSON")
    g.add_argument(
        "--mesh", default=None, help="shard over devices: data=2,pipeline=1,tensor=4 or a name"
    )
    g.add_argument("--num-processes", type=int, default=1, help="processes in the job")
    g.add_argument("--process-id", type=int, default=0)
    g.add_argument("--coordinator", default=None, help="host:port of process 0")
    la = sub.add_parser("launch", help="run a jaxllm command in N local processes")
    la.add_argument("--num-processes", type=int, required=True)
    la.add_argument("--devices-per-process", type=int, default=0, help="host CPU devices each")
    la.add_argument("--port", type=int, default=0)
    la.add_argument("rest", nargs=argparse.REMAINDER, help="-- generate ...")
    pl = sub.add_parser("plan", help="per-device memory and roofline decode rate on a mesh")
    pl.add_argument("--model", required=True, help="a configs/models name or YAML path")
    pl.add_argument("--mesh", default="data=1,pipeline=1,tensor=1")
    pl.add_argument("--hardware", default="h100", help="h100, h200, tpu-v5e, tpu-v5p, cpu")
    pl.add_argument("--batch", type=int, default=1)
    pl.add_argument("--context", type=int, default=4096)
    pl.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    pl.add_argument("--microbatches", type=int, default=0)
    pl.add_argument("--json", action="store_true")
    from jaxllm.quant.commands import add_parsers

    add_parsers(sub)  # quantize, qat
    return p


def _plan(args: argparse.Namespace) -> int:
    from jaxllm.plan import as_dict, plan

    p = plan(
        args.model, args.mesh, args.hardware, batch=args.batch, context=args.context,
        dtype=args.dtype, microbatches=args.microbatches,
    )  # fmt: skip
    print(json.dumps(as_dict(p)) if args.json else p.table())
    return 0


def _launch(args: argparse.Namespace) -> int:
    from jaxllm.distributed import launch

    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    results = launch(
        rest, args.num_processes, devices_per_process=args.devices_per_process, port=args.port
    )
    for i, r in enumerate(results):
        if r.returncode != 0:
            print(f"[process {i} exited {r.returncode}]\n{r.stderr[-2000:]}", file=sys.stderr)
    print(results[0].stdout, end="")
    return max(r.returncode for r in results)


def _generate(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    if args.num_processes > 1 or args.coordinator:
        from jaxllm.distributed import initialize

        if not args.coordinator:
            raise JaxLLMError("--num-processes > 1 needs --coordinator host:port")
        initialize(args.coordinator, args.num_processes, args.process_id)
    from jaxllm.llm import LLM
    from jaxllm.sampling import SamplingParams

    params = SamplingParams(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        max_tokens=args.max_tokens,
        seed=args.seed,
    )
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    llm = LLM(
        args.model, dtype=args.dtype, attention=args.attention, log=log, mesh=args.mesh,
        quantization=args.quant,
    )  # fmt: skip
    tok = llm.tokenizer if args.prompt_ids else llm._require_tokenizer()
    if args.prompt_ids:
        prompt = [int(x) for x in args.prompt_ids.split(",")]
    elif args.chat:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        messages.append({"role": "user", "content": args.prompt})
        prompt = tok.encode(tok.apply_chat_template(messages), add_bos=False)
    else:
        prompt = args.prompt
    loaded = time.perf_counter()
    first_token_at: list[float] = []

    def on_first(tokens: list[int]) -> None:
        first_token_at.append(time.perf_counter())
        if not args.json and tok is not None:
            print(tok.decode(tokens), end="", flush=True)

    out = llm.generate([prompt], params, on_first_tokens=on_first)[0]
    done = time.perf_counter()
    t = llm.timings
    decode_tps = t.decode_steps / t.decode_s if t.decode_s > 0 else float("nan")
    if args.json:
        print(
            json.dumps(
                {
                    "text": out.text,
                    "prompt_token_ids": out.prompt_token_ids,
                    "token_ids": out.token_ids,
                    "finish_reason": out.finish_reason,
                    "timings": {
                        "load_s": loaded - start,
                        "first_token_since_start_s": first_token_at[0] - start,
                        "prefill_s": t.prefill_s,
                        "decode_s": t.decode_s,
                        "total_s": done - start,
                        "prompt_tokens": t.prompt_tokens,
                        "generated_tokens": t.generated_tokens,
                        "prefill_tok_s": t.prompt_tokens / t.prefill_s,
                        "decode_tok_s": decode_tps,
                    },
                }
            )
        )
    else:
        first_text = tok.decode(out.token_ids[:1]) if tok is not None else ""
        print(out.text[len(first_text) :] if out.text.startswith(first_text) else out.text)
        print(
            f"\n[{len(out.token_ids)} tokens, finish={out.finish_reason}; "
            f"first token {first_token_at[0] - start:.1f} s after start "
            f"(load {loaded - start:.1f} s, prefill+compile {t.prefill_s:.1f} s); "
            f"decode {decode_tps:.1f} tok/s incl. compile]",
            file=sys.stderr,
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "generate":
            return _generate(args)
        if args.command == "plan":
            return _plan(args)
        if args.command == "launch":
            return _launch(args)
        if args.command in ("quantize", "qat"):
            from jaxllm.quant import commands

            return getattr(commands, f"{args.command}_command")(args)
    except JaxLLMError as e:
        print(f"jaxllm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
