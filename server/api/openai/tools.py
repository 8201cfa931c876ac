"""Tool calling in Qwen2.5's format: request settings (`tools`, `tool_choice`), and the model's
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` text turned into OpenAI `tool_calls`, whole
(`parse`) or as stream deltas (`ToolCallStream`).

`tool_choice` "required" and a named function are enforced by constrained decoding: the output is limited
to tool calls (to that function) whose arguments match the declared parameter schemas
(`SamplingParams.guided_tool_calls`, server/engine/structured.py). "auto" leaves the choice to the model;
"none" neither shows the tools to the model nor parses its output. Text that does not parse as a
complete call (bad JSON, a missing name, a call cut off by max_tokens) stays content: never an error.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from longserve.server.api.errors import BadRequest
from longserve.server.engine.structured import GrammarError, tool_calls_grammar

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class ToolSettings:
    """The resolved tool options of one chat request."""
    tools: list[dict]                 # the request's tool objects, as the chat template receives them
    choice: str                       # "none" | "auto" | "required" | "named"
    named: str | None = None
    parallel: bool = True

    @property
    def parse_output(self) -> bool:
        return self.choice != "none"

    @property
    def template_tools(self) -> list[dict] | None:
        return self.tools if self.choice != "none" else None

    def guided_tool_calls(self) -> str | None:
        """The constraint for "required" / named (JSON for SamplingParams.guided_tool_calls), else None."""
        if self.choice not in ("required", "named"):
            return None
        functions = [{"name": t["function"]["name"], "parameters": t["function"].get("parameters")}
                     for t in self.tools if self.choice == "required" or t["function"]["name"] == self.named]
        parallel = self.parallel and self.choice == "required"
        try:
            tool_calls_grammar(functions, parallel)
        except GrammarError as exc:
            raise BadRequest(f"a tool's parameters are not a usable JSON schema: {exc}", param="tools") from None
        return json.dumps({"tools": functions, "parallel": parallel}, ensure_ascii=False)


def _check_tools(tools) -> list[dict]:
    if not isinstance(tools, list):
        raise BadRequest("tools must be a list", param="tools")
    names = set()
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(fn, dict):
            raise BadRequest(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{...}}}}", param="tools")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise BadRequest(f"tools[{i}].function.name must be 1-64 letters, digits, '_', '.' or '-'",
                             param="tools")
        if name in names:
            raise BadRequest(f"tools[{i}]: duplicate function name {name!r}", param="tools")
        names.add(name)
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise BadRequest(f"tools[{i}].function.parameters must be a JSON schema object", param="tools")
    return tools


def resolve(tools, tool_choice, parallel_tool_calls: bool | None) -> ToolSettings | None:
    """Validate the request's tool options (400 on error); None when the request uses no tools."""
    tools = _check_tools(tools) if tools else []
    parallel = parallel_tool_calls is not False
    if tool_choice is None:
        return ToolSettings(tools, "auto", parallel=parallel) if tools else None
    if tool_choice == "none":
        return ToolSettings(tools, "none") if tools else None
    if not tools:
        raise BadRequest("tool_choice needs tools", param="tool_choice")
    if tool_choice in ("auto", "required"):
        return ToolSettings(tools, tool_choice, parallel=parallel)
    name = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) else None
    if not isinstance(tool_choice, dict) or tool_choice.get("type") != "function" or not isinstance(name, str):
        raise BadRequest('tool_choice must be "none", "auto", "required" or {"type": "function", "function": '
                         '{"name": ...}}', param="tool_choice")
    if name not in {t["function"]["name"] for t in tools}:
        raise BadRequest(f"tool_choice names the function {name!r}, which is not among the tools",
                         param="tool_choice")
    return ToolSettings(tools, "named", named=name, parallel=False)


def history_arguments(arguments, where: str) -> dict:
    """A history tool call's `arguments` (a JSON string, or already an object) as the object templates render."""
    if isinstance(arguments, dict):
        return arguments
    if isinstance(arguments, str):
        try:
            value = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            value = None
        if isinstance(value, dict):
            return value
    raise BadRequest(f"{where}.function.arguments must be a JSON object encoded as a string", param="messages")


def _call(body: str) -> tuple[str, str] | None:
    """(name, arguments JSON text) of one call's JSON body, or None when it is not a well-formed call."""
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        return None
    args = value.get("arguments", value.get("parameters", {}))
    if not isinstance(args, dict):
        return None
    return value["name"], json.dumps(args, ensure_ascii=False)


def parse(text: str) -> tuple[str | None, list[dict]]:
    """Split a whole output into (content, tool_calls). Any malformed call: the whole text is content."""
    if OPEN not in text:
        return text, []
    calls, outside, rest = [], [], text
    while OPEN in rest:
        before, _, after = rest.partition(OPEN)
        outside.append(before)
        body, closed, rest = after.partition(CLOSE)
        call = _call(body) if closed else None
        if call is None:
            return text, []
        calls.append({"id": new_call_id(), "type": "function",
                      "function": {"name": call[0], "arguments": call[1]}})
    outside.append(rest)
    content = "".join(outside).strip()
    return content or None, calls


def _held_prefix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that could be the start of `tag`."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class ToolCallStream:
    """Turns one choice's streamed text into OpenAI chat deltas: `{"content": ...}` for text as it arrives,
    and per call `{"tool_calls": [{index, id, type, function: {name, arguments: ""}}]}` followed by
    `{"tool_calls": [{index, function: {arguments}}]}`. A call is sent when its closing tag arrives, once it
    is known to parse: a malformed or unfinished call becomes content instead of a broken call the client
    cannot take back. Text that could be the start of `<tool_call>` is held until it is known not to be."""

    def __init__(self):
        self.pending = ""            # text not yet classified
        self.in_call = False
        self.count = 0               # calls sent (the next call's index)

    @property
    def called(self) -> bool:
        return self.count > 0

    def feed(self, text: str) -> list[dict]:
        self.pending += text
        out: list[dict] = []
        while self.pending:
            if self.in_call:
                end = self.pending.find(CLOSE)
                if end < 0:
                    break
                body, self.pending = self.pending[:end], self.pending[end + len(CLOSE):]
                self.in_call = False
                out.extend(self._call_deltas(body))
                continue
            at = self.pending.find(OPEN)
            if at < 0:
                cut = len(self.pending) - _held_prefix(self.pending, OPEN)
                if cut:
                    out.append({"content": self.pending[:cut]})
                    self.pending = self.pending[cut:]
                break
            if at:
                out.append({"content": self.pending[:at]})
            self.pending = self.pending[at + len(OPEN):]
            self.in_call = True
        return out

    def _call_deltas(self, body: str) -> list[dict]:
        call = _call(body)
        if call is None:
            return [{"content": OPEN + body + CLOSE}]
        index, self.count = self.count, self.count + 1
        return [{"tool_calls": [{"index": index, "id": new_call_id(), "type": "function",
                                 "function": {"name": call[0], "arguments": ""}}]},
                {"tool_calls": [{"index": index, "function": {"arguments": call[1]}}]}]

    def close(self) -> list[dict]:
        """The end of the output: held text, or an unfinished call, goes out as content."""
        text = (OPEN if self.in_call else "") + self.pending
        self.pending, self.in_call = "", False
        return [{"content": text}] if text else []
