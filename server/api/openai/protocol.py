"""OpenAI-compatible request models (docs/serving.md#request-parameters) and their conversion to sampling fields.

Unknown fields are accepted (`extra="allow"`) and reported by `ignored_fields()` so the route
can log them; v1-unsupported options are rejected with 400 here, before any tokenization.
"""
from __future__ import annotations

import json
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from longserve.server.api.errors import BadRequest
from longserve.server.api.openai import tools as T
from longserve.server.engine.structured import JSON_OBJECT_SCHEMA, GrammarError, json_schema_grammar


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")

    def ignored_fields(self) -> list[str]:
        return sorted(self.model_extra or {})


class StreamOptions(_Open):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _SamplingRequest(_Open):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    n: int = 1
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: int | None = None
    request_id: str | None = None
    response_format: dict[str, Any] | None = None
    use_beam_search: bool = False
    prompt_logprobs: int | None = None      # vLLM's extra: log-probabilities of the prompt's tokens (top-k)

    def _check_supported(self) -> None:
        if self.use_beam_search:
            raise BadRequest("use_beam_search is not supported", param="use_beam_search")
        if self.logit_bias:
            raise BadRequest("logit_bias is not supported", param="logit_bias")
        if self.n < 1:
            raise BadRequest(f"n must be >= 1, got {self.n}", param="n")
        if self.prompt_logprobs is not None and self.stream:
            raise BadRequest("prompt_logprobs is not available when stream is true", param="prompt_logprobs")
        if self.stream_options is not None and not self.stream:
            raise BadRequest("stream_options is only allowed when stream is true", param="stream_options")

    def _common_fields(self, max_tokens: int | None, logprobs: int | None) -> dict:
        """Explicitly set sampling fields; unset ones fall back to the server defaults."""
        fields = {
            "max_tokens": max_tokens, "n": self.n, "temperature": self.temperature, "top_p": self.top_p,
            "top_k": self.top_k, "min_p": self.min_p, "repetition_penalty": self.repetition_penalty,
            "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
            "seed": self.seed, "min_tokens": self.min_tokens, "ignore_eos": self.ignore_eos,
            "include_stop_str_in_output": self.include_stop_str_in_output,
            "skip_special_tokens": self.skip_special_tokens, "logprobs": logprobs,
            "stop": [self.stop] if isinstance(self.stop, str) else (self.stop or None),
            "stop_token_ids": self.stop_token_ids or None,
            "guided_json": self._guided_json(),
            "prompt_logprobs": self.prompt_logprobs,
        }
        if self.top_k == 0:
            fields["top_k"] = -1
        return fields

    def _guided_json(self) -> str | None:
        """`response_format` json_object / json_schema as the JSON schema text the output must match (400 if
        the schema cannot be compiled); None for plain text."""
        rf = self.response_format
        kind = rf.get("type", "text") if rf is not None else "text"
        if kind == "text":
            return None
        if kind == "json_object":
            schema = JSON_OBJECT_SCHEMA
        elif kind == "json_schema":
            spec = rf.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, dict):
                raise BadRequest("response_format json_schema needs {\"json_schema\": {\"name\": ..., \"schema\": "
                                 "{...}}} with the schema a JSON object", param="response_format")
        else:
            raise BadRequest(f"response_format type {kind!r} is not supported (text, json_object, json_schema)",
                             param="response_format")
        try:
            json_schema_grammar(schema)
        except GrammarError as exc:
            raise BadRequest(f"invalid JSON schema in response_format: {exc}", param="response_format") from None
        return json.dumps(schema, ensure_ascii=False)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)


class ChatMessage(_Open):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None     # an assistant's earlier calls
    tool_call_id: str | None = None                    # a tool result's call

    def template_dict(self, where: str) -> dict:
        """The message as chat templates take it: text content, tool-call arguments as objects."""
        item = {"role": self.role, "content": self.text()}
        if self.name:
            item["name"] = self.name
        if self.tool_call_id is not None:
            item["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            calls = []
            for j, call in enumerate(self.tool_calls):
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise BadRequest(f"{where}.tool_calls[{j}] needs function.name", param="messages")
                args = T.history_arguments(fn.get("arguments"), f"{where}.tool_calls[{j}]")
                calls.append({"id": call.get("id"), "type": "function",
                              "function": {"name": fn["name"], "arguments": args}})
            item["tool_calls"] = calls
        return item

    def text(self) -> str:
        """Message content as text; only text parts are supported in v1."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise BadRequest(f"unsupported content part type {part.get('type')!r}; only 'text' is "
                                 "supported", param="messages")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None

    def tool_settings(self) -> T.ToolSettings | None:
        return T.resolve(self.tools, self.tool_choice, self.parallel_tool_calls)

    def sampling_fields(self) -> dict:
        self._check_supported()
        if self.top_logprobs is not None and not self.logprobs:
            raise BadRequest("top_logprobs requires logprobs to be true", param="top_logprobs")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        fields = self._common_fields(max_tokens, logprobs)
        tools = self.tool_settings()
        forced = tools.guided_tool_calls() if tools is not None else None
        if forced is not None:
            if fields["guided_json"] is not None:
                raise BadRequest("tool_choice 'required' or a named function cannot be combined with a JSON "
                                 "response_format", param="tool_choice")
            fields["guided_tool_calls"] = forced
        return fields

    def message_dicts(self) -> list[dict]:
        return [m.template_dict(f"messages[{i}]") for i, m in enumerate(self.messages)]


PromptInput = Union[str, list[str], list[int], list[list[int]]]


class CompletionRequest(_SamplingRequest):
    prompt: PromptInput
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None

    def sampling_fields(self) -> dict:
        self._check_supported()
        if self.suffix is not None:
            raise BadRequest("suffix is not supported", param="suffix")
        fields = self._common_fields(self.max_tokens, self.logprobs)
        if self.echo and fields["prompt_logprobs"] is None:
            # echo with logprobs scores the prompt too; echo with max_tokens 0 only returns (scores) the prompt
            if self.logprobs is not None:
                fields["prompt_logprobs"] = self.logprobs
            elif self.max_tokens == 0:
                fields["prompt_logprobs"] = 0
        return fields

    def prompts(self) -> list[str | list[int]]:
        """Normalize the four prompt forms into a list of texts or token-id lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise BadRequest("prompt must not be empty", param="prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return [x if isinstance(x, str) else list(x) for x in p]


class TokenizeRequest(_Open):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    return_token_strs: bool = False
    tools: list[Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class DetokenizeRequest(_Open):
    model: str | None = None
    tokens: list[int]


RequestKind = Literal["chat", "completion", "tokenize", "detokenize"]
_MODELS = {"chat": ChatCompletionRequest, "completion": CompletionRequest,
           "tokenize": TokenizeRequest, "detokenize": DetokenizeRequest}


def parse_request(kind: RequestKind, body: Any):
    """Validate a decoded JSON body; pydantic errors become one 400 naming the first bad field."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    try:
        return _MODELS[kind].model_validate(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        first = errors[0]
        param = str(first["loc"][0]) if first.get("loc") else None
        details = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in errors[:5])
        raise BadRequest(f"invalid request: {details}", param=param) from None
