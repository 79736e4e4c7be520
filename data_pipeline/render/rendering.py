"""What every chat template produces, and the rule that decides which characters train.

The mask rule (docs/ARCHITECTURE.md, "What trains"): an assistant turn trains exactly the text the
model must generate after the generation prompt of that turn, through its end-of-turn marker.
The generation prompt of turn k is the rendering of the conversation before k with
`add_generation_prompt=True` and the same template arguments. Where the full rendering of turn k
extends that prompt, training starts right after it; where the template writes the turn
differently from its generation prompt (a thinking block that replaces the empty one a
non-thinking prompt ends with), training starts at the first character where the two differ, so
that template text the generation prompt already contains never trains, and text it does not
contain (a `<think>\\n` that a thinking-mode prompt leaves to the model) always does.

Built-in templates (builtin_templates.py) apply this rule piece by piece; Jinja templates
(jinja_template.py) derive the same spans from renders. Both return a `Rendered`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol

from data_pipeline.ingest.conversation import Conversation


@dataclass
class Rendered:
    """The text of one sample and the character spans [start, end) of each assistant response."""

    text: str
    assistant_spans: list[tuple[int, int]]
    literal_spans: list[tuple[int, int]] = field(default_factory=list)
    """Ranges that spell a special token but came from the data: tokenized as plain text."""
    exchanges: Optional[list[tuple[int, int]]] = None
    """(start, start of the user's content) of each exchange: a user turn and the turns answering
    it. The text before the first exchange (system prompt, tool definitions) is never truncated
    away. None until located (see exchange_bounds)."""
    counts: Counter = field(default_factory=Counter)
    """Per-sample counters for the manifest (reasoning turns kept, dropped by the template, ...)."""
    find_exchanges: Optional[Callable[[], Optional[list[tuple[int, int]]]]] = field(
        default=None, repr=False, compare=False)
    """Locates `exchanges` on demand (Jinja templates need one more render; only over-long
    samples ask)."""

    def exchange_bounds(self) -> Optional[list[tuple[int, int]]]:
        """`exchanges`, located now if needed; None when the template's turns cannot be located."""
        if self.exchanges is None and self.find_exchanges is not None:
            self.exchanges, self.find_exchanges = self.find_exchanges(), None
        return self.exchanges


class ChatTemplate(Protocol):
    name: str

    def render(self, conv: Conversation) -> Rendered: ...

    def render_text(self, conv: Conversation) -> str:
        """The rendered text alone (no spans)."""
        ...


def common_prefix_len(a: str, b: str) -> int:
    """Length of the longest common prefix of a and b."""
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
    """OpenAI-style message dicts, as HF chat templates expect them (reasoning as
    `reasoning_content`, the field Qwen3 and DeepSeek templates read)."""
    out: list[dict] = [{"role": "system", "content": conv.system}] if conv.system is not None else []
    for m in conv.messages:
        d: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.reasoning is not None:
            d["reasoning_content"] = m.reasoning
        if m.tool_calls:
            d["tool_calls"] = [{"type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                               for c in m.tool_calls]
        out.append(d)
    return out
