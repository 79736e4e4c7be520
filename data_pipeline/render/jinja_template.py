"""Jinja chat templates: exact response spans from one marked rendering, checked by one clean one.

What trains (the mask rule, rendering.py): for every assistant turn, the text after the turn's
generation prompt (rendered with the same template arguments) through its end-of-turn marker.

Fast path (two renders per conversation, whatever the number of turns):
  1. render the conversation as is (the text that is tokenized);
  2. render it again with private-use sentinels around every assistant content and before every
     tool-call name; removing the sentinels must give exactly the clean text, else the template
     treated the marked content differently (trim, split on '</think>', emptiness tests, ...) and
     the sample falls back (below);
  3. per assistant turn the response starts right after the last generation prompt before its
     first sentinel and ends after the first end-of-turn marker after its last sentinel.
  The generation prompt is learnt once per template: render([user], True) minus render([user]).
Fallback (one render per assistant turn: the mask rule of rendering.py as written):
  p = render(turns before k, add_generation_prompt=True)     # the turn's generation prompt
  the response starts where p and the full rendering first differ (so a thinking block that
  replaces the prompt's empty one trains from where they part) and ends after the next
  end-of-turn marker. Templates that render earlier turns differently once turn k is added raise
  TemplateError (the sample is skipped and counted, never silently mis-masked).

Rendering uses the same sandbox, filters and globals as transformers' apply_chat_template; the
sandbox's attribute-safety verdicts, a pure function of (type, attribute name), are memoised
because they are half the cost of rendering.
"""

from __future__ import annotations

import re
from typing import Any, Optional

from jinja2.sandbox import ImmutableSandboxedEnvironment

from data_pipeline.ingest.conversation import Conversation
from data_pipeline.errors import TemplateError
from data_pipeline.render.rendering import Rendered, common_prefix_len, conversation_to_dicts

SENTINEL_OPEN = "\ue000"
"""Private-use character placed before an assistant message's content in the marked render."""
SENTINEL_CLOSE = "\ue001"
"""Placed after the content."""
SENTINEL_CALL = "\ue002"
"""Placed before the name of each tool call of an assistant message."""
_SENTINEL_RE = re.compile("[\ue000-\ue002]")
SENTINEL_USER = "\ue003"
"""Placed before every user message's content to locate the exchanges (truncation only)."""
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

    def __init__(self, name: str, source: str, special_tokens: dict[str, str], end_of_turn: Optional[str],
                 kwargs: Optional[dict] = None) -> None:
        if "add_generation_prompt" not in source:
            raise TemplateError(f"chat template {name!r} ignores add_generation_prompt, so the start of a response "
                                "cannot be located; choose a built-in template", field="template")
        self.name = name
        self.source = source
        self.end_of_turn = end_of_turn
        self._special = dict(special_tokens)
        self._kwargs = dict(kwargs or {})
        """Template arguments (enable_thinking, ...): passed like apply_chat_template's extra kwargs."""
        self._compiled = compile_jinja(source)
        self.generation_prompt = self._learn_generation_prompt()
        self.fallbacks = 0
        """Conversations whose spans came from the incremental method (diagnostics, tests)."""

    def _render(self, messages: list[dict], tools: Optional[list], generation_prompt: bool) -> str:
        try:
            return self._compiled.render(messages=messages, tools=tools, add_generation_prompt=generation_prompt,
                                         **self._special, **self._kwargs)
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
        return Rendered(full, spans, find_exchanges=lambda: self._find_exchanges(messages, conv.tools, full, spans))

    # ------------------------------------------------------------------------- exchanges

    def _user_header(self) -> Optional[str]:
        """The text this template writes before a user message's content (after the previous
        turn's end-of-turn marker and whitespace), learnt from a one-message probe."""
        try:
            probe = self._render([{"role": "user", "content": SENTINEL_USER}], None, False)
        except TemplateError:
            return None
        if probe.count(SENTINEL_USER) != 1:
            return None
        before = probe[:probe.index(SENTINEL_USER)]
        eot = self.end_of_turn
        return (before[before.rindex(eot) + len(eot):] if eot and eot in before else before).lstrip()

    def _find_exchanges(self, messages: list[dict], tools: Optional[list], full: str,
                        spans: list[tuple[int, int]]) -> Optional[list[tuple[int, int]]]:
        """(start, content start) of each exchange, from one render with a sentinel before every
        user content: an exchange after the first starts at the first non-blank character after
        the previous answer's end-of-turn marker; the first one starts a user header earlier."""
        users = sum(m["role"] == "user" for m in messages)
        marked = [dict(m, content=SENTINEL_USER + (m["content"] or "")) if m["role"] == "user" else m for m in messages]
        text = self._render(marked, tools, False)
        positions = [p - i for i, p in enumerate(i for i, ch in enumerate(text) if ch == SENTINEL_USER)]
        if len(positions) != users or not users or text.replace(SENTINEL_USER, "") != full:
            return None
        starts = []
        for content in positions[1:]:
            previous_end = max((end for _, end in spans if end <= content), default=None)
            if previous_end is None:
                return None
            gap = full[previous_end:content]
            starts.append(previous_end + len(gap) - len(gap.lstrip()))
        header = full[starts[0]:positions[1]] if starts else self._user_header()
        if header is None or not full[:positions[0]].endswith(header):
            return None
        return [(positions[0] - len(header), positions[0])] + list(zip(starts, positions[1:]))

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
        """Spans by the definition: turn k trains `full` from where it departs from the turn's
        generation prompt through the next end-of-turn marker."""
        spans: list[tuple[int, int]] = []
        cursor = 0
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = self._render(messages[:k], tools, True)
            start = common_prefix_len(prompt, full)
            if start < cursor:
                raise TemplateError(f"template {self.name!r} renders the turns before assistant turn {k} differently "
                                    "once that turn is added; its loss mask cannot be derived exactly",
                                    field=f"messages[{k}]")
            if self.end_of_turn:
                tail = full.find(self.end_of_turn, start)
                end = tail + len(self.end_of_turn) if tail >= 0 else -1
            else:  # no end-of-turn marker known: the turn's own rendering says where it ends
                upto = full if k == len(messages) - 1 else self._render(messages[: k + 1], tools, False)
                end = start + len(self._trim_after_end_of_turn(upto[start:])) if full.startswith(upto) else -1
            if end <= start:
                raise TemplateError(f"template {self.name!r}: assistant turn {k} has no end in the full conversation; "
                                    "its loss mask cannot be derived exactly", field=f"messages[{k}]")
            spans.append((start, end))
            cursor = end
        return spans

    def incremental_render(self, conv: Conversation) -> Rendered:
        """The fallback method alone (the reference the fast path is tested against)."""
        messages = conversation_to_dicts(conv)
        full = self._render(messages, conv.tools, False)
        return Rendered(full, self._incremental_spans(messages, conv.tools, full))
