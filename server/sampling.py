"""`SamplingParams`: per-request generation settings (torch-free, validated at construction).

Defaults follow the OpenAI/vLLM conventions in docs/serving.md#request-parameters. `max_tokens=None` means
"up to the engine's cap" (`EngineConfig.max_output_tokens`, also bounded by the context left).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0            # 0 => greedy
    top_p: float = 1.0
    top_k: int = -1                     # -1 or 0 => disabled
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None         # number of top logprobs per generated token (0 => only the chosen)
    # log-probability of every prompt token (the first has none) and this many top alternatives, computed
    # during prefill; with it, max_tokens=0 scores the prompt without generating
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    # grammar-constrained output (server/engine/structured.py): JSON text of a JSON schema the output must
    # match, or of the tools the output must call in Qwen2.5's tool-call format:
    # {"tools": [{"name", "parameters"}], "parallel": bool (several calls allowed)}
    guided_json: str | None = None
    guided_tool_calls: str | None = None

    def __post_init__(self) -> None:
        # accept lists for convenience, store tuples (frozen + hashable)
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        errors = []
        if not isinstance(self.n, int) or self.n < 1:
            errors.append(f"n must be >= 1, got {self.n}")
        if self.temperature < 0:
            errors.append(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            errors.append(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            errors.append(f"top_k must be -1 (disabled) or >= 1, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            errors.append(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            errors.append(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not -2 <= self.presence_penalty <= 2:
            errors.append(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not -2 <= self.frequency_penalty <= 2:
            errors.append(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        least = 0 if self.prompt_logprobs is not None else 1    # 0: score the prompt only
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < least):
            errors.append(f"max_tokens must be >= {least}, got {self.max_tokens}"
                          + (" (0 scores the prompt only and needs prompt_logprobs)" if least else ""))
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            errors.append(f"min_tokens must be >= 0, got {self.min_tokens}")
        elif self.max_tokens is not None and self.min_tokens > self.max_tokens:
            errors.append(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            errors.append(f"logprobs must be in [0, 20], got {self.logprobs}")
        if self.prompt_logprobs is not None and (not isinstance(self.prompt_logprobs, int)
                                                 or not 0 <= self.prompt_logprobs <= 20):
            errors.append(f"prompt_logprobs must be in [0, 20], got {self.prompt_logprobs}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            errors.append("stop must be non-empty strings")
        if self.guided_json is not None and self.guided_tool_calls is not None:
            errors.append("guided_json and guided_tool_calls cannot both be set")
        if (self.guided_json is not None or self.guided_tool_calls is not None) and (self.ignore_eos
                                                                                    or self.min_tokens):
            errors.append("a constrained output (response_format, enforced tool calls) ends where its grammar "
                          "does: ignore_eos and min_tokens cannot be combined with it")
        if errors:
            raise ValueError("; ".join(errors))

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0
