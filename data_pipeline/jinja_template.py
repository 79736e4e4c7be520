"""Jinja chat templates: exact response spans from one marked rendering, checked by one clean one.

What trains (see templates.py): for every assistant turn, the text from the end of the
generation prompt that opens the turn to the end of its end-of-turn marker.

Fast path (two renders per conversation, whatever the number of turns):
  1. render the conversation as is (the text that is tokenized);
  2. render it again with private-use sentinels around every assistant content and before every
     tool-call name; removing the sentinels must give exactly the clean text, else the template
     treated the marked content differently (trim, split on '</think>', emptiness tests, ...) and
     the sample falls back (below);
  3. per assistant turn the response starts right after the last generation prompt before its
     first sentinel and ends after the first end-of-turn marker after its last sentinel.
  The generation prompt is learnt once per template: render([user], True) minus render([user]).
Fallback (two renders per assistant turn, exact for any template that ignores sentinels badly):
  a = render(turns before k, add_generation_prompt=True)     # prompt up to the response
  b = render(turns up to and including k)
  the response starts where a and b first differ and ends after the last end-of-turn marker in b;
  the piece is then located in the full rendering. Templates that rewrite a turn beyond
  recognition raise TemplateError (the sample is skipped and counted, never silently mis-masked).

Rendering uses the same sandbox, filters and globals as transformers' apply_chat_template; the
sandbox's attribute-safety verdicts, a pure function of (type, attribute name), are memoised
because they are half the cost of rendering.
"""

from __future__ import annotations

import re
from typing import Any, Optional

from jinja2.sandbox import ImmutableSandboxedEnvironment

from data_pipeline.errors import TemplateError
from data_pipeline.formats import Conversation
from data_pipeline.templates import Rendered, conversation_to_dicts

SENTINEL_OPEN = "\ue000"
"""Private-use character placed before an assistant message's content in the marked render."""
SENTINEL_CLOSE = "\ue001"
"""Placed after the content."""
SENTINEL_CALL = "\ue002"
"""Placed before the name of each tool call of an assistant message."""
_SENTINEL_RE = re.compile("[\ue000-\ue002]")
_PROBE = [{"role": "user", "content": "probe"}]


class _MemoisedSandbox(ImmutableSandboxedEnvironment):
    """ImmutableSandboxedEnvironment whose is_safe_attribute verdicts are cached.

    The verdict depends only on the object's type and the attribute name (jinja2's
    is_internal_attribute and modifies_known_mutable test isinstance and the name), so caching it
    by (type, name) changes no decision."""

    _verdicts: dict = {}

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        key = (type(obj), attr)
        verdict = self._verdicts.get(key)
        if verdict is None:
            verdict = self._verdicts[key] = super().is_safe_attribute(obj, attr, value)
        return verdict


def compile_jinja(source: str):
    """Compile like transformers' apply_chat_template does (same sandbox, filters and globals),
    so that rendering here equals tokenizer.apply_chat_template(..., tokenize=False)."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    template = _compile_jinja_template(source)
    if type(template.environment) is not ImmutableSandboxedEnvironment:
        return template  # another sandbox than the one the cache was proven for: use it unchanged
    env = template.environment.overlay()  # shares filters/globals; private cache, extensions rebound
    env.__class__ = _MemoisedSandbox
    return env.from_string(source)


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


def _marked_messages(messages: list[dict]) -> tuple[list[dict], list[int]]:
    """Copies of the messages with sentinels in assistant turns; also the sentinels per turn."""
    marked, counts = [], []
    for m in messages:
        if m["role"] != "assistant":
            marked.append(m)
            continue
        m = dict(m)
        count = 0
        if m["content"]:
            m["content"] = SENTINEL_OPEN + m["content"] + SENTINEL_CLOSE
            count += 2
        if m.get("tool_calls"):
            m["tool_calls"] = [{**c, "function": {**c["function"], "name": SENTINEL_CALL + c["function"]["name"]}}
                               for c in m["tool_calls"]]
            count += len(m["tool_calls"])
        marked.append(m)
        counts.append(count)
    return marked, counts


class JinjaTemplate:
    """A Jinja chat template with exact response spans (see module docstring)."""

    def __init__(self, name: str, source: str, special_tokens: dict[str, str], end_of_turn: Optional[str]) -> None:
        if "add_generation_prompt" not in source:
            raise TemplateError(f"chat template {name!r} ignores add_generation_prompt, so the start of a response "
                                "cannot be located; choose a built-in template", field="template")
        self.name = name
        self.source = source
        self.end_of_turn = end_of_turn
        self._special = dict(special_tokens)
        self._compiled = compile_jinja(source)
        self.generation_prompt = self._learn_generation_prompt()
        self.fallbacks = 0
        """Conversations whose spans came from the incremental method (diagnostics, tests)."""

    def _render(self, messages: list[dict], tools: Optional[list], generation_prompt: bool) -> str:
        try:
            return self._compiled.render(messages=messages, tools=tools, add_generation_prompt=generation_prompt,
                                         **self._special)
        except Exception as e:  # jinja2 raises its own TemplateError / UndefinedError / TypeError from user code
            raise TemplateError(f"chat template {self.name!r} failed: {e}", field="template",
                                reason="template_error") from None

    def _learn_generation_prompt(self) -> Optional[str]:
        """The text add_generation_prompt appends, or None when it is not a plain suffix (then every
        conversation takes the incremental path)."""
        try:
            without, with_prompt = self._render(_PROBE, None, False), self._render(_PROBE, None, True)
        except TemplateError:
            return None
        if not with_prompt.startswith(without) or len(with_prompt) == len(without):
            return None
        return with_prompt[len(without):]

    def render_text(self, conv: Conversation) -> str:
        return self._render(conversation_to_dicts(conv), conv.tools, False)

    def render(self, conv: Conversation) -> Rendered:
        messages = conversation_to_dicts(conv)
        full = self._render(messages, conv.tools, False)
        spans = self._marked_spans(messages, conv.tools, full)
        if spans is None:
            self.fallbacks += 1
            spans = self._incremental_spans(messages, conv.tools, full)
        return Rendered(full, spans)

    # ------------------------------------------------------------------------- fast path

    def _marked_spans(self, messages: list[dict], tools: Optional[list], full: str) -> Optional[list[tuple[int, int]]]:
        """Spans from one sentinel render, or None when this conversation needs the fallback."""
        prompt, eot = self.generation_prompt, self.end_of_turn
        if not prompt or not eot:
            return None
        marked_messages, counts = _marked_messages(messages)
        marked = self._render(marked_messages, tools, False)
        positions = [m.start() for m in _SENTINEL_RE.finditer(marked)]
        if len(positions) != sum(counts) or _SENTINEL_RE.sub("", marked) != full:
            return None
        # The i-th sentinel sits at marked position p; in the clean text that is p - i.
        clean = [p - i for i, p in enumerate(positions)]
        spans: list[tuple[int, int]] = []
        cursor = used = 0
        for count in counts:
            if count == 0:
                return None  # an assistant turn with neither content nor tool calls
            first, last = clean[used], clean[used + count - 1]
            used += count
            head = full.rfind(prompt, cursor, first)
            tail = full.find(eot, last)
            if head < 0 or tail < 0:
                return None
            start, end = head + len(prompt), tail + len(eot)
            spans.append((start, end))
            cursor = end
        if any(b[0] < a[1] for a, b in zip(spans, spans[1:])):
            return None
        return spans

    # ------------------------------------------------------------------------- fallback

    def _trim_after_end_of_turn(self, piece: str) -> str:
        eot = self.end_of_turn
        if eot and eot in piece:
            cut = piece.rindex(eot) + len(eot)
            if not piece[cut:].strip():
                return piece[:cut]
        return piece

    def _incremental_spans(self, messages: list[dict], tools: Optional[list], full: str) -> list[tuple[int, int]]:
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
        return spans

    def incremental_render(self, conv: Conversation) -> Rendered:
        """The fallback method alone (the reference the fast path is tested against)."""
        messages = conversation_to_dicts(conv)
        full = self._render(messages, conv.tools, False)
        return Rendered(full, self._incremental_spans(messages, conv.tools, full))
