"""Record formats -> one normalised `Conversation` (or `TextDocument` for continued pretraining).

Supported record shapes (format=auto looks at the first record of a source):
  alpaca    {"instruction", "input"?, "output", "system"?, "history"?: [[q, a], ...]}
  sharegpt  {"conversations" | "messages": [{"from": human|gpt|system|function_call|observation,
             "value"}] (also role/content keys and user/assistant/tool roles), "system"?, "tools"?}
  messages  OpenAI chat: {"messages": [{"role", "content", "tool_calls"?}], "tools"?}; role=tool
            carries a tool result.
  text      {text_field: "..."} or one line of a .txt file.
  chosen    preference data trained on its chosen answers: chosen/rejected pairs (alpaca-style
            instruction/input, a `prompt` string or message list, or ShareGPT conversations plus a
            chosen turn), or KTO-style records with a boolean `label` (label false never trains).

Reasoning (distilled R1/Qwen3-style data) is kept per assistant turn in `Message.reasoning`, read
from `reasoning_content` (also spelt `reasoning`, `thinking`) on messages and ShareGPT turns, and
from the same fields (plus `think`) of alpaca records. `<think>...</think>` written inside the
content stays in the content: templates decide how to render either form (templates.py).

Records that are not SFT conversations (preference pairs, KTO labels) are refused by the plain
formats with a message that says what they are and which format trains them.

Parsers raise FieldError / ConversationError with the offending field path
(e.g. "conversations[3].from"); the caller adds file and line.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

from data_pipeline.ingest.conversation import (ROLES, Conversation, Message, Sample, TextDocument, ToolCall,
                                        validate_conversation)
from data_pipeline.errors import ConversationError, DataError, FieldError, SampleExcluded
from data_pipeline.ingest.record_fields import (ALPACA_REASONING_KEYS, REASONING_KEYS, field_value,
                                         parse_function_call_text, parse_tool_call, parse_tools, reasoning_field,
                                         refuse_non_sft, required_content, text_content)

__all__ = ["ROLES", "Conversation", "Message", "Sample", "TextDocument", "ToolCall", "detect_format",
           "parse_record", "validate_conversation"]


# ----------------------------------------------------------------------------- parsers

def parse_alpaca(record: dict, text_field: str = "text") -> Conversation:
    refuse_non_sft(record)
    instruction = field_value(record, "instruction", "")
    extra = field_value(record, "input", "", required=False) or ""
    output = field_value(record, "output", "")
    system = field_value(record, "system", "", required=False) or None
    history = field_value(record, "history", "", required=False, kind=list) or []
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
    messages += [Message("user", prompt), Message("assistant", output, None,
                                                  reasoning_field(record, ALPACA_REASONING_KEYS, ""))]
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
    refuse_non_sft(record)
    key = "conversations" if "conversations" in record else "messages"
    turns = field_value(record, key, "", kind=list)
    system = field_value(record, "system", "", required=False) or None
    tools = parse_tools(record.get("tools"), "tools")
    # ShareGPT spells turns {from, value}; some files use {role, content}: one spelling per record,
    # so that a missing key is reported under the name the file uses.
    spelling = ("role", "content") if turns and all(isinstance(t, dict) and "from" not in t and "role" in t
                                                    for t in turns) else ("from", "value")
    role_key, value_key = spelling
    messages: list[Message] = []
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]"
        role = field_value(turn, role_key, where)
        mapped = _SHAREGPT_ROLES.get(role)
        if mapped is None:
            raise ConversationError(f"unknown role {role[:40]!r}", field=f"{where}.{role_key}", reason="unknown_role")
        if mapped == "assistant":
            content = text_content(turn.get(value_key), f"{where}.{value_key}")
        else:
            content = required_content(turn, value_key, where)
        if mapped == "system":
            if i != 0:
                raise ConversationError("system turn is only allowed first", field=where, reason="bad_turn_order")
            system = content
        elif mapped == "function_call":
            messages.append(Message("assistant", "", parse_function_call_text(content, f"{where}.{value_key}")))
        elif mapped == "assistant":
            messages.append(Message("assistant", content, None, reasoning_field(turn, REASONING_KEYS, where)))
        else:
            messages.append(Message(mapped, content))
    return validate_conversation(Conversation(messages, system, tools), key)


def parse_messages(record: dict, text_field: str = "text") -> Conversation:
    refuse_non_sft(record)
    turns = field_value(record, "messages", "", kind=list)
    tools = parse_tools(record.get("tools"), "tools")
    system: Optional[str] = None
    messages: list[Message] = []
    for i, turn in enumerate(turns):
        where = f"messages[{i}]"
        role = field_value(turn, "role", where)
        if role in ("system", "developer"):
            if messages or system is not None:
                raise ConversationError("system message is only allowed first", field=where, reason="bad_turn_order")
            system = required_content(turn, "content", where)
            continue
        if role not in ROLES:
            raise ConversationError(f"unknown role {role[:40]!r}", field=f"{where}.role", reason="unknown_role")
        if role == "assistant":  # content may be null when the turn only calls tools
            content = text_content(turn.get("content"), f"{where}.content")
        else:
            content = required_content(turn, "content", where)
        raw_calls = turn.get("tool_calls")
        calls = None
        if raw_calls:
            if role != "assistant" or not isinstance(raw_calls, list):
                raise FieldError("tool_calls must be a list on an assistant message", field=f"{where}.tool_calls",
                                 reason="bad_type")
            calls = [parse_tool_call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(raw_calls)]
        reasoning = reasoning_field(turn, REASONING_KEYS, where) if role == "assistant" else None
        messages.append(Message(role, content, calls, reasoning))
    return validate_conversation(Conversation(messages, system, tools), "messages")


def parse_text(record: Union[dict, str], text_field: str = "text") -> TextDocument:
    text = record if isinstance(record, str) else field_value(record, text_field, "")
    if not text.strip():
        raise FieldError("empty document", field=text_field, reason="empty_response")
    return TextDocument(text)


def _turns(value: Any, where: str, role: str) -> list[dict]:
    """A prompt or an answer of a preference record as a list of turn dicts."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list) and all(isinstance(t, dict) for t in value):
        return list(value)
    raise FieldError(f"expected a string, a turn or a list of turns, got {type(value).__name__}", field=where,
                     reason="bad_type")


def _conversation_of_turns(record: dict, turns: list[dict], text_field: str) -> Conversation:
    sharegpt = any("from" in t for t in turns)
    rebuilt = {"conversations" if sharegpt else "messages": turns,
               **{k: record[k] for k in ("system", "tools") if k in record}}
    return parse_sharegpt(rebuilt, text_field) if sharegpt else parse_messages(rebuilt, text_field)


def parse_chosen(record: dict, text_field: str = "text") -> Conversation:
    """Preference data trained on its chosen answer; KTO records only where label is true."""
    if isinstance(record.get("label"), bool):
        if not record["label"]:
            raise SampleExcluded("label is false: an undesirable answer, never trained", field="label",
                                 reason="kto_label_false")
        plain = {k: v for k, v in record.items() if k != "label"}
        if "prompt" in plain and "completion" in plain:  # TRL's unpaired layout
            turns = _turns(plain["prompt"], "prompt", "user") + _turns(plain["completion"], "completion", "assistant")
            return _conversation_of_turns(plain, turns, text_field)
        return parse_record(plain, detect_format(plain, text_field), text_field)
    if "chosen" not in record:
        raise FieldError("format 'chosen' needs a 'chosen' answer (preference pairs) or a boolean 'label' (KTO)",
                         field="chosen", reason="missing_field")
    chosen = record["chosen"]
    if "instruction" in record:  # alpaca-style pair: instruction/input + chosen/rejected strings
        if not isinstance(chosen, str):
            raise FieldError(f"expected the chosen answer as a string, got {type(chosen).__name__}", field="chosen",
                             reason="bad_type")
        plain = {k: v for k, v in record.items() if k not in ("chosen", "rejected")}
        return parse_alpaca({**plain, "output": chosen}, text_field)
    answer = _turns(chosen, "chosen", "assistant")
    first = answer[0] if answer else {}
    if first.get("role", first.get("from")) in ("user", "human", "system"):
        return _conversation_of_turns(record, answer, text_field)  # chosen holds the whole conversation
    for key in ("conversations", "messages", "prompt"):
        if key in record:
            return _conversation_of_turns(record, _turns(record[key], key, "user") + answer, text_field)
    raise FieldError("a preference pair needs its prompt: 'instruction', 'prompt', 'conversations' or 'messages'",
                     field="prompt", reason="missing_field")


PARSERS: dict[str, Callable[[Any, str], Sample]] = {
    "alpaca": parse_alpaca,
    "sharegpt": parse_sharegpt,
    "messages": parse_messages,
    "text": parse_text,
    "chosen": parse_chosen,
}


def detect_format(record: Any, text_field: str = "text") -> str:
    """Guess the format from one record; raises FieldError naming the keys it saw."""
    if isinstance(record, str):
        return "text"
    if isinstance(record, dict):
        refuse_non_sft(record)
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
