"""Model configuration: one frozen dataclass, built from YAML, HF config.json or GGUF metadata."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import yaml

from jaxllm.errors import JaxLLMError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def known_configs(kind: str) -> list[str]:
    """Names of the YAML files under configs/<kind> (`models`, `mesh`, `hardware`, ...)."""
    return sorted(p.stem for p in (CONFIG_DIR / kind).glob("*.yaml"))


def find_config(kind: str, name_or_path: str | Path) -> Path | None:
    """A YAML path as given, else configs/<kind>/<name>.yaml; None when it is not a file."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = CONFIG_DIR / kind / f"{name_or_path}.yaml"
    return path if path.is_file() else None


SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency-dependent RoPE scaling."""

    rope_type: str = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama-family decoder."""

    name: str
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise JaxLLMError(
                f"unsupported architecture {self.architecture!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for field in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads"):
            if getattr(self, field) <= 0:
                raise JaxLLMError(f"{field}={getattr(self, field)} must be positive")
        if self.num_heads % self.num_kv_heads:
            raise JaxLLMError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise JaxLLMError(f"head_dim={self.head_dim} must be even for RoPE")

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        e, d = self.hidden_size, self.head_dim
        attn = e * d * (self.num_heads * 2 + self.num_kv_heads * 2)
        mlp = 3 * e * self.intermediate_size
        head = 0 if self.tie_word_embeddings else self.vocab_size * e
        return self.vocab_size * e + head + self.num_layers * (attn + mlp + 2 * e) + e

    # ---------------------------------------------------------------- builders
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        rs = d.pop("rope_scaling", None)
        if rs:
            d["rope_scaling"] = RopeScaling(**rs)
        if "eos_token_ids" in d and d["eos_token_ids"] is not None:
            d["eos_token_ids"] = tuple(d["eos_token_ids"])
        if "head_dim" not in d or d["head_dim"] is None:
            d["head_dim"] = d["hidden_size"] // d["num_heads"]
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise JaxLLMError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_yaml(cls, name_or_path: str | Path) -> ModelConfig:
        path = find_config("models", name_or_path)
        if path is None:
            known = known_configs("models")
            raise JaxLLMError(f"no model config {str(name_or_path)!r}; known: {', '.join(known)}")
        return cls.from_dict(yaml.safe_load(path.read_text()))

    @classmethod
    def from_hf_config(cls, config: dict[str, Any] | str | Path, name: str = "") -> ModelConfig:
        """From a Hugging Face `config.json` (Llama, Mistral, Qwen2)."""
        if not isinstance(config, dict):
            config = json.loads(Path(config).read_text())
        model_type = config.get("model_type", "")
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise JaxLLMError(
                f"unsupported architecture {model_type!r} in config.json; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        rs = config.get("rope_scaling") or config.get("rope_parameters")
        scaling = None
        kind = rs.get("rope_type", rs.get("type")) if rs else None
        if kind == "linear":
            scaling = RopeScaling(rope_type="linear", factor=float(rs["factor"]))
        elif kind == "llama3":
            scaling = RopeScaling(
                factor=float(rs["factor"]),
                low_freq_factor=float(rs["low_freq_factor"]),
                high_freq_factor=float(rs["high_freq_factor"]),
                original_max_position_embeddings=int(rs["original_max_position_embeddings"]),
            )
        elif kind not in (None, "default"):
            raise JaxLLMError(
                f"unsupported rope_scaling type {kind!r}; supported: default, linear, llama3"
            )
        theta = config.get("rope_theta") or (rs or {}).get("rope_theta", 10000.0)
        eos = config.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        heads = config["num_attention_heads"]
        return cls(
            name=name or config.get("_name_or_path", model_type),
            architecture=model_type,
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            intermediate_size=config["intermediate_size"],
            rope_theta=float(theta),
            rope_scaling=scaling,
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            # No sliding-window attention yet: serve only what full attention computes right.
            max_position_embeddings=min(
                int(config.get("max_position_embeddings", 2048)),
                int(config.get("sliding_window") or 1 << 40),
            ),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=bool(config.get("attention_bias", model_type == "qwen2")),
            bos_token_id=config.get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=config.get("pad_token_id"),
        )

    @classmethod
    def from_gguf_metadata(
        cls, meta: dict[str, Any], tensor_names: set[str], name: str = ""
    ) -> ModelConfig:
        """From the key/value metadata of a GGUF file (see checkpoints/gguf_loader.py)."""
        arch = meta.get("general.architecture")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise JaxLLMError(
                f"unsupported architecture {arch!r} in GGUF; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )

        def get(key: str, default: Any = None) -> Any:
            return meta.get(f"{arch}.{key}", default)

        heads = int(get("attention.head_count"))
        hidden = int(get("embedding_length"))
        kv = get("attention.head_count_kv", heads)
        vocab = get("vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))
        scaling = None
        kind = get("rope.scaling.type")
        if kind == "linear":
            scaling = RopeScaling(rope_type="linear", factor=float(get("rope.scaling.factor")))
        elif kind not in (None, "none") and "rope_freqs.weight" not in tensor_names:
            raise JaxLLMError(f"unsupported rope scaling {kind!r} in GGUF")
        eos = meta.get("tokenizer.ggml.eos_token_id")
        return cls(
            name=name or str(meta.get("general.name", arch)),
            architecture=arch,
            vocab_size=int(vocab),
            hidden_size=hidden,
            num_layers=int(get("block_count")),
            num_heads=heads,
            num_kv_heads=int(kv),
            head_dim=int(get("attention.key_length", hidden // heads)),
            intermediate_size=int(get("feed_forward_length")),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            max_position_embeddings=int(get("context_length", 2048)),
            tie_word_embeddings="output.weight" not in tensor_names,
            attention_bias="blk.0.attn_q.bias" in tensor_names,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=tuple(
                dict.fromkeys(
                    int(t) for t in (eos, meta.get("tokenizer.ggml.eot_token_id")) if t is not None
                )
            ),
            pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
        )
