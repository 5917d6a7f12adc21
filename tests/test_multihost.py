"""Two processes on 127.0.0.1 joined by jax.distributed (`jaxllm launch`), DP x TP over
both, give the tokens of one process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from jaxllm import SamplingParams
from jaxllm.distributed import launch


def last_json(stdout: str) -> dict:
    # gloo prints its connection lines on stdout too
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


@pytest.mark.slow
def test_two_processes_of_four_devices_give_one_process_tokens():
    args = ["generate", "--model", "tiny-mesh", "--prompt-ids", "5,6,7,8,9,10"]
    args += ["--max-tokens", "8", "--json"]
    results = launch([*args, "--mesh", "data=2,tensor=4"], 2, devices_per_process=4, timeout=900)
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
    one = subprocess.run(
        [sys.executable, "-m", "jaxllm.cli", *args], capture_output=True, text=True, check=True
    )
    want = last_json(one.stdout)["token_ids"]
    assert [last_json(r.stdout)["token_ids"] for r in results] == [want, want]


@pytest.mark.slow
def test_smollm2_across_two_processes(smollm2):
    prompt = "The capital of France is"
    args = ["generate", "--prompt", prompt, "--max-tokens", "12", "--json"]
    results = launch([*args, "--mesh", "data=2,tensor=3"], 2, devices_per_process=3, timeout=900)
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
    want = smollm2.generate(prompt, SamplingParams(temperature=0, max_tokens=12))[0].token_ids
    assert last_json(results[0].stdout)["token_ids"] == want
    assert last_json(results[1].stdout)["token_ids"] == want


def test_bad_process_arguments_raise():
    from jaxllm import JaxLLMError
    from jaxllm.distributed import initialize

    with pytest.raises(JaxLLMError, match=r"process_id=2 must be in \[0, num_processes=2\)"):
        initialize("127.0.0.1:1234", 2, 2)
    with pytest.raises(JaxLLMError, match="coordinator 'localhost' must be host:port"):
        initialize("localhost", 2, 0)
