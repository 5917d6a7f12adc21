"""SmolLM2-135M (GGUF) against HF transformers on the same file, via committed golden files."""

from __future__ import annotations

import numpy as np
import pytest

from jaxllm import SamplingParams
from tests.golden.cases import GREEDY_TOKENS, PROMPTS, TOKENIZER_CASES


def test_golden_inputs_are_current(golden):
    assert [p["text"] for p in golden["prompts"]] == PROMPTS
    assert [c["text"] for c in golden["tokenizer"]] == TOKENIZER_CASES
    assert len(golden["prompts"][0]["ids"]) >= 200


@pytest.mark.parametrize("case", range(len(TOKENIZER_CASES)))
def test_tokenizer_matches_hf(smollm2, golden, case):
    c = golden["tokenizer"][case]
    ids = smollm2.tokenizer.encode(c["text"])
    assert ids == c["ids"]
    assert smollm2.tokenizer.decode(ids, skip_special_tokens=False) == c["text"]


@pytest.mark.parametrize("case", range(len(PROMPTS)))
def test_logits_match_hf_at_every_position(smollm2, golden, case):
    p = golden["prompts"][case]
    assert smollm2.tokenizer.encode(p["text"]) == p["ids"]
    logits = smollm2.logits(p["ids"])  # [T, V] float32
    t = len(p["ids"])
    ids = golden["topk_ids"][case, :t]
    want = golden["topk_values"][case, :t]
    got = np.take_along_axis(logits, ids, axis=-1)
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 1e-3 * scale
    # The top-1 token agrees wherever HF's top two are not a near tie.
    clear = (want[:, 0] - want[:, 1]) > 1e-3 * scale
    assert (logits.argmax(-1)[clear] == ids[clear, 0]).all()
    last = golden["last_logits"][case]
    assert np.abs(logits[-1] - last).max() <= 1e-3 * np.abs(last).max()


def test_greedy_continuation_matches_hf(smollm2, golden):
    prompts = [p["ids"] for p in golden["prompts"]]
    params = SamplingParams(temperature=0.0, max_tokens=GREEDY_TOKENS, ignore_eos=True)
    outs = smollm2.generate(prompts, params)
    for out, p in zip(outs, golden["prompts"]):
        assert out.token_ids == p["greedy"]
        assert out.finish_reason == "length"


def test_perplexity_matches_hf(smollm2, golden):
    g = golden["perplexity"]
    ppl = smollm2.perplexity(g["ids"], window=g["window"])
    assert abs(ppl - g["value"]) <= 1e-3 * g["value"]
