"""Quantization recipes: one frozen `QuantConfig`, loaded from YAML in configs/quant/.

A recipe string names one or more recipes joined by `+` ("int4-g128+kv-int8"); each sets
some fields and the composition takes every field a recipe sets. Two recipes that set the
same field to different values are an error.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from jaxllm.config import CONFIG_DIR
from jaxllm.errors import JaxLLMError

RECIPE_DIR = CONFIG_DIR / "quant"
METHODS = ("rtn", "gptq", "gguf")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how.

    weight_bits: 8 or 4 for the linear layers (None: keep them float).
    group_size: inputs sharing one scale (None: one scale per output channel).
    activation_bits: 8 for dynamic per-token int8 activations (needs 8-bit weights).
    activation_group: with int8 activations, one scale per token per this many inputs.
    embed_bits: the token embedding / tied output head (None: keep it float).
    kv_bits: 8 for an int8 KV cache with per-token-per-head scales.
    smoothquant: SmoothQuant's migration strength alpha for w8a8 (needs calibration text).
    symmetric: False for int4 codes over each group's [min, max] (a float16 offset per group,
      GGUF Q4_1's form) instead of around zero.
    scale_bits: 8 double-quantizes asymmetric int4's float16 group scales and offsets to
      uint8 / int8 codes under float16 super-scales (llama.cpp's k-quants, QLoRA); None keeps
      them float16.
    scale_block: groups sharing one super-scale (must divide each row's group count); None:
      one per row.
    method: `rtn` (round to nearest), `gptq` (needs calibration text) or `gguf` (the GGUF
      file's own Q8_0/Q4_0/Q4_1 blocks, loaded as they are).
    gguf_activations: with the gguf method, `q8` multiplies each block weight the way
      llama.cpp's CPU backend does: activations in 8-bit blocks of 32 (Q8_1 against Q4_1,
      Q8_0 against Q8_0 and Q4_0), integer products per block (`jaxllm.quant.ggml_dot`).
      None keeps float32 activations.
    kv_dtype: a float dtype for the KV cache (`float16`: llama.cpp's default cache).
    attention_f16: Q and the softmax probabilities rounded to float16 before their products
      with the float16 K/V cache, as llama.cpp's CPU attention does (attention backend
      `llamacpp`, `jaxllm.quant.f16_attention`); needs kv_dtype float16.
    """

    name: str = "none"
    weight_bits: int | None = None
    group_size: int | None = None
    activation_bits: int | None = None
    activation_group: int | None = None
    embed_bits: int | None = None
    kv_bits: int | None = None
    method: str = "rtn"
    symmetric: bool = True
    scale_bits: int | None = None
    scale_block: int | None = None
    smoothquant: float | None = None
    gguf_activations: str | None = None
    kv_dtype: str | None = None
    attention_f16: bool = False

    def __post_init__(self) -> None:
        for field, allowed in (
            ("weight_bits", (None, 4, 8)),
            ("embed_bits", (None, 4, 8)),
            ("activation_bits", (None, 8)),
            ("kv_bits", (None, 8)),
            ("scale_bits", (None, 8)),
            ("gguf_activations", (None, "q8")),
            ("kv_dtype", (None, "float16", "bfloat16", "float32")),
        ):
            if getattr(self, field) not in allowed:
                raise JaxLLMError(
                    f"{field}={getattr(self, field)!r} in recipe {self.name!r} is not one of "
                    f"{', '.join(str(a) for a in allowed)}"
                )
        if self.group_size is not None and (self.group_size <= 0 or self.group_size % 2):
            raise JaxLLMError(
                f"group_size={self.group_size} in recipe {self.name!r} must be a positive even "
                "number"
            )
        if self.weight_bits == 4 and self.group_size is None:
            raise JaxLLMError(f"recipe {self.name!r}: 4-bit weights need a group_size")
        if self.activation_bits is not None and (
            self.weight_bits != 8 or self.group_size is not None
        ):
            raise JaxLLMError(
                f"recipe {self.name!r}: int8 activations need per-channel int8 weights "
                f"(weight_bits=8, group_size=None), got weight_bits={self.weight_bits}, "
                f"group_size={self.group_size}"
            )
        if not self.symmetric and 4 not in (self.weight_bits, self.embed_bits):
            raise JaxLLMError(
                f"recipe {self.name!r}: asymmetric quantization is for int4 weights only "
                "(int8 parts stay symmetric)"
            )
        if self.scale_bits is not None and (self.symmetric or 4 not in (
            self.weight_bits, self.embed_bits
        )):  # fmt: skip
            raise JaxLLMError(
                f"recipe {self.name!r}: scale_bits={self.scale_bits} is for asymmetric int4 "
                f"weights, got symmetric={self.symmetric}, weight_bits={self.weight_bits}, "
                f"embed_bits={self.embed_bits}"
            )
        if self.scale_block is not None and (self.scale_bits is None or self.scale_block <= 0):
            raise JaxLLMError(
                f"recipe {self.name!r}: scale_block={self.scale_block} needs scale_bits and a "
                "positive number of groups"
            )
        if self.smoothquant is not None and (
            self.activation_bits is None or not 0.0 <= self.smoothquant <= 1.0
        ):
            raise JaxLLMError(
                f"recipe {self.name!r}: smoothquant={self.smoothquant} needs int8 activations "
                "and a strength in [0, 1]"
            )
        if self.method == "gguf" and (self.weight_bits or self.embed_bits):
            raise JaxLLMError(
                f"recipe {self.name!r}: the gguf method keeps the file's own blocks and takes "
                "no weight_bits or embed_bits"
            )
        if self.gguf_activations is not None and self.method != "gguf":
            raise JaxLLMError(
                f"recipe {self.name!r}: gguf_activations={self.gguf_activations!r} needs "
                f"method gguf, got method={self.method!r}"
            )
        if self.kv_dtype is not None and self.kv_bits is not None:
            raise JaxLLMError(
                f"recipe {self.name!r}: kv_dtype={self.kv_dtype!r} and kv_bits={self.kv_bits} "
                "both set the KV cache; choose one"
            )
        if self.attention_f16 and self.kv_dtype != "float16":
            raise JaxLLMError(
                f"recipe {self.name!r}: attention_f16 needs kv_dtype='float16', got "
                f"kv_dtype={self.kv_dtype!r}"
            )
        if self.method not in METHODS:
            raise JaxLLMError(
                f"method={self.method!r} in recipe {self.name!r} is not one of {', '.join(METHODS)}"
            )

    @property
    def quantizes_weights(self) -> bool:
        return self.weight_bits is not None or self.embed_bits is not None or self.method == "gguf"


def available_recipes() -> tuple[str, ...]:
    return tuple(sorted(p.stem for p in RECIPE_DIR.glob("*.yaml")))


def _read_recipe(name: str) -> dict:
    path = RECIPE_DIR / f"{name}.yaml"
    if not name or not path.is_file():
        raise JaxLLMError(
            f"unknown quantization recipe {name!r}; available: {', '.join(available_recipes())} "
            "(join several with '+', e.g. int4-g128+kv-int8)"
        )
    fields = yaml.safe_load(path.read_text()) or {}
    known = {f.name for f in dataclasses.fields(QuantConfig)} - {"name"}
    unknown = set(fields) - known
    if unknown:
        raise JaxLLMError(f"recipe {str(path)!r} has unknown fields {sorted(unknown)}")
    return fields


def load_recipe(spec: str | QuantConfig) -> QuantConfig:
    """A QuantConfig from a recipe string such as "int8", "int4-g32+gptq+kv-int8"."""
    if isinstance(spec, QuantConfig):
        return spec
    if not isinstance(spec, str):
        raise JaxLLMError(f"quantization must be a recipe name or QuantConfig, got {spec!r}")
    merged: dict = {}
    owner: dict[str, str] = {}
    for part in spec.split("+"):
        part = part.strip()
        for key, value in _read_recipe(part).items():
            if key in merged and merged[key] != value:
                raise JaxLLMError(
                    f"recipes {owner[key]!r} and {part!r} set {key} to {merged[key]!r} and "
                    f"{value!r}; they cannot be combined"
                )
            merged[key], owner[key] = value, part
    return QuantConfig(name=spec, **merged)


def recipe_path(name: str) -> Path:
    return RECIPE_DIR / f"{name}.yaml"
