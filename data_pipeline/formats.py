"""Record formats -> one normalised `Conversation` (or `TextDocument` for continued pretraining).

Supported record shapes (format=auto looks at the first record of a source):
  alpaca    {"instruction", "input"?, "output", "system"?, "history"?: [[q, a], ...]}
  sharegpt  {"conversations" | "messages": [{"from": human|gpt|system|function_call|observation,
             "value"}] (also role/content keys and user/assistant/tool roles), "system"?, "tools"?}
  messages  OpenAI chat: {"messages": [{"role", "content", "tool_calls"?}], "tools"?}; role=tool
            carries a tool result.
  text      {text_field: "..."} or one line of a .txt file.

Parsers raise FieldError / ConversationError with the offending field path
(e.g. "conversations[3].from"); the caller adds file and line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

from data_pipeline.errors import ConversationError, DataError, FieldError

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


# ----------------------------------------------------------------------------- field helpers

def _field(record: dict, key: str, path: str, *, required: bool = True, kind: type = str) -> Any:
    if not isinstance(record, dict):
        raise FieldError(f"expected a JSON object, got {type(record).__name__}", field=path or "<record>",
                         reason="bad_type")
    value = record.get(key)
    where = f"{path}.{key}" if path else key
    if value is None:
        if required:
            raise FieldError(f"required field {where!r} is missing", field=where, reason="missing_field")
        return None
    if not isinstance(value, kind):
        raise FieldError(f"expected {kind.__name__}, got {type(value).__name__}", field=where, reason="bad_type")
    return value


def _text_content(value: Any, where: str) -> str:
    """Content may be a string or OpenAI-style parts [{"type": "text", "text": ...}]; None means empty."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)
    raise FieldError(f"expected a string, got {type(value).__name__}", field=where, reason="bad_type")


def _parse_tools(value: Any, where: str) -> Optional[list]:
    """`tools` is a JSON list or a string holding one (glaive style); empty means no tools."""
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise FieldError(f"tools is not valid JSON: {e.msg}", field=where, reason="bad_type") from None
    if not isinstance(value, list):
        raise FieldError(f"expected a list of tool schemas, got {type(value).__name__}", field=where,
                         reason="bad_type")
    return value or None


def _parse_tool_call(value: Any, where: str) -> ToolCall:
    if isinstance(value, dict) and isinstance(value.get("function"), dict):
        value = value["function"]  # OpenAI {"type": "function", "function": {...}}
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        raise FieldError("a tool call needs a string 'name'", field=where, reason="bad_type")
    args = value.get("arguments", {})
    if not isinstance(args, (dict, str)):
        raise FieldError("tool call 'arguments' must be an object or a JSON string", field=f"{where}.arguments",
                         reason="bad_type")
    return ToolCall(value["name"], args)


def _parse_function_call_text(text: str, where: str) -> list[ToolCall]:
    """ShareGPT function_call turns hold JSON text: one call object or a list of them."""
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as e:
        raise FieldError(f"function_call value is not valid JSON: {e.msg}", field=where, reason="bad_type") from None
    calls = parsed if isinstance(parsed, list) else [parsed]
    if not calls:
        raise FieldError("function_call holds no call", field=where, reason="bad_type")
    return [_parse_tool_call(c, where) for c in calls]


# ----------------------------------------------------------------------------- validation

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


# ----------------------------------------------------------------------------- parsers

def parse_alpaca(record: dict, text_field: str = "text") -> Conversation:
    instruction = _field(record, "instruction", "")
    extra = _field(record, "input", "", required=False) or ""
    output = _field(record, "output", "")
    system = _field(record, "system", "", required=False) or None
    history = _field(record, "history", "", required=False, kind=list) or []
    messages: list[Message] = []
    for i, pair in enumerate(history):
        where = f"history[{i}]"
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise FieldError("each history item must be a [question, answer] pair of strings", field=where,
                             reason="bad_type")
        messages += [Message("user", pair[0]), Message("assistant", pair[1])]
    if not output.strip():
        raise ConversationError("empty assistant response", field="output", reason="empty_response")
    prompt = f"{instruction}\n{extra}" if extra else instruction
    messages += [Message("user", prompt), Message("assistant", output)]
    # Only history turns can break the grammar now; message 2i/2i+1 is history[i].
    return validate_conversation(Conversation(messages, system), "history")


_SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "bot": "assistant", "model": "assistant",
    "function_call": "function_call",
    "observation": "tool", "tool": "tool", "function": "tool",
    "system": "system",
}


def parse_sharegpt(record: dict, text_field: str = "text") -> Conversation:
    key = "conversations" if "conversations" in record else "messages"
    turns = _field(record, key, "", kind=list)
    system = _field(record, "system", "", required=False) or None
    tools = _parse_tools(record.get("tools"), "tools")
    messages: list[Message] = []
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]"
        role_key, value_key = ("from", "value") if isinstance(turn, dict) and "from" in turn else ("role", "content")
        role = _field(turn, role_key, where)
        content = _text_content(turn.get(value_key), f"{where}.{value_key}")
        mapped = _SHAREGPT_ROLES.get(role)
        if mapped is None:
            raise ConversationError(f"unknown role {role!r}", field=f"{where}.{role_key}", reason="unknown_role")
        if mapped == "system":
            if i != 0:
                raise ConversationError("system turn is only allowed first", field=where, reason="bad_turn_order")
            system = content
        elif mapped == "function_call":
            messages.append(Message("assistant", "", _parse_function_call_text(content, f"{where}.{value_key}")))
        else:
            messages.append(Message(mapped, content))
    return validate_conversation(Conversation(messages, system, tools), key)


def parse_messages(record: dict, text_field: str = "text") -> Conversation:
    turns = _field(record, "messages", "", kind=list)
    tools = _parse_tools(record.get("tools"), "tools")
    system: Optional[str] = None
    messages: list[Message] = []
    for i, turn in enumerate(turns):
        where = f"messages[{i}]"
        role = _field(turn, "role", where)
        content = _text_content(turn.get("content"), f"{where}.content")
        if role in ("system", "developer"):
            if messages or system is not None:
                raise ConversationError("system message is only allowed first", field=where, reason="bad_turn_order")
            system = content
            continue
        if role not in ROLES:
            raise ConversationError(f"unknown role {role!r}", field=f"{where}.role", reason="unknown_role")
        raw_calls = turn.get("tool_calls")
        calls = None
        if raw_calls:
            if role != "assistant" or not isinstance(raw_calls, list):
                raise FieldError("tool_calls must be a list on an assistant message", field=f"{where}.tool_calls",
                                 reason="bad_type")
            calls = [_parse_tool_call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(raw_calls)]
        messages.append(Message(role, content, calls))
    return validate_conversation(Conversation(messages, system, tools), "messages")


def parse_text(record: Union[dict, str], text_field: str = "text") -> TextDocument:
    text = record if isinstance(record, str) else _field(record, text_field, "")
    if not text.strip():
        raise FieldError("empty document", field=text_field, reason="empty_response")
    return TextDocument(text)


PARSERS: dict[str, Callable[[Any, str], Sample]] = {
    "alpaca": parse_alpaca,
    "sharegpt": parse_sharegpt,
    "messages": parse_messages,
    "text": parse_text,
}


def detect_format(record: Any, text_field: str = "text") -> str:
    """Guess the format from one record; raises FieldError naming the keys it saw."""
    if isinstance(record, str):
        return "text"
    if isinstance(record, dict):
        if "instruction" in record and "output" in record:
            return "alpaca"
        if "conversations" in record:
            return "sharegpt"
        turns = record.get("messages")
        if isinstance(turns, list) and turns and isinstance(turns[0], dict):
            return "sharegpt" if "from" in turns[0] else "messages"
        if text_field in record:
            return "text"
        keys = sorted(record)[:8]
    else:
        keys = [type(record).__name__]
    raise FieldError(f"cannot detect the record format from keys {keys}; set the source's format",
                     field="<record>", reason="unknown_format")


def parse_record(record: Any, fmt: str, text_field: str = "text") -> Sample:
    """Parse one raw record of a known format (not 'auto')."""
    try:
        parser = PARSERS[fmt]
    except KeyError:
        raise DataError(f"unknown format {fmt!r}; expected one of {sorted(PARSERS)}", reason="unknown_format") from None
    if fmt != "text" and not isinstance(record, dict):
        raise FieldError(f"expected a JSON object, got {type(record).__name__}", field="<record>", reason="bad_type")
    return parser(record, text_field)
