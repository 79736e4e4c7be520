"""Reading fields of raw JSON records, with errors that name the field path.

Shared by the record parsers (formats.py): typed field access, content given as a string or as a
list of text parts, reasoning fields, tool schemas and tool calls, and the refusal of records that
are not SFT conversations. Every error is a FieldError whose `field` is the path inside the record
(e.g. "messages[3].content"); the caller adds file and line.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from data_pipeline.ingest.conversation import ToolCall
from data_pipeline.errors import FieldError


def field_value(record: dict, key: str, path: str, *, required: bool = True, kind: type = str) -> Any:
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


PART_TEXT_KEYS = ("text", "value", "content")
"""Where a content part keeps its text: OpenAI `text`, ShareGPT-style `value`, or `content`."""


def text_content(value: Any, where: str) -> str:
    """Content may be a string or a list of parts [{"type": "text", "text": ...}] (the text may also
    sit under `value` or `content`); None means empty. A non-text part (an image) is refused."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise FieldError(f"expected a string or a list of text parts, got {type(value).__name__}", field=where,
                         reason="bad_type")
    texts = []
    for i, part in enumerate(value):
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, dict):
            raise FieldError(f"a content part must be an object, got {type(part).__name__}", field=f"{where}[{i}]",
                             reason="bad_type")
        kind = part.get("type", "text")
        if kind != "text":
            raise FieldError(f"content part of type {str(kind)[:40]!r}: only text parts can be trained (this looks "
                             "like multimodal data)", field=f"{where}[{i}].type", reason="non_text_content")
        text = next((part[k] for k in PART_TEXT_KEYS if isinstance(part.get(k), str)), None)
        if text is None:
            raise FieldError(f"a text part needs a string under one of {list(PART_TEXT_KEYS)}; it has keys "
                             f"{sorted(map(str, part))[:8]}", field=f"{where}[{i}]", reason="missing_field")
        texts.append(text)
    return "".join(texts)


def required_content(turn: dict, key: str, where: str) -> str:
    """The content of a user, system or tool turn: the key must be there (a misspelt key would
    otherwise become an empty prompt)."""
    if key not in turn or turn[key] is None:
        seen = sorted(map(str, turn))[:8]
        raise FieldError(f"required field {where}.{key!r} is missing (the turn has keys {seen})",
                         field=f"{where}.{key}", reason="missing_field")
    return text_content(turn[key], f"{where}.{key}")


REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")
"""Turn fields that hold an assistant's reasoning (OpenAI/DeepSeek `reasoning_content` first)."""
ALPACA_REASONING_KEYS = REASONING_KEYS + ("think",)


def reasoning_field(record: dict, keys: tuple[str, ...], where: str) -> Optional[str]:
    """The first reasoning field present (string or text parts), or None. Two different non-empty
    reasoning fields on one turn are refused: which one trains would be a guess."""
    found = [(k, record[k]) for k in keys if record.get(k) is not None]
    if not found:
        return None
    texts = {k: text_content(v, f"{where}.{k}" if where else k) for k, v in found}
    distinct = {t for t in texts.values() if t.strip()}
    if len(distinct) > 1:
        raise FieldError(f"the turn has several different reasoning fields {sorted(texts)}; keep one",
                         field=f"{where}.{found[1][0]}" if where else found[1][0], reason="ambiguous_reasoning")
    return next(iter(distinct), "")


_CONVERSATION_KEYS = ("messages", "conversations", "instruction", "output", "prompt", "completion")


def refuse_non_sft(record: dict) -> None:
    """Preference pairs and KTO-labelled conversations are not SFT conversations: say what they
    are and which format trains them."""
    how = "set the source's format to 'chosen'"
    if "chosen" in record and "rejected" in record:
        raise FieldError(f"this record is a preference pair (chosen/rejected), not an SFT conversation; {how} to "
                         "train on its chosen answers", field="chosen", reason="preference_pair")
    if isinstance(record.get("label"), bool) and any(k in record for k in _CONVERSATION_KEYS):
        raise FieldError(f"this record carries a KTO-style boolean 'label' (desirable or not); {how} to train on "
                         "the records labelled true (label false never trains)", field="label", reason="kto_label")


def json_text(text: str, where: str, what: str) -> Any:
    """JSON written inside a string field (glaive-style tools, ShareGPT function calls)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise FieldError(f"{what} is not valid JSON: {e.msg}", field=where, reason="bad_type") from None
    except RecursionError:
        raise FieldError(f"{what} is JSON nested too deeply to read", field=where, reason="too_deep") from None


def parse_tools(value: Any, where: str) -> Optional[list]:
    """`tools` is a JSON list or a string holding one (glaive style); empty means no tools."""
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        value = json_text(value, where, "tools")
    if not isinstance(value, list):
        raise FieldError(f"expected a list of tool schemas, got {type(value).__name__}", field=where,
                         reason="bad_type")
    return value or None


def parse_tool_call(value: Any, where: str) -> ToolCall:
    if isinstance(value, dict) and isinstance(value.get("function"), dict):
        value = value["function"]  # OpenAI {"type": "function", "function": {...}}
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        raise FieldError("a tool call needs a string 'name'", field=where, reason="bad_type")
    args = value.get("arguments", {})
    if not isinstance(args, (dict, str)):
        raise FieldError("tool call 'arguments' must be an object or a JSON string", field=f"{where}.arguments",
                         reason="bad_type")
    return ToolCall(value["name"], args)


def parse_function_call_text(text: str, where: str) -> list[ToolCall]:
    """ShareGPT function_call turns hold JSON text: one call object or a list of them."""
    parsed = json_text(text, where, "function_call value")
    calls = parsed if isinstance(parsed, list) else [parsed]
    if not calls:
        raise FieldError("function_call holds no call", field=where, reason="bad_type")
    return [parse_tool_call(c, where) for c in calls]
