"""Chat templates: Conversation -> rendered text + the character spans that train.

A template renders a conversation to one string and reports, for every assistant turn, the
character span of what the model must learn to produce: the response text (including its tool
calls) followed by the template's end-of-turn marker. Everything else (system, user, tool
results, role headers, the newline after the end-of-turn marker, template-inserted text such as
an empty '<think>\\n\\n</think>\\n\\n' block) is a template/prompt token and never trains. The
masking module (masks.py) turns these spans into a per-token mask after tokenizing the whole
text once.

Built-in templates (chatml = qwen, llama3, chatglm, zh_plain) are exact by construction: they
are written as pieces whose positions are known. A Jinja template (the tokenizer's own, or a
file) is handled by incremental rendering: for the k-th assistant turn,
    a = render(turns before k, add_generation_prompt=True)     # prompt up to the response
    b = render(turns up to and including k)
the response starts where a and b first differ and ends after the last end-of-turn marker in b
(trailing whitespace after the marker belongs to the template). The piece is then located in the
full rendering: at the same offset when the template is prefix-stable, else searched from the
previous turn's end; templates that rewrite a turn beyond recognition raise TemplateError (the
sample is skipped and counted, never silently mis-masked).
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


class ChatTemplate(Protocol):
    name: str

    def render(self, conv: Conversation) -> Rendered: ...


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


# ----------------------------------------------------------------------------- Jinja templates

def _compile_jinja(source: str):
    """Compile like transformers' apply_chat_template does (same sandbox, filters and globals),
    so that rendering here equals tokenizer.apply_chat_template(..., tokenize=False)."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    return _compile_jinja_template(source)


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # binary search on the first differing character
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


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


class JinjaTemplate:
    """A Jinja chat template with exact response spans derived by incremental rendering."""

    def __init__(self, name: str, source: str, special_tokens: dict[str, str], end_of_turn: Optional[str]) -> None:
        if "add_generation_prompt" not in source:
            raise TemplateError(f"chat template {name!r} ignores add_generation_prompt, so the start of a response "
                                "cannot be located; choose a built-in template", field="template")
        self.name = name
        self.source = source
        self.end_of_turn = end_of_turn
        self._special = dict(special_tokens)
        self._compiled = _compile_jinja(source)

    def _render(self, messages: list[dict], tools: Optional[list], generation_prompt: bool) -> str:
        try:
            return self._compiled.render(messages=messages, tools=tools, add_generation_prompt=generation_prompt,
                                         **self._special)
        except Exception as e:  # jinja2 raises its own TemplateError / UndefinedError / TypeError from user code
            raise TemplateError(f"chat template {self.name!r} failed: {e}", field="template",
                                reason="template_error") from None

    def _trim_after_end_of_turn(self, piece: str) -> str:
        eot = self.end_of_turn
        if eot and eot in piece:
            cut = piece.rindex(eot) + len(eot)
            if not piece[cut:].strip():
                return piece[:cut]
        return piece

    def render(self, conv: Conversation) -> Rendered:
        messages = conversation_to_dicts(conv)
        tools = conv.tools
        full = self._render(messages, tools, False)
        spans: list[tuple[int, int]] = []
        cursor = 0
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = self._render(messages[:k], tools, True)
            upto = full if k == len(messages) - 1 else self._render(messages[: k + 1], tools, False)
            start = _common_prefix_len(prompt, upto)
            piece = self._trim_after_end_of_turn(upto[start:])
            if not piece:
                raise TemplateError(f"assistant turn {k} renders to nothing", field=f"messages[{k}]")
            if start >= cursor and full.startswith(upto[: start + len(piece)]):
                pos = start
            else:
                pos = full.find(piece, cursor)
                if pos < 0:
                    raise TemplateError(f"template {self.name!r} rewrites assistant turn {k} in the full conversation; "
                                        "its loss mask cannot be derived exactly", field=f"messages[{k}]")
            spans.append((pos, pos + len(piece)))
            cursor = pos + len(piece)
        return Rendered(full, spans)


# ----------------------------------------------------------------------------- selection

@dataclass(frozen=True)
class TemplateSpec:
    """Everything needed to rebuild a template in a worker process (picklable, tokenizer-free)."""

    name: str
    jinja_source: str = ""
    special_tokens: dict = field(default_factory=dict)
    eos_token: str = ""
    has_glm_prefix: bool = False

    def fingerprint(self) -> str:
        blob = json.dumps([self.name, self.jinja_source, self.eos_token, self.has_glm_prefix], ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def template_spec(name: str, tokenizer) -> TemplateSpec:
    """Resolve DataConfig.template against a tokenizer: auto = the tokenizer's own chat_template if
    it has one, else chatml; qwen = chatml; anything else not built in is a path to a Jinja file."""
    special = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
    eos = tokenizer.eos_token or ""
    vocab = tokenizer.get_vocab()
    glm = "[gMASK]" in vocab and "<sop>" in vocab
    if name == "auto":
        source = getattr(tokenizer, "chat_template", None)
        if isinstance(source, str) and source:
            return TemplateSpec("tokenizer", source, special, eos)
        name = "chatml"
    if name == "qwen":
        name = "chatml"
    if name in BUILTIN_NAMES:
        if name in ("chatglm", "zh_plain") and not eos:
            raise TemplateError(f"template {name!r} ends answers with the tokenizer's eos_token, and this tokenizer "
                                "has none", field="template")
        return TemplateSpec(name, "", special, eos, glm)
    path = Path(name)
    if not path.is_file():
        raise TemplateError(f"unknown template {name!r}: not one of auto, {', '.join(BUILTIN_NAMES)} and not a file",
                            field="template")
    return TemplateSpec(f"file:{path.name}", path.read_text(encoding="utf-8"), special, eos)


def build_template(spec: TemplateSpec) -> ChatTemplate:
    if spec.jinja_source:
        return JinjaTemplate(spec.name, spec.jinja_source, spec.special_tokens, spec.eos_token or None)
    factories = {
        "chatml": _chatml,
        "llama3": _llama3,
        "chatglm": lambda: _chatglm(spec.has_glm_prefix, spec.eos_token),
        "zh_plain": lambda: _zh_plain(spec.eos_token),
    }
    return factories[spec.name]()
