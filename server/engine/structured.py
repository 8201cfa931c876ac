"""Grammar-constrained decoding: structured output (JSON schema / any JSON object) and enforced tool calls.

Built on llguidance (docs/serving.md says why): a request's constraint becomes a grammar, each of its
sequences gets a `Constraint` (the grammar's parse state) and, every step, the allowed next tokens as a
bitmask (one bit per vocabulary entry, int32 words) computed on the host. The sampler copies the step's
bitmasks to the device in one transfer and masks the logits there; the sampled token, which the sampler
reads back anyway, advances the parse state on the host. No device sync is added.

This module is torch-free except for writing a bitmask row into a host tensor the caller provides.
"""
from __future__ import annotations

import json
import threading

import llguidance

from longserve.server.sampling import SamplingParams

# Compact JSON (no free whitespace): a random or weak model cannot wander off in blank space, and the
# output is the same bytes every time for the same values.
_JSON_OPTIONS = {"whitespace_flexible": False}
JSON_OBJECT_SCHEMA = {"type": "object"}


class GrammarError(ValueError):
    """A constraint that cannot be compiled (invalid JSON schema, unsupported keyword)."""


def _check(grammar: str, tokenizer=None) -> str:
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
    if is_error:
        raise GrammarError(messages[0] if messages else "invalid grammar")
    return grammar


def json_schema_grammar(schema: dict | str) -> str:
    """The grammar of JSON text matching `schema` (a dict or its JSON text); GrammarError if invalid."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise GrammarError(f"the schema is not valid JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise GrammarError("a JSON schema must be a JSON object")
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
    except ValueError as exc:
        raise GrammarError(str(exc)) from None
    return _check(grammar)


def tool_call_schema(tools: list[dict]) -> dict:
    """JSON schema of one call `{"name": ..., "arguments": {...}}` to any of `tools` ({name, parameters})."""
    options = []
    for tool in tools:
        # no parameters means an empty parameter list (OpenAI's rule)
        params = tool.get("parameters") or {"type": "object", "properties": {}, "additionalProperties": False}
        options.append({"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                        "properties": {"name": {"const": tool["name"]}, "arguments": params}})
    return options[0] if len(options) == 1 else {"anyOf": options}


def tool_calls_grammar(tools: list[dict], parallel: bool = True) -> str:
    """Qwen2.5-format calls to `tools` and nothing else: `<tool_call>\\n{json}\\n</tool_call>`, one or (when
    `parallel`) several separated by a newline, as the model writes them. GrammarError if a parameter schema
    is invalid."""
    if not tools:
        raise GrammarError("no tools to call")
    schema = json.dumps(tool_call_schema(tools), ensure_ascii=False)
    lark = (("start: call (\"\\n\" call)*\n" if parallel else "start: call\n") +
            "call: \"<tool_call>\\n\" body \"\\n</tool_call>\"\n"
            f"body: %json {{ \"x-guidance\": {json.dumps(_JSON_OPTIONS)}, \"anyOf\": [{schema}] }}\n")
    return _check(llguidance.LLMatcher.grammar_from_lark(lark))


def grammar_for(params: SamplingParams) -> str | None:
    """The grammar a request's sampling parameters ask for, or None when unconstrained."""
    if params.guided_json is not None:
        return json_schema_grammar(params.guided_json)
    if params.guided_tool_calls is not None:
        spec = json.loads(params.guided_tool_calls)
        return tool_calls_grammar(spec["tools"], parallel=spec.get("parallel", True))
    return None


class Constraint:
    """One sequence's parse state: the mask of its next tokens, advanced with each sampled token."""

    def __init__(self, matcher):
        self._m = matcher

    def fill(self, row) -> None:
        """Write the allowed-token bitmask into `row` (a contiguous host int32 tensor of ceil(V/32) words)."""
        self._m.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())
        if self._m.is_error():
            raise RuntimeError(f"structured output: {self._m.get_error()}")

    def advance(self, token_id: int) -> None:
        if not self._m.consume_token(token_id):
            raise RuntimeError(f"structured output: token {token_id} does not fit the grammar "
                               f"({self._m.get_error()})")

    @property
    def done(self) -> bool:
        """The grammar is complete and allows nothing but the end of the sequence."""
        return self._m.is_stopped()


class GrammarCompiler:
    """Makes `Constraint`s for one tokenizer. The library's vocabulary table takes about 2 s to build for a
    152K vocabulary, so `warm_up()` builds it in a background thread at engine start instead of stalling the
    engine loop (and every running request) on the first constrained request; that request waits for it."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids):
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size          # the logits' width: ids the tokenizer lacks are never allowed
        self._eos = list(eos_token_ids)
        self._lltok = None
        self._lock = threading.Lock()

    def warm_up(self) -> None:
        threading.Thread(target=self._llg_tokenizer, name="longserve-grammar-vocab", daemon=True).start()

    def _llg_tokenizer(self):
        with self._lock:
            if self._lltok is None:
                self._lltok = llguidance.LLTokenizer(self._tokenizer.to_json(), n_vocab=self.vocab_size,
                                                     eos_token=self._eos)
            return self._lltok

    def constraint(self, params: SamplingParams) -> Constraint | None:
        grammar = grammar_for(params)
        if grammar is None:
            return None
        matcher = llguidance.LLMatcher(self._llg_tokenizer(), grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(matcher.get_error())
        return Constraint(matcher)


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32
