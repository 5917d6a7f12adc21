"""Tests that need 8 devices. `tests/test_sharding.py` runs this directory in a subprocess
with XLA_FLAGS=--xla_force_host_platform_device_count=8 (the flag must be set before jax
starts); collected in an ordinary run, with one device, they are skipped."""

from __future__ import annotations

import jax
import pytest

DEVICES = 8


def pytest_collection_modifyitems(config, items):
    if jax.device_count() >= DEVICES:
        return
    skip = pytest.mark.skip(reason=f"needs {DEVICES} devices: run through tests/test_sharding.py")
    here = str(config.rootpath / "tests" / "sharded")
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(skip)
