"""The inference engine: `LLM` (offline), `LLMEngine` (step loop), `AsyncEngine` (server-facing)."""
from longserve.server.engine.offline import LLM, CompletionOutput, RequestOutput
from longserve.server.sampling import SamplingParams

__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams"]
