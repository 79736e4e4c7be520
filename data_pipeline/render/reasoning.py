"""Reasoning (thinking) in assistant turns: where it is, whether the template kept it, and the
declared choice for templates that drop the reasoning of earlier turns.

Data gives reasoning either apart (`Message.reasoning`, from `reasoning_content`) or inline, as
`<think>...</think>` at the head of the content; split_inline_think reads the inline form the
way Qwen3-style templates do. Templates decide how reasoning renders; some (Qwen3, DeepSeek-R1)
render it only for the turns after the last user message, as at inference time, where earlier
answers come back without their thinking. `data.reasoning_turns` declares what to do then:

  template    train reasoning only where the template keeps it (default: matches inference); the
              dropped ones are counted (`reasoning_dropped_by_template`) and reported;
  every_turn  one sample per assistant turn, rendered as the last turn of the conversation up to
              it, so that every turn's reasoning trains (each sample trains its last turn only);
              counted as `reasoning_split_samples`.

Every reasoning turn is counted either as rendered inside its trained span or as dropped.
"""

from __future__ import annotations

from typing import Optional

from data_pipeline.ingest.conversation import Conversation, Message
from data_pipeline.render.rendering import ChatTemplate, Rendered

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
REASONING_TURNS = ("template", "every_turn")


def split_inline_think(content: str) -> tuple[Optional[str], str]:
    """(reasoning, answer) of content holding `<think>...</think>`; (None, content) otherwise.
    Same reading as Qwen3's template: the reasoning is the text before the first `</think>` (after
    its `<think>`), the answer the text after the last one."""
    if THINK_CLOSE not in content:
        return None, content
    pieces = content.split(THINK_CLOSE)
    return pieces[0].rstrip("\n").split(THINK_OPEN)[-1].lstrip("\n"), pieces[-1].lstrip("\n")


def turn_reasoning(message: Message) -> Optional[str]:
    """The reasoning of an assistant turn, from its field or inline in its content; None if none."""
    if message.role != "assistant":
        return None
    if message.reasoning is not None:
        return message.reasoning
    return split_inline_think(message.content)[0]


def count_reasoning(conv: Conversation, rendered: Rendered) -> int:
    """Count the reasoning turns of conv as rendered inside their trained span or dropped by the
    template (rendered.counts); returns how many were dropped."""
    assistant = [m for m in conv.messages if m.role == "assistant"]
    dropped = 0
    for message, (start, end) in zip(assistant, rendered.assistant_spans):
        reasoning = turn_reasoning(message)
        if reasoning is None or not reasoning.strip():
            continue
        rendered.counts["reasoning_turns"] += 1
        if reasoning.strip() in rendered.text[start:end]:
            rendered.counts["reasoning_rendered"] += 1
        else:
            rendered.counts["reasoning_dropped_by_template"] += 1
            dropped += 1
    return dropped


def render_samples(template: ChatTemplate, conv: Conversation, reasoning_turns: str) -> list[Rendered]:
    """The samples one conversation trains as (one, or one per assistant turn under every_turn
    when the template drops some turn's reasoning)."""
    rendered = template.render(conv)
    if not count_reasoning(conv, rendered) or reasoning_turns != "every_turn":
        return [rendered]
    samples = []
    for k, message in enumerate(conv.messages):
        if message.role != "assistant":
            continue
        prefix = Conversation(conv.messages[:k + 1], conv.system, conv.tools)
        sample = template.render(prefix)
        sample.assistant_spans = sample.assistant_spans[-1:]  # earlier turns train in their own sample
        count_reasoning(Conversation([message]), sample)  # its one span is this turn's
        sample.counts["reasoning_split_samples"] += 1
        samples.append(sample)
    return samples
