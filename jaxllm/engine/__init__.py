"""Serving engine: paged KV cache, continuous batching, chunked prefill, preemption."""

from jaxllm.engine.block_manager import BlockManager
from jaxllm.engine.engine import EngineConfig, LLMEngine, StepOutput
from jaxllm.engine.request import Request, Status

__all__ = ["BlockManager", "EngineConfig", "LLMEngine", "Request", "Status", "StepOutput"]
