"""Truncation at whole messages: over generated multi-turn conversations (system prompt, tools),
every kept sample is the system prompt plus whole exchanges, or a declared cut of the last user
message; every trained span is a whole assistant message."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_pipeline.ingest.conversation import Conversation, Message, ToolCall
from data_pipeline.render.encoding import EncodeSettings, encode_conversation
from data_pipeline.errors import SampleRejected
from data_pipeline.render.templates import build_template, template_spec
from tests.data_pipeline.mask_check import assert_trained_text, trained_runs

TEXT = st.text(st.sampled_from(list("你好世界机器学习回答指令。，abcXYZ 019")), min_size=1, max_size=60)
HYPOTHESIS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def long_conversations(draw) -> Conversation:
    tools = [{"name": "lookup", "parameters": {"q": "string"}}] if draw(st.booleans()) else None
    messages: list[Message] = []
    for _ in range(draw(st.integers(1, 5))):
        messages.append(Message("user", draw(TEXT)))
        if tools and draw(st.booleans()):
            messages += [Message("assistant", "", [ToolCall("lookup", {"q": draw(TEXT)})]), Message("tool", draw(TEXT))]
        messages.append(Message("assistant", draw(TEXT)))
    return Conversation(messages, draw(st.one_of(st.none(), TEXT)), tools)


def encode(tokenizer, template_name, conv, seq_len, truncation="truncate_prompt"):
    rendered = build_template(template_spec(template_name, tokenizer)).render(conv)
    enc = tokenizer.backend_tokenizer.encode(rendered.text, add_special_tokens=False)
    ids, offsets = np.array(enc.ids), np.array(enc.offsets).reshape(-1, 2)
    return rendered, ids, offsets, lambda: encode_conversation(rendered, enc.ids, enc.offsets,
                                                               EncodeSettings(seq_len, "all_assistant", truncation))


def token_at(offsets: np.ndarray, char: int) -> int:
    return int(np.searchsorted(offsets[:, 0], char))


@pytest.mark.parametrize("template_name", ["chatml", "auto"])  # built-in, and the shared tokenizer's Jinja
@HYPOTHESIS
@given(conv=long_conversations(), seq_len=st.integers(12, 400))
def test_truncation_keeps_the_system_prompt_and_whole_exchanges(shared_tokenizer, template_name, conv, seq_len):
    rendered, ids, offsets, run = encode(shared_tokenizer, template_name, conv, seq_len)
    bounds = rendered.exchange_bounds()
    assert bounds is not None and len(bounds) == sum(m.role == "user" for m in conv.messages)
    prefix = token_at(offsets, bounds[0][0])
    try:
        out = run()
    except SampleRejected as err:
        assert err.reason == "response_too_long" and len(ids) > seq_len
        return
    assert len(out.input_ids) <= seq_len
    kept = out.input_ids.tolist()
    if not out.truncated:
        assert kept == ids.tolist()
        return
    starts = [token_at(offsets, b) for b, _ in bounds]
    if out.truncation == "whole_turns":  # the system prompt, then the longest run of last exchanges that fits
        first = next(s for s in starts[1:] if kept == ids[:prefix].tolist() + ids[s:].tolist())
        earlier = starts[starts.index(first) - 1]
        assert starts.index(first) == 1 or prefix + len(ids) - earlier > seq_len
        text = shared_tokenizer.decode(kept)
        assert text == rendered.text[:bounds[0][0]] + rendered.text[bounds[starts.index(first)][0]:]
    else:  # declared cut: system prompt, the last user message's header, the tail of its content
        assert out.truncation == "prompt_cut" and prefix + len(ids) - starts[-1] > seq_len
        header = ids[starts[-1]:token_at(offsets, bounds[-1][1])].tolist()
        head = ids[:prefix].tolist() + header
        assert kept[:len(head)] == head and kept[len(head):] == ids[len(ids) - (len(kept) - len(head)):].tolist()
        assert len(kept) == seq_len
    # every trained span of the kept sample is a whole assistant message of the original
    spans = [rendered.text[s:e] for s, e in rendered.assistant_spans]
    runs = trained_runs(out.trained)
    assert runs
    assert_trained_text(shared_tokenizer.decode, out.input_ids, out.trained, spans[len(spans) - len(runs):])


def test_a_multi_turn_sample_no_longer_starts_inside_an_earlier_answer(shared_tokenizer):
    """Before, truncate_prompt kept the last seq_len tokens, starting mid-way through an old reply."""
    long = "这是一段很长的回答。" * 20
    conv = Conversation([Message("user", "第一个问题"), Message("assistant", long), Message("user", "第二个问题"),
                         Message("assistant", "简短的回答。")], system="你是助手。",
                        tools=[{"name": "lookup", "parameters": {}}])
    rendered, ids, offsets, run = encode(shared_tokenizer, "auto", conv, 220)
    out = run()
    text = shared_tokenizer.decode(out.input_ids.tolist())
    assert out.truncation == "whole_turns"
    assert text.startswith("<|im_start|>system\n你是助手。\n\n# Tools")  # tool definitions kept
    assert "这是一段" not in text and "第一个问题" not in text
    assert text.endswith("<|im_start|>user\n第二个问题<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
                         "简短的回答。<|im_end|>\n")


def test_the_last_exchange_that_does_not_fit_follows_the_declared_policy(shared_tokenizer):
    conv = Conversation([Message("user", "很长的问题" * 40), Message("assistant", "答")], system="系统")
    _, _, _, cut = encode(shared_tokenizer, "chatml", conv, 40, "truncate_prompt")
    out = cut()
    text = shared_tokenizer.decode(out.input_ids.tolist())
    assert out.truncation == "prompt_cut" and len(out.input_ids) == 40
    assert text.startswith("<|im_start|>system\n系统<|im_end|>\n<|im_start|>user\n") and text.endswith("答<|im_end|>\n")
    _, _, _, whole = encode(shared_tokenizer, "chatml", conv, 40, "whole_turns")
    with pytest.raises(SampleRejected) as err:
        whole()
    assert err.value.reason == "last_exchange_too_long"
    _, _, _, drop = encode(shared_tokenizer, "chatml", conv, 40, "drop")
    with pytest.raises(SampleRejected) as err:
        drop()
    assert err.value.reason == "too_long"
