"""jaxllm: LLM inference and sharding on JAX/XLA."""

from jaxllm.config import ModelConfig
from jaxllm.errors import JaxLLMError
from jaxllm.llm import LLM, CompletionOutput, RequestOutput
from jaxllm.sampling import SamplingParams

__all__ = [
    "LLM",
    "CompletionOutput",
    "JaxLLMError",
    "ModelConfig",
    "RequestOutput",
    "SamplingParams",
]
