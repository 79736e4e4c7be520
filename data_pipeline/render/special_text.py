"""Data that spells a special token (e.g. a user writing "<|im_end|>\\n<|im_start|>assistant\\n")
is tokenized as plain text, never as the special token: otherwise a record could forge turns,
and the loss mask (derived from the template's own turns) would no longer describe the tokens.

How: before rendering, every special-token string inside the data (system, message contents,
tool-call names and arguments, tool schemas) is replaced by one private-use placeholder character
per special token; the template renders the escaped conversation (so template logic never sees
the forged markers), then the placeholders are restored and their character ranges are reported
as `Rendered.literal_spans`. Tokenization then splits the text only at the template's own special
tokens and encodes the pieces between them with special-token matching off (encode_guarded).
A conversation whose data already holds a placeholder character is rejected (counted), and for
templates whose output could depend on the escaping, the restored text must equal a clean render.
Conversations without any special-token string (nearly all) take none of these steps.
"""

from __future__ import annotations

import bisect
import re
from typing import Any, Callable, Optional, Sequence

from data_pipeline.ingest.conversation import Conversation, Message, ToolCall
from data_pipeline.errors import SampleRejected, TemplateError
from data_pipeline.render.rendering import ChatTemplate, Rendered

PLACEHOLDER_BASE = 0xF0000
"""Placeholder of the k-th special token: chr(PLACEHOLDER_BASE + k) (Supplementary Private Use Area-A)."""
_PLACEHOLDER_RE = re.compile("[\U000F0000-\U000FFFFD]")


def _map_strings(value: Any, fn: Callable[[str], str]) -> Any:
    """`value` (JSON-like: dict, list, str, scalars) with fn applied to every string, keys included."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, dict):
        return {fn(k) if isinstance(k, str) else k: _map_strings(v, fn) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_strings(v, fn) for v in value]
    return value


def _strings(value: Any):
    """Every string inside a JSON-like value, keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def _conversation_strings(conv: Conversation):
    if conv.system is not None:
        yield conv.system
    for m in conv.messages:
        yield m.content
        if m.reasoning is not None:
            yield m.reasoning
        for c in m.tool_calls or ():
            yield c.name
            yield from _strings(c.arguments)
    yield from _strings(conv.tools)


def _conversation_map(conv: Conversation, fn: Callable[[str], str]) -> Conversation:
    def message(m: Message) -> Message:
        calls = ([ToolCall(fn(c.name), _map_strings(c.arguments, fn)) for c in m.tool_calls] if m.tool_calls
                 else m.tool_calls)
        return Message(m.role, fn(m.content), calls, None if m.reasoning is None else fn(m.reasoning))

    return Conversation([message(m) for m in conv.messages], None if conv.system is None else fn(conv.system),
                        _map_strings(conv.tools, fn))


class SpecialTextGuard:
    """Escapes special-token strings in a conversation's data and restores them after rendering."""

    def __init__(self, special_texts: Sequence[str]) -> None:
        self.special_texts = [t for t in dict.fromkeys(special_texts) if t]
        # Longest first: at one position the regex then matches like the tokenizer (leftmost-longest).
        ordered = sorted(self.special_texts, key=len, reverse=True)
        self.pattern = re.compile("|".join(re.escape(t) for t in ordered)) if ordered else None
        self._joinable = not any("\0" in t for t in self.special_texts)
        self._placeholder = {t: chr(PLACEHOLDER_BASE + k) for k, t in enumerate(self.special_texts)}
        self._original = {v: k for k, v in self._placeholder.items()}

    def needs_escape(self, conv: Conversation) -> bool:
        if self.pattern is None:
            return False
        if self._joinable:  # one search over all strings: no match can span the separator
            return self.pattern.search("\0".join(_conversation_strings(conv))) is not None
        return any(self.pattern.search(text) for text in _conversation_strings(conv))

    def escape(self, conv: Conversation) -> Conversation:
        def escape_text(text: str) -> str:
            if _PLACEHOLDER_RE.search(text):
                raise SampleRejected("the record contains private-use characters U+F0000..U+FFFFD, which are reserved "
                                     "to escape special-token text", reason="reserved_character")
            return self.pattern.sub(lambda m: self._placeholder[m.group()], text)

        return _conversation_map(conv, escape_text)

    def restore(self, rendered: Rendered) -> Rendered:
        """Placeholders back to their special-token text; spans moved accordingly; literal spans added."""
        pieces, literal, marks, growth = [], [], [], []
        cursor, grown = 0, 0
        for m in _PLACEHOLDER_RE.finditer(rendered.text):
            original = self._original.get(m.group())
            if original is None:
                raise TemplateError("the template produced a reserved private-use character", field="template")
            pieces.append(rendered.text[cursor:m.start()])
            pieces.append(original)
            start = m.start() + grown
            literal.append((start, start + len(original)))
            grown += len(original) - 1
            marks.append(m.start())
            growth.append(grown)
            cursor = m.end()
        pieces.append(rendered.text[cursor:])

        def moved(pos: int) -> int:
            k = bisect.bisect_left(marks, pos)  # placeholders strictly before pos
            return pos + (growth[k - 1] if k else 0)

        def moved_all(pairs):
            return None if pairs is None else [(moved(a), moved(b)) for a, b in pairs]

        find = rendered.find_exchanges
        return Rendered("".join(pieces), moved_all(rendered.assistant_spans), literal, moved_all(rendered.exchanges),
                        rendered.counts, None if find is None else (lambda: moved_all(find())))


class GuardedTemplate:
    """A chat template whose data cannot produce special tokens (see module docstring)."""

    def __init__(self, template: ChatTemplate, guard: SpecialTextGuard, verify: bool) -> None:
        self.inner = template
        self.name = template.name
        self.guard = guard
        self.verify = verify
        """Re-render the original conversation and require the same text (Jinja templates, whose
        logic may react to the placeholder characters)."""

    def render(self, conv: Conversation) -> Rendered:
        if not self.guard.needs_escape(conv):
            return self.inner.render(conv)
        rendered = self.guard.restore(self.inner.render(self.guard.escape(conv)))
        if self.verify and self.inner.render_text(conv) != rendered.text:
            raise TemplateError(f"template {self.name!r} renders this record differently once its special-token "
                                "text is escaped; its loss mask cannot be derived exactly", field="messages",
                                reason="special_text_unsupported")
        return rendered

    def render_text(self, conv: Conversation) -> str:
        return self.inner.render_text(conv)


def encode_guarded(tokenizer_plain, text: str, literal_spans: Sequence[tuple[int, int]],
                   guard: SpecialTextGuard, special_ids: dict[str, int]) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets of `text` where only the template's special tokens are
    special: the text is cut at those and every piece in between is encoded by `tokenizer_plain`
    (a tokenizers.Tokenizer with encode_special_tokens=True, i.e. no special-token matching)."""
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    literal_starts = {s for s, _ in literal_spans}

    def piece(start: int, end: int) -> None:
        if start < end:
            enc = tokenizer_plain.encode(text[start:end], add_special_tokens=False)
            ids.extend(enc.ids)
            offsets.extend((a + start, b + start) for a, b in enc.offsets)

    cursor = 0
    for m in guard.pattern.finditer(text) if guard.pattern is not None else ():
        if m.start() in literal_starts:
            continue
        piece(cursor, m.start())
        ids.append(special_ids[m.group()])
        offsets.append((m.start(), m.end()))
        cursor = m.end()
    piece(cursor, len(text))
    return ids, offsets


def special_token_ids(tokenizer_json_tokenizer, texts: Sequence[str]) -> dict[str, int]:
    """{special text: id} from a tokenizers.Tokenizer."""
    out = {}
    for t in texts:
        token_id: Optional[int] = tokenizer_json_tokenizer.token_to_id(t)
        if token_id is None:
            raise TemplateError(f"special token {t!r} has no id in the tokenizer", field="tokenizer")
        out[t] = token_id
    return out
