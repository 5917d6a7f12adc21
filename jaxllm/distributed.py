"""Several processes, one mesh: `jax.distributed` start-up, and a launcher for N local
processes (`jaxllm launch`), each of which sees its own devices and all of them together
through `jax.devices()`.

On CPU the launcher gives each process `--devices-per-process` host devices
(XLA_FLAGS=--xla_force_host_platform_device_count) and XLA's gloo collectives join them.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Sequence

from jaxllm.errors import JaxLLMError


def initialize(coordinator: str, num_processes: int, process_id: int) -> None:
    """Join the job (call before any jax computation)."""
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise JaxLLMError(f"process_id={process_id} must be in [0, num_processes={num_processes})")
    host, sep, port = coordinator.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise JaxLLMError(f"coordinator {coordinator!r} must be host:port")
    import jax

    jax.distributed.initialize(
        coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    command: Sequence[str],
    num_processes: int,
    *,
    devices_per_process: int = 0,
    port: int = 0,
    timeout: float | None = None,
) -> list[subprocess.CompletedProcess]:
    """Run `jaxllm <command> --num-processes N --process-id i --coordinator 127.0.0.1:port`
    in N local processes and wait for all; returns their completed processes in order."""
    if num_processes < 1:
        raise JaxLLMError(f"num_processes={num_processes} must be at least 1")
    port = port or free_port()
    procs = []
    for i in range(num_processes):
        env = dict(os.environ)
        if devices_per_process:
            flag = f"--xla_force_host_platform_device_count={devices_per_process}"
            env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flag}".strip()
            env["JAX_PLATFORMS"] = "cpu"
        cmd = [sys.executable, "-m", "jaxllm.cli", *command]
        cmd += ["--num-processes", str(num_processes), "--process-id", str(i)]
        cmd += ["--coordinator", f"127.0.0.1:{port}"]
        procs.append(
            subprocess.Popen(
                cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return results
