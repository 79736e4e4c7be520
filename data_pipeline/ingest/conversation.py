"""The normalised sample every record format is parsed into, and the turn grammar it obeys.

A `Conversation` (system prompt, tools, user/assistant/tool messages) is what templates render; a
`TextDocument` is a plain document for continued pretraining. formats.py parses raw records into
these; validate_conversation enforces the grammar every template relies on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional, Union

from data_pipeline.errors import ConversationError

ROLES = ("user", "assistant", "tool")


@dataclass
class ToolCall:
    """One function call made by the assistant. `arguments` is a dict or the raw JSON string."""

    name: str
    arguments: Union[dict, str]

    def as_json_text(self) -> str:
        """The canonical text form used by built-in templates: {"name": ..., "arguments": ...}."""
        args = self.arguments if isinstance(self.arguments, str) else json.dumps(self.arguments, ensure_ascii=False)
        return '{"name": ' + json.dumps(self.name, ensure_ascii=False) + ', "arguments": ' + args + "}"


@dataclass
class Message:
    role: str
    """user, assistant or tool (system lives on the Conversation)."""
    content: str
    tool_calls: Optional[list[ToolCall]] = None
    reasoning: Optional[str] = None
    """The assistant's thinking before its answer (`reasoning_content`), when the data gives it
    apart from the content; None = not given."""


@dataclass
class Conversation:
    messages: list[Message]
    system: Optional[str] = None
    tools: Optional[list] = None


@dataclass
class TextDocument:
    """A plain document for continued pretraining: every token trains."""

    text: str


Sample = Union[Conversation, TextDocument]


def validate_conversation(conv: Conversation, field_prefix: str) -> Conversation:
    """Enforce the turn grammar every template relies on:

        user (assistant-with-tool-calls tool+)* assistant  [repeated], ending on an assistant turn.

    A tool result must follow an assistant turn that made tool calls (or another tool result);
    an assistant turn without tool calls must have non-blank content.
    """
    msgs = conv.messages
    if not msgs:
        raise ConversationError("conversation has no turns", field=field_prefix, reason="empty_conversation")
    previous = None
    for i, m in enumerate(msgs):
        where = f"{field_prefix}[{i}]"
        if m.role not in ROLES:
            raise ConversationError(f"unknown role {m.role!r}", field=where, reason="unknown_role")
        if m.role == "assistant" and not m.tool_calls and not m.content.strip():
            raise ConversationError("empty assistant response", field=where, reason="empty_response")
        allowed = _NEXT_ROLES[previous]
        if m.role not in allowed:
            after = previous or "the start"
            raise ConversationError(f"{m.role} turn after {after}; expected {' or '.join(allowed)}", field=where,
                                    reason="bad_turn_order")
        previous = "assistant_call" if (m.role == "assistant" and m.tool_calls) else m.role
    if previous != "assistant":
        raise ConversationError(f"conversation ends on a {msgs[-1].role} turn; the last turn must be the "
                                "assistant's answer", field=f"{field_prefix}[{len(msgs) - 1}]",
                                reason="ends_without_response")
    return conv


_NEXT_ROLES: dict[Optional[str], tuple[str, ...]] = {
    None: ("user",),
    "user": ("assistant",),
    "assistant": ("user",),
    "assistant_call": ("tool",),
    "tool": ("tool", "assistant"),
}
