"""Offline batch API: `LLM(model_path, **config_overrides).generate(prompts, params)`."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from longserve.server.config import EngineConfig
from longserve.server.engine.llm_engine import LLMEngine
from longserve.server.engine.protocol import (
    CompletionDelta,
    FinishReason,
    PromptLogprobs,
    RequestFailed,
    RequestFinished,
    TokenLogprob,
)
from longserve.server.sampling import SamplingParams


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: RequestFinished | None = None
    failure: RequestFailed | None = None     # set when the engine could not run the request (choices end "error")
    # with SamplingParams.prompt_logprobs: one entry per prompt token, None for the first (vLLM's layout)
    prompt_logprobs: list[TokenLogprob | None] | None = None


def default_engine_config(model_path: str, **overrides) -> EngineConfig:
    """An EngineConfig for a local checkpoint: context from its config.json, a CPU-friendly chunk."""
    try:
        with open(os.path.join(model_path, "config.json"), encoding="utf-8") as fh:
            max_pos = int(json.load(fh).get("max_position_embeddings", 32768))
    except (OSError, ValueError):
        max_pos = 32768
    max_len = overrides.get("max_model_len", max_pos)
    values = dict(schema_version=1, runtime="native", model_path=model_path,
                  served_model_name=os.path.basename(os.path.normpath(model_path)) or "model",
                  tensor_parallel_size=1, max_model_len=max_len, max_num_seqs=16,
                  max_output_tokens=min(8192, max_len - 1), prefill_chunk_tokens=2048,
                  gpu_memory_utilization=0.9, dtype="float32")
    values.update(overrides)
    return EngineConfig(**values)


class LLM:
    """`tensor_parallel_size=N` starts N - 1 worker processes beside this one (gloo on the CPU, NCCL on GPUs);
    `close()` (or leaving a `with` block) stops them, and they also die with this process."""

    def __init__(self, model_path: str, *, device: str | None = None, **config_overrides):
        self.config = default_engine_config(model_path, **config_overrides)
        self.engine = LLMEngine(self.config, device=device)
        self.tokenizer = self.engine.tokenizer
        self._counter = 0

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Prompts are strings or token-id lists; one SamplingParams for all, or one per prompt."""
        single = isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int))
        prompts = [prompts] if single else list(prompts)
        params = params or SamplingParams()
        per_prompt = params if isinstance(params, list) else [params] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise ValueError(f"{len(per_prompt)} SamplingParams for {len(prompts)} prompts")
        outputs: dict[str, RequestOutput] = {}
        order = []
        for prompt, p in zip(prompts, per_prompt):
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
            rid = f"offline-{self._counter}"
            self._counter += 1
            self.engine.add_request(rid, ids, p)
            outputs[rid] = RequestOutput(rid, ids, [CompletionOutput(i) for i in range(p.n)],
                                         prompt_logprobs=[None] if p.prompt_logprobs is not None else None)
            order.append(rid)
        while self.engine.has_work():
            for event in self.engine.step():
                if isinstance(event, CompletionDelta):
                    out = outputs[event.request_id].outputs[event.index]
                    out.text += event.text
                    out.token_ids.extend(event.token_ids)
                    out.logprobs.extend(event.logprobs)
                    if event.finish_reason is not None:
                        out.finish_reason, out.stop_reason = event.finish_reason, event.stop_reason
                elif isinstance(event, PromptLogprobs):
                    outputs[event.request_id].prompt_logprobs.extend(event.logprobs)
                elif isinstance(event, RequestFinished):
                    outputs[event.request_id].finished = event
                elif isinstance(event, RequestFailed):
                    outputs[event.request_id].failure = event
        return [outputs[r] for r in order]
