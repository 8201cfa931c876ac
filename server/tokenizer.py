"""Tokenizer (Hugging Face `tokenizer.json` via the `tokenizers` library) and the checkpoint's chat
template rendered with jinja2, plus incremental detokenisation that never splits a UTF-8 character."""
from __future__ import annotations

import json
import os
from typing import Sequence

from longserve.server.hf_config import CheckpointError
from longserve.server.qwen_chat import render as render_qwen
from longserve.server.qwen_chat import template_renders_tools

REPLACEMENT = "\ufffd"


class Tokenizer:
    def __init__(self, directory: str):
        from tokenizers import Tokenizer as HFTokenizer

        path = os.path.join(directory, "tokenizer.json")
        if not os.path.exists(path):
            raise CheckpointError(f"{path}: missing (the engine needs a fast tokenizer file)")
        try:
            self._tok = HFTokenizer.from_file(path)
        except Exception as exc:  # the tokenizers library raises its own Exception type
            raise CheckpointError(f"{path}: cannot load ({exc})") from None
        cfg_path = os.path.join(directory, "tokenizer_config.json")
        self.config = {}
        if os.path.exists(cfg_path):
            try:
                with open(cfg_path, encoding="utf-8") as fh:
                    self.config = json.load(fh)
            except (OSError, json.JSONDecodeError) as exc:
                raise CheckpointError(f"{cfg_path}: unreadable JSON ({exc})") from None
        self.chat_template = self._find_template(directory)
        self.special_ids = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        self.eos_token = self._token_text(self.config.get("eos_token"))
        self.bos_token = self._token_text(self.config.get("bos_token"))
        self.eos_token_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        self._template = None

    @staticmethod
    def _token_text(value):
        return value.get("content") if isinstance(value, dict) else value

    def _find_template(self, directory: str) -> str | None:
        jinja = os.path.join(directory, "chat_template.jinja")
        if os.path.exists(jinja):
            with open(jinja, encoding="utf-8") as fh:
                return fh.read()
        template = self.config.get("chat_template")
        if isinstance(template, list):  # named templates: take "default"
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return template

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def to_json(self) -> str:
        """The tokenizer as `tokenizer.json` text (for the grammar library's vocabulary table)."""
        return self._tok.to_str()

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str:
        return self.decode([token_id], skip_special_tokens=False)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """The prompt text of `messages`; `tools` (OpenAI function definitions) and tool calls / results in
        the history go to the checkpoint's template, or to Qwen2.5's format when that template lacks tools."""
        if not kwargs.get("tools"):
            kwargs.pop("tools", None)
        uses_tools = "tools" in kwargs or any(m.get("tool_calls") or m.get("role") == "tool" for m in messages)
        if uses_tools and not template_renders_tools(self.chat_template):
            return render_qwen(messages, kwargs.get("tools"), add_generation_prompt,
                               bool(kwargs.get("continue_final_message")))
        if not self.chat_template:
            raise ValueError("this model has no chat template (tokenizer_config.json / chat_template.jinja); "
                             "use the completions API")
        if self._template is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise ValueError(f"chat template: {message}")

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
                x, indent=indent, ensure_ascii=ensure_ascii)
            env.globals["raise_exception"] = raise_exception
            self._template = env.from_string(self.chat_template)
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs)


class IncrementalDetokenizer:
    """Decodes a growing token list a window at a time, and owns the stop strings of one choice.

    `add` returns raw new text, held back while it ends in a partial UTF-8 character (the decoder's
    replacement character), so no delta ever splits one. `step` builds on it for the engine: it also
    holds back the last `max(len(stop)) - 1` characters, which could be the start of a stop string,
    and cuts the output at the first stop string found.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True, stop: Sequence[str] = (),
                 include_stop_str_in_output: bool = False):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0    # start of the decode window (context for the tokenizer)
        self.read_offset = 0      # tokens up to here have been decoded into text
        self.stop = tuple(stop)
        self.include_stop_str_in_output = include_stop_str_in_output
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.pending = ""         # decoded text not yet returned by `step` (at most `hold` characters)

    def add(self, token_ids: Sequence[int]) -> str:
        self.ids.extend(token_ids)
        prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset], skip_special_tokens=self.skip)
        text = self.tok.decode(self.ids[self.prefix_offset:], skip_special_tokens=self.skip)
        if text.endswith(REPLACEMENT) or len(text) < len(prefix):
            return ""
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        return text[len(prefix):]

    def step(self, token_ids: Sequence[int], *, final: bool = False) -> tuple[str, str | None]:
        """Decode `token_ids` (empty for a token that adds no text); returns (text to emit, stop string).

        A stop string found in the not yet emitted text ends the output there (keeping the stop string
        when `include_stop_str_in_output`) and is returned. `final` means the choice ends for another
        reason (length, end of sequence): everything held back is returned without a stop search.
        """
        self.pending += self.add(token_ids) if token_ids else ""
        if not final and self.stop:
            hits = [(self.pending.find(s), s) for s in self.stop]
            hits = [(i, s) for i, s in hits if i >= 0]
            if hits:
                index, stop = min(hits)
                text = self.pending[:index + (len(stop) if self.include_stop_str_in_output else 0)]
                self.pending = ""
                return text, stop
        cut = len(self.pending) if final else max(0, len(self.pending) - self.hold)
        text, self.pending = self.pending[:cut], self.pending[cut:]
        return text, None
