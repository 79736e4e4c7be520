"""Built-in chat templates, exact by construction: fixed pieces whose positions are known.

An assistant turn renders as `assistant.before` + body + `assistant.after`, where the body is the
turn's reasoning block (as the family writes it), its content, its tool calls and the
end-of-turn marker. The generation prompt is `assistant.before` + `generation_suffix`; by the
mask rule (rendering.py) the body trains from the first character where it departs from
`generation_suffix`: all of it when the suffix is empty (Qwen3 thinking mode: the model opens
`<think>` itself), none of a leading empty `<think>\\n\\n</think>\\n\\n` that a non-thinking prompt
already holds, and nothing of the `<think>\\n` that DeepSeek-R1's prompt pre-fills.

Families:
  chatml (= qwen, Qwen2.5), llama3, chatglm (GLM-4), zh_plain (指令/回答): no reasoning of their
      own; a reasoning field renders as a `<think>\\n...\\n</think>\\n\\n` block before the content
      (inline `<think>` in the content is left as written), in every turn.
  qwen3: reasoning from the field or parsed out of inline `<think>` content; rendered for the
      turns after the last user message only, the last turn always with a block (empty when it
      has no reasoning). `enable_thinking` (template_kwargs, default true) picks the prompt.
  deepseek-r1: like qwen3 for history; its generation prompt pre-fills `<think>\\n`.
Every marker a family writes must be one token of the tokenizer (checked when the template is
chosen): a missing `<|eot_id|>` would otherwise train as plain-text pieces.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Optional

from data_pipeline.ingest.conversation import Conversation, Message
from data_pipeline.render.reasoning import split_inline_think
from data_pipeline.render.rendering import Rendered, common_prefix_len

EMPTY_THINK = "<think>\n\n</think>\n\n"


@dataclass(frozen=True)
class TurnFormat:
    """Text placed before and after a turn's content."""

    before: str
    after: str


@dataclass(frozen=True)
class ReasoningStyle:
    """How a template family writes an assistant turn's reasoning."""

    reads_inline: bool = False
    """The family's own template parses `<think>...</think>` out of the content (Qwen3, R1)."""
    after_last_query_only: bool = False
    """Reasoning renders only for turns after the last user message (earlier answers come back
    without their thinking, as at inference time)."""
    block_on_last: bool = False
    """The last turn always carries a block, empty when it has no reasoning."""
    block_open: str = "<think>\n"
    block_close: str = "\n</think>\n\n"


PLAIN_FAMILY = ReasoningStyle()
THINKING_FAMILY = ReasoningStyle(reads_inline=True, after_last_query_only=True, block_on_last=True)


@dataclass(frozen=True)
class BuiltinTemplate:
    """A template described by fixed pieces (see the module docstring)."""

    name: str
    prefix: str
    system: TurnFormat
    user: TurnFormat
    tool: TurnFormat
    assistant: TurnFormat
    end_of_turn: str
    tools_header: str
    markers: tuple[str, ...]
    """Special tokens the pieces write; each must be one token of the tokenizer."""
    tool_call: str = "<tool_call>\n{}\n</tool_call>"
    reasoning: ReasoningStyle = PLAIN_FAMILY
    generation_suffix: str = ""
    """What the generation prompt adds after `assistant.before` (e.g. an empty think block)."""

    @property
    def generation_prompt(self) -> str:
        return self.assistant.before + self.generation_suffix

    def _system_text(self, conv: Conversation) -> Optional[str]:
        if not conv.tools:
            return conv.system
        listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in conv.tools)
        tools_text = self.tools_header.format(listing)
        return f"{conv.system}\n\n{tools_text}" if conv.system else tools_text

    def _reasoning_block(self, m: Message, content: str, in_window: bool, is_last: bool) -> tuple[str, str]:
        """(block, content) of an assistant turn."""
        style = self.reasoning
        reasoning = m.reasoning
        if reasoning is None and style.reads_inline:
            reasoning, content = split_inline_think(content)
        if style.reads_inline:
            if in_window and (is_last or reasoning):
                return style.block_open + (reasoning or "").strip("\n") + style.block_close, content.lstrip("\n")
            return "", content
        if reasoning is not None and reasoning.strip():
            return style.block_open + reasoning.strip("\n") + style.block_close, content
        return "", content

    def _body(self, m: Message, in_window: bool, is_last: bool) -> str:
        block, content = self._reasoning_block(m, m.content, in_window, is_last)
        calls = [self.tool_call.format(c.as_json_text()) for c in (m.tool_calls or [])]
        return block + "\n".join(([content] if content else []) + calls) + self.end_of_turn

    def render(self, conv: Conversation) -> Rendered:
        parts: list[str] = [self.prefix]
        size = len(self.prefix)
        spans: list[tuple[int, int]] = []
        exchanges: list[tuple[int, int]] = []

        def put(text: str) -> None:
            nonlocal size
            parts.append(text)
            size += len(text)

        system = self._system_text(conv)
        if system is not None:
            put(self.system.before + system + self.system.after)
        users = [i for i, m in enumerate(conv.messages) if m.role == "user"]
        last_query = users[-1] if users else -1
        for i, m in enumerate(conv.messages):
            if m.role == "assistant":
                in_window = not self.reasoning.after_last_query_only or i > last_query
                put(self.assistant.before)
                body = self._body(m, in_window, i == len(conv.messages) - 1)
                start = size + common_prefix_len(self.generation_suffix, body)
                put(body)
                spans.append((start, size))
                put(self.assistant.after)
            else:
                if m.role == "user":
                    exchanges.append((size, size + len(self.user.before)))
                fmt = self.user if m.role == "user" else self.tool
                put(fmt.before + m.content + fmt.after)
        return Rendered("".join(parts), spans, exchanges=exchanges)

    def render_text(self, conv: Conversation) -> str:
        return self.render(conv).text


CHATML_MARKERS = ("<|im_start|>", "<|im_end|>")
QWEN_TOOLS_HEADER = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}}\n</tool_call>")


def chatml(kwargs: dict) -> BuiltinTemplate:
    return BuiltinTemplate(
        name="chatml", prefix="",
        system=TurnFormat("<|im_start|>system\n", "<|im_end|>\n"),
        user=TurnFormat("<|im_start|>user\n", "<|im_end|>\n"),
        tool=TurnFormat("<|im_start|>user\n<tool_response>\n", "\n</tool_response><|im_end|>\n"),
        assistant=TurnFormat("<|im_start|>assistant\n", "\n"),
        end_of_turn="<|im_end|>",
        tools_header="# Tools\n\n<tools>\n{}\n</tools>",
        markers=CHATML_MARKERS,
    )


def qwen3(kwargs: dict) -> BuiltinTemplate:
    """Qwen3 (hybrid thinking): ChatML pieces, Qwen's tool header, the thinking family's reasoning;
    enable_thinking true (default) leaves `<think>` to the model."""
    thinking = kwargs.get("enable_thinking", True)
    return dataclasses.replace(chatml({}), name="qwen3", tools_header=QWEN_TOOLS_HEADER, reasoning=THINKING_FAMILY,
                               generation_suffix="" if thinking else EMPTY_THINK)


def deepseek_r1(kwargs: dict) -> BuiltinTemplate:
    """DeepSeek-R1: the generation prompt pre-fills `<think>\\n`, so the model writes the rest of
    the block. Tool results and calls use the generic `<tool_call>` JSON form."""
    return BuiltinTemplate(
        name="deepseek-r1", prefix="<｜begin▁of▁sentence｜>",
        system=TurnFormat("", ""),
        user=TurnFormat("<｜User｜>", ""),
        tool=TurnFormat("<｜User｜><tool_response>\n", "\n</tool_response>"),
        assistant=TurnFormat("<｜Assistant｜>", ""),
        end_of_turn="<｜end▁of▁sentence｜>",
        tools_header="# Tools\n\n<tools>\n{}\n</tools>",
        markers=("<｜begin▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>"),
        reasoning=THINKING_FAMILY,
        generation_suffix="<think>\n",
    )


def llama3(kwargs: dict) -> BuiltinTemplate:
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
        markers=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        tool_call="{}",
    )


def chatglm(has_glm_prefix: bool, eos: str) -> BuiltinTemplate:
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
        markers=("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>", eos),
    )


def zh_plain(eos: str) -> BuiltinTemplate:
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
        markers=(eos,),
    )


TEMPLATE_KWARGS = {"qwen3": ("enable_thinking",)}
"""The template arguments each built-in template reads; any other is refused."""
