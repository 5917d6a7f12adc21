"""The Python API and the CLI on SmolLM2, checked against the static generator and each other."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxllm import LLM, JaxLLMError, SamplingParams


def test_generate_text_and_token_ids_agree(smollm2):
    params = SamplingParams(temperature=0, max_tokens=8)
    by_text = smollm2.generate("The capital of France is", params)[0]
    ids = smollm2.encode("The capital of France is")
    by_ids = smollm2.generate(ids, params)[0]
    assert by_text.token_ids == by_ids.token_ids
    assert by_text.prompt_token_ids == ids
    assert by_text.text == smollm2.decode(by_text.token_ids)
    assert "Paris" in by_text.text


def test_chat_uses_the_template_and_stops_on_eos(smollm2):
    out = smollm2.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(temperature=0, max_tokens=48),
    )[0]
    prompt = smollm2.tokenizer.decode(out.prompt_token_ids, skip_special_tokens=False)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert prompt.endswith("<|im_start|>assistant\n")
    assert out.finish_reason == "stop" and out.token_ids[-1] == 2
    assert "Paris" in out.text


def test_stop_strings_and_n_samples_through_the_api(smollm2):
    """The real tokenizer's text is cut where a stop string first appears (oracle: the same
    greedy request without it); n=2 seeded samples equal two single seeded requests."""
    prompt = "List three colours: red, green,"
    free = smollm2.generate(prompt, SamplingParams(temperature=0, max_tokens=24))[0]
    stop = "answer"
    assert stop in free.text
    cut = smollm2.generate(prompt, SamplingParams(temperature=0, max_tokens=24, stop=[stop]))[0]
    assert cut.text == free.text[: free.text.find(stop)]
    assert cut.finish_reason == "stop" and cut.outputs[0].stop_reason == stop
    assert free.token_ids[: len(cut.token_ids)] == cut.token_ids
    p = SamplingParams(temperature=0.8, max_tokens=6, seed=5, n=2, logprobs=1)
    both = smollm2.generate(prompt, p)[0]
    singles = [
        smollm2.generate(prompt, SamplingParams(temperature=0.8, max_tokens=6, seed=5 + i))[0]
        for i in range(2)
    ]
    assert [o.token_ids for o in both.outputs] == [s.token_ids for s in singles]
    assert [o.text for o in both.outputs] == [s.text for s in singles]
    assert all(len(o.logprobs) == len(o.token_ids) for o in both.outputs)


def test_logits_last_row_drives_greedy(smollm2):
    ids = smollm2.encode("One, two, three, four,")
    logits = smollm2.logits(ids)
    assert logits.shape == (len(ids), smollm2.config.vocab_size) and logits.dtype == np.float32
    first = smollm2.generate(ids, SamplingParams(temperature=0, max_tokens=1))[0].token_ids[0]
    assert first == int(np.argmax(logits[-1]))


def test_bad_requests_raise_and_the_model_keeps_working(smollm2):
    limit = smollm2.config.max_position_embeddings
    with pytest.raises(JaxLLMError, match=f"exceeds the context of {limit} tokens"):
        smollm2.generate([1] * 10, SamplingParams(max_tokens=limit))
    with pytest.raises(JaxLLMError, match="needs 'role' and 'content'"):
        smollm2.chat([{"content": "no role"}])
    out = smollm2.generate("Hello", SamplingParams(temperature=0, max_tokens=2))[0]
    assert len(out.token_ids) == 2


def test_llm_rejects_bad_arguments(tmp_path):
    with pytest.raises(JaxLLMError, match="dtype 'int3' is not one of"):
        LLM("tiny", dtype="int3")
    with pytest.raises(JaxLLMError, match="weight_dtype 'int4' is not one of"):
        LLM("tiny", weight_dtype="int4")
    with pytest.raises(JaxLLMError, match="unknown attention backend 'magic'"):
        LLM("tiny", attention="magic")
    with pytest.raises(JaxLLMError, match="is not a file, an HF directory or a known name"):
        LLM(str(tmp_path / "nowhere"))


def test_shapes_only_config_generates_from_token_ids():
    llm = LLM("tiny", log=lambda *a: None)
    out = llm.generate([1, 2, 3], SamplingParams(temperature=0, max_tokens=4))[0]
    assert len(out.token_ids) == 4 and out.text == ""
    with pytest.raises(JaxLLMError, match="has no tokenizer"):
        llm.generate("text needs a tokenizer")


def run_cli(*args):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "jaxllm.cli", *args], capture_output=True, text=True, env=env
    )


def test_cli_json_matches_the_api(smollm2):
    r = run_cli("generate", "--prompt", "The capital of France is", "--max-tokens", "6", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    api = smollm2.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=6))
    assert out["token_ids"] == api[0].token_ids
    assert out["text"] == api[0].text
    assert out["timings"]["decode_tok_s"] > 0


def test_cli_errors_are_one_line_without_traceback(tmp_path):
    junk = tmp_path / "model.gguf"
    junk.write_text("not gguf")
    for args in (
        ["generate", "--model", str(junk), "--prompt", "x"],
        ["generate", "--prompt", "x", "--temperature", "-1"],
        ["generate", "--model", str(tmp_path / "missing.gguf"), "--prompt", "x"],
    ):
        r = run_cli(*args)
        assert r.returncode == 2
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("jaxllm: error:"), r.stderr
        assert "Traceback" not in r.stderr


def test_chat_adds_no_second_bos_when_the_template_writes_one(smollm2):
    tok = smollm2.tokenizer
    saved = (tok.add_bos, tok.chat_template)
    try:
        tok.add_bos = True
        tok.chat_template = (
            "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
            "{% endfor %}"
        )
        out = smollm2.chat([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=1))[0]
        assert out.prompt_token_ids[0] == tok.bos_token_id
        assert out.prompt_token_ids.count(tok.bos_token_id) == 1
        plain = smollm2.generate("Hi", SamplingParams(max_tokens=1))[0]
        assert plain.prompt_token_ids[0] == tok.bos_token_id  # plain text does get BOS
    finally:
        tok.add_bos, tok.chat_template = saved
