"""The inference engine: `LLM` (offline), `LLMEngine` (step loop), `AsyncEngine` (server-facing).

The contract (`protocol`, `admission`) is torch-free; the offline entry points are imported lazily so
that importing the contract (as the API layer does) does not load torch.
"""
from longserve.server.sampling import SamplingParams

__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams"]


def __getattr__(name: str):
    if name in ("LLM", "CompletionOutput", "RequestOutput"):
        from longserve.server.engine import offline
        return getattr(offline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
