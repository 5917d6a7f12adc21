"""jaxllm: LLM inference and sharding on JAX/XLA."""

from jaxllm.config import ModelConfig
from jaxllm.errors import JaxLLMError
from jaxllm.llm import LLM, RequestOutput
from jaxllm.sampling import SamplingParams

__all__ = ["LLM", "JaxLLMError", "ModelConfig", "RequestOutput", "SamplingParams"]
