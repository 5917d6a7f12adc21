"""SmolLM2 (9 heads / 3 KV heads / 30 layers) on the meshes that divide it: tensor=3, with
data and pipeline axes, against the unsharded model; and the CLI's --mesh."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxllm import LLM, SamplingParams

PROMPTS = ["The capital of France is", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def reference():
    llm = LLM("smollm2-135m", dtype="float32", engine=False, log=lambda *a: None)
    ids = llm.encode(PROMPTS[0])
    sp = SamplingParams(temperature=0, max_tokens=16)
    return llm.logits(ids), [o.token_ids for o in llm.generate(PROMPTS, sp)], ids


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["data=1,pipeline=2,tensor=3", "data=2,pipeline=1,tensor=3"])
def test_smollm2_sharded_equals_single_device(reference, mesh):
    want_logits, want_tokens, ids = reference
    llm = LLM("smollm2-135m", dtype="float32", mesh=mesh, max_batch=2, log=lambda *a: None)
    np.testing.assert_allclose(llm.logits(ids), want_logits, rtol=1e-4, atol=2e-4)
    sp = SamplingParams(temperature=0, max_tokens=16)
    assert [o.token_ids for o in llm.generate(PROMPTS, sp)] == want_tokens


@pytest.mark.slow
def test_cli_mesh_flag(reference):
    _, want_tokens, _ = reference
    cmd = [sys.executable, "-m", "jaxllm.cli", "generate", "--prompt", PROMPTS[0]]
    cmd += ["--max-tokens", "16", "--mesh", "data=1,pipeline=1,tensor=3", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ), timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["token_ids"] == want_tokens[0]
