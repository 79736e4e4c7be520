"""Chat templates: Conversation -> rendered text + the character spans that train.

A template renders a conversation to one string and reports, for every assistant turn, the
character span of what the model must learn to produce: the response text (including its tool
calls) followed by the template's end-of-turn marker. Everything else (system, user, tool
results, role headers, the newline after the end-of-turn marker, template-inserted text such as
an empty '<think>\\n\\n</think>\\n\\n' block) is a template/prompt token and never trains. encoding.py
turns these spans into a per-token mask after tokenizing the whole text once.

Built-in templates (chatml = qwen, llama3, chatglm, zh_plain) are exact by construction: they
are written as pieces whose positions are known. Jinja templates (the tokenizer's own, or a file)
live in jinja_template.py, which derives the same spans from one marked and one clean rendering.
Text from the data that spells a special token is never a special token (special_text.py).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Protocol

from data_pipeline.errors import TemplateError
from data_pipeline.formats import Conversation, Message

BUILTIN_NAMES = ("chatml", "qwen", "llama3", "chatglm", "zh_plain")


@dataclass
class Rendered:
    """The text of one sample and the character spans [start, end) of each assistant response."""

    text: str
    assistant_spans: list[tuple[int, int]]
    literal_spans: list[tuple[int, int]] = field(default_factory=list)
    """Ranges that spell a special token but came from the data: tokenized as plain text."""


class ChatTemplate(Protocol):
    name: str

    def render(self, conv: Conversation) -> Rendered: ...

    def render_text(self, conv: Conversation) -> str:
        """The rendered text alone (no spans)."""
        ...


# ----------------------------------------------------------------------------- built-in templates

@dataclass(frozen=True)
class TurnFormat:
    """Text placed before and after a turn's content."""

    before: str
    after: str


@dataclass(frozen=True)
class BuiltinTemplate:
    """A template described by fixed pieces. The assistant turn is
    `assistant.before` + [trained: content + tool calls + end_of_turn] + `assistant.after`."""

    name: str
    prefix: str
    system: TurnFormat
    user: TurnFormat
    tool: TurnFormat
    assistant: TurnFormat
    end_of_turn: str
    tools_header: str
    tool_call: str = "<tool_call>\n{}\n</tool_call>"

    def _system_text(self, conv: Conversation) -> Optional[str]:
        if not conv.tools:
            return conv.system
        listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in conv.tools)
        tools_text = self.tools_header.format(listing)
        return f"{conv.system}\n\n{tools_text}" if conv.system else tools_text

    def _response(self, m: Message) -> str:
        calls = [self.tool_call.format(c.as_json_text()) for c in (m.tool_calls or [])]
        body = "\n".join(([m.content] if m.content else []) + calls)
        return body + self.end_of_turn

    def render(self, conv: Conversation) -> Rendered:
        parts: list[str] = [self.prefix]
        size = len(self.prefix)
        spans: list[tuple[int, int]] = []

        def put(text: str) -> None:
            nonlocal size
            parts.append(text)
            size += len(text)

        system = self._system_text(conv)
        if system is not None:
            put(self.system.before + system + self.system.after)
        for m in conv.messages:
            if m.role == "assistant":
                put(self.assistant.before)
                start = size
                put(self._response(m))
                spans.append((start, size))
                put(self.assistant.after)
            else:
                fmt = self.user if m.role == "user" else self.tool
                put(fmt.before + m.content + fmt.after)
        return Rendered("".join(parts), spans)

    def render_text(self, conv: Conversation) -> str:
        return self.render(conv).text


def _chatml() -> BuiltinTemplate:
    return BuiltinTemplate(
        name="chatml", prefix="",
        system=TurnFormat("<|im_start|>system\n", "<|im_end|>\n"),
        user=TurnFormat("<|im_start|>user\n", "<|im_end|>\n"),
        tool=TurnFormat("<|im_start|>user\n<tool_response>\n", "\n</tool_response><|im_end|>\n"),
        assistant=TurnFormat("<|im_start|>assistant\n", "\n"),
        end_of_turn="<|im_end|>",
        tools_header="# Tools\n\n<tools>\n{}\n</tools>",
    )


def _llama3() -> BuiltinTemplate:
    def header(role: str) -> str:
        return f"<|start_header_id|>{role}<|end_header_id|>\n\n"

    return BuiltinTemplate(
        name="llama3", prefix="<|begin_of_text|>",
        system=TurnFormat(header("system"), "<|eot_id|>"),
        user=TurnFormat(header("user"), "<|eot_id|>"),
        tool=TurnFormat(header("ipython"), "<|eot_id|>"),
        assistant=TurnFormat(header("assistant"), ""),
        end_of_turn="<|eot_id|>",
        tools_header="Available functions (JSON schemas):\n{}",
        tool_call="{}",
    )


def _chatglm(has_glm_prefix: bool, eos: str) -> BuiltinTemplate:
    # GLM-4 stops generation at the next role marker; like common SFT recipes we train the
    # tokenizer's eos as the explicit end of the answer instead.
    return BuiltinTemplate(
        name="chatglm", prefix="[gMASK]<sop>" if has_glm_prefix else "",
        system=TurnFormat("<|system|>\n", ""),
        user=TurnFormat("<|user|>\n", ""),
        tool=TurnFormat("<|observation|>\n", ""),
        assistant=TurnFormat("<|assistant|>\n", ""),
        end_of_turn=eos,
        tools_header="# 可用工具\n{}",
    )


def _zh_plain(eos: str) -> BuiltinTemplate:
    # Each prompt piece ends with a newline so that a byte-level BPE pre-tokenizer never merges
    # the last prompt character with the first response character.
    return BuiltinTemplate(
        name="zh_plain", prefix="",
        system=TurnFormat("", "\n\n"),
        user=TurnFormat("### 指令：\n", "\n\n"),
        tool=TurnFormat("### 工具结果：\n", "\n\n"),
        assistant=TurnFormat("### 回答：\n", "\n\n"),
        end_of_turn=eos,
        tools_header="### 可用工具：\n{}",
    )


# ----------------------------------------------------------------------------- Jinja helpers

def conversation_to_dicts(conv: Conversation) -> list[dict]:
    """OpenAI-style message dicts, as HF chat templates expect them."""
    out: list[dict] = [{"role": "system", "content": conv.system}] if conv.system is not None else []
    for m in conv.messages:
        d: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_calls:
            d["tool_calls"] = [{"type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                               for c in m.tool_calls]
        out.append(d)
    return out


# ----------------------------------------------------------------------------- selection

@dataclass(frozen=True)
class TemplateSpec:
    """Everything needed to rebuild a template in a worker process (picklable, tokenizer-free)."""

    name: str
    jinja_source: str = ""
    special_tokens: dict = field(default_factory=dict)
    eos_token: str = ""
    has_glm_prefix: bool = False
    special_texts: tuple = ()
    """Texts of the tokenizer's special tokens: in the data they are escaped (special_text.py).
    Not part of the fingerprint: the tokenizer fingerprint already covers them."""

    def fingerprint(self) -> str:
        blob = json.dumps([self.name, self.jinja_source, self.eos_token, self.has_glm_prefix], ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def template_spec(name: str, tokenizer) -> TemplateSpec:
    """Resolve DataConfig.template against a tokenizer: auto = the tokenizer's own chat_template if
    it has one, else chatml; qwen = chatml; anything else not built in is a path to a Jinja file."""
    special = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
    special_texts = tuple(sorted(t.content for t in tokenizer.added_tokens_decoder.values() if t.special))
    eos = tokenizer.eos_token or ""
    vocab = tokenizer.get_vocab()
    glm = "[gMASK]" in vocab and "<sop>" in vocab
    if name == "auto":
        source = getattr(tokenizer, "chat_template", None)
        if isinstance(source, str) and source:
            return TemplateSpec("tokenizer", source, special, eos, special_texts=special_texts)
        name = "chatml"
    if name == "qwen":
        name = "chatml"
    if name in BUILTIN_NAMES:
        if name in ("chatglm", "zh_plain") and not eos:
            raise TemplateError(f"template {name!r} ends answers with the tokenizer's eos_token, and this tokenizer "
                                "has none", field="template")
        return TemplateSpec(name, "", special, eos, glm, special_texts)
    path = Path(name)
    if not path.is_file():
        raise TemplateError(f"unknown template {name!r}: not one of auto, {', '.join(BUILTIN_NAMES)} and not a file",
                            field="template")
    return TemplateSpec(f"file:{path.name}", path.read_text(encoding="utf-8"), special, eos,
                        special_texts=special_texts)


def build_template(spec: TemplateSpec) -> ChatTemplate:
    """The template of `spec`, guarded so that data never produces special tokens."""
    from data_pipeline.special_text import GuardedTemplate, SpecialTextGuard  # both import this module

    template = _unguarded_template(spec)
    if not spec.special_texts:
        return template
    return GuardedTemplate(template, SpecialTextGuard(spec.special_texts), verify=bool(spec.jinja_source))


def _unguarded_template(spec: TemplateSpec) -> ChatTemplate:
    if spec.jinja_source:
        from data_pipeline.jinja_template import JinjaTemplate  # imports this module: deferred

        return JinjaTemplate(spec.name, spec.jinja_source, spec.special_tokens, spec.eos_token or None)
    factories = {
        "chatml": _chatml,
        "llama3": _llama3,
        "chatglm": lambda: _chatglm(spec.has_glm_prefix, spec.eos_token),
        "zh_plain": lambda: _zh_plain(spec.eos_token),
    }
    return factories[spec.name]()
