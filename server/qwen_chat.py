"""Qwen2.5's chat format with tools, rendered in Python: the fallback for checkpoints whose own chat
template cannot render tools (it never mentions them), such as models fine-tuned from Qwen2.5 with a
plain ChatML template.

The text is what Qwen2.5-Instruct's template produces (the format the model was trained on): the tool
signatures in the system turn, each assistant call as `<tool_call>\\n{"name": ..., "arguments": {...}}\\n
</tool_call>`, and consecutive tool results grouped in one user turn as `<tool_response>` blocks.
Messages are the template dicts of the API layer (arguments already decoded into objects).
"""
from __future__ import annotations

import json

DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
TOOLS_INTRO = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
               "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
TOOLS_OUTRO = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
               "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
               "{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>")


def _json(value) -> str:
    return json.dumps(value, ensure_ascii=False)      # the spacing of the templates' tojson


def _turn(role: str, body: str) -> str:
    return f"<|im_start|>{role}\n{body}<|im_end|>\n"


def _system(messages: list[dict], tools: list | None) -> tuple[str, list[dict]]:
    """The system turn and the messages left after it."""
    first = messages[0] if messages else {}
    text, rest = DEFAULT_SYSTEM, messages
    if first.get("role") == "system":
        text, rest = first.get("content") or "", messages[1:]
    if tools:
        text += "\n\n" + TOOLS_INTRO + "".join("\n" + _json(t) for t in tools) + TOOLS_OUTRO
    return _turn("system", text), rest


def _assistant(message: dict) -> str:
    calls = message.get("tool_calls") or []
    content = message.get("content") or ""
    if not calls:
        return _turn("assistant", content)
    text = "<|im_start|>assistant" + ("\n" + content if content else "")
    for call in calls:
        fn = call.get("function", call)
        text += f"\n<tool_call>\n{{\"name\": {_json(fn['name'])}, \"arguments\": {_json(fn.get('arguments', {}))}}}" \
                "\n</tool_call>"
    return text + "<|im_end|>\n"


def render(messages: list[dict], tools: list | None = None, add_generation_prompt: bool = True,
           continue_final_message: bool = False) -> str:
    head, rest = _system(messages, tools)
    out = [head]
    for i, message in enumerate(rest):
        role = message.get("role")
        if role == "assistant":
            out.append(_assistant(message))
        elif role == "tool":
            first = i == 0 or rest[i - 1].get("role") != "tool"
            last = i == len(rest) - 1 or rest[i + 1].get("role") != "tool"
            out.append(("<|im_start|>user" if first else "") + "\n<tool_response>\n" + (message.get("content") or "")
                       + "\n</tool_response>" + ("<|im_end|>\n" if last else ""))
        else:
            out.append(_turn(role, message.get("content") or ""))
    text = "".join(out)
    if continue_final_message and rest and rest[-1].get("role") == "assistant" and text.endswith("<|im_end|>\n"):
        return text[:-len("<|im_end|>\n")]
    if add_generation_prompt:
        text += "<|im_start|>assistant\n"
    return text


def template_renders_tools(template: str | None) -> bool:
    """Whether a checkpoint's Jinja chat template handles tools itself (it refers to them)."""
    return bool(template) and "tools" in template and "tool_call" in template
