"""Loss masks of every template, checked by decoding over generated conversations."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_pipeline.render.encoding import EncodeSettings, encode_conversation, spans_to_mask
from data_pipeline.errors import SampleRejected, TemplateError
from data_pipeline.ingest.formats import Conversation, Message, ToolCall
from data_pipeline.render.templates import build_template, template_spec
from tests.data_pipeline.conftest import make_tiny_tokenizer
from tests.data_pipeline.mask_check import assert_trained_text

# No '<' so that generated text never spells a special token (that is an injection, not a mask bug).
ALPHABET = st.sampled_from(list("你好世界机器学习回答指令。，！？abcXYZ 019{}\":_-\n\t") + ["😀", "🚀", "\r", "é", "\u3000"])
TEXT = st.text(ALPHABET, min_size=1, max_size=40)
ANSWER = TEXT.filter(lambda s: s.strip() != "")


@st.composite
def conversations(draw) -> Conversation:
    system = draw(st.one_of(st.none(), TEXT))
    messages: list[Message] = []
    for _ in range(draw(st.integers(1, 3))):
        messages.append(Message("user", draw(TEXT)))
        messages.append(Message("assistant", draw(ANSWER)))
    return Conversation(messages, system)


def encode(tokenizer, template_name: str, conv: Conversation, train_on: str = "all_assistant"):
    template = build_template(template_spec(template_name, tokenizer))
    rendered = template.render(conv)
    enc = tokenizer.backend_tokenizer.encode(rendered.text, add_special_tokens=False)
    sample = encode_conversation(rendered, enc.ids, enc.offsets, EncodeSettings(10_000, train_on))
    return rendered, sample


END_OF_TURN = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "chatglm": "<|im_end|>", "zh_plain": "<|im_end|>"}
SIMPLE_CHATML_JINJA = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
THINK_JINJA = (  # inserts an empty think block into every assistant turn, like the shared tokenizer's
    "{% for m in messages %}{% if m.role == 'assistant' %}<|im_start|>assistant\n<think>\n\n</think>\n\n"
    "{{ m.content | trim }}<|im_end|>\n{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n\n</think>\n\n{% endif %}"
)

HYPOTHESIS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.mark.parametrize("name", sorted(END_OF_TURN))
@HYPOTHESIS
@given(conv=conversations())
def test_builtin_masks_decode_to_responses(tiny_tokenizer, name, conv):
    rendered, sample = encode(tiny_tokenizer, name, conv)
    expected = [m.content + END_OF_TURN[name] for m in conv.messages if m.role == "assistant"]
    assert [rendered.text[s:e] for s, e in rendered.assistant_spans] == expected
    assert_trained_text(tiny_tokenizer.decode, sample.input_ids, sample.trained, expected)


@pytest.mark.parametrize("jinja, strip", [(SIMPLE_CHATML_JINJA, False), (THINK_JINJA, True)])
@HYPOTHESIS
@given(conv=conversations())
def test_jinja_masks_decode_to_responses(jinja, strip, conv):
    tokenizer = _jinja_tokenizers(jinja)
    rendered, sample = encode(tokenizer, "auto", conv)
    assert rendered.text == tokenizer.apply_chat_template(_dicts(conv), tokenize=False)
    expected = [(m.content.strip() if strip else m.content) + "<|im_end|>" for m in conv.messages
                if m.role == "assistant"]
    assert_trained_text(tokenizer.decode, sample.input_ids, sample.trained, expected)
    assert "<think>" not in "".join(rendered.text[s:e] for s, e in rendered.assistant_spans)


@HYPOTHESIS
@given(conv=conversations())
def test_shared_tokenizer_template_masks(shared_tokenizer, conv):
    rendered, sample = encode(shared_tokenizer, "auto", conv)
    assert rendered.text == shared_tokenizer.apply_chat_template(_dicts(conv), tokenize=False)
    expected = [m.content.lstrip("\n") + "<|im_end|>" for m in conv.messages if m.role == "assistant"]
    assert_trained_text(shared_tokenizer.decode, sample.input_ids, sample.trained, expected)


def test_shared_template_tool_calls_train_and_tool_results_do_not(shared_tokenizer):
    conv = Conversation([
        Message("user", "天气？"),
        Message("assistant", "", [ToolCall("weather", {"city": "北京"})]),
        Message("tool", "{\"temp\": 20}"),
        Message("assistant", "北京20度。"),
    ], tools=[{"name": "weather", "parameters": {}}])
    rendered, sample = encode(shared_tokenizer, "auto", conv)
    call = '<tool_call>\n{"name": "weather", "arguments": {"city": "北京"}}\n</tool_call><|im_end|>'
    assert_trained_text(shared_tokenizer.decode, sample.input_ids, sample.trained, [call, "北京20度。<|im_end|>"])


@pytest.mark.parametrize("name", ["chatml", "zh_plain"])
def test_train_on_modes(tiny_tokenizer, name):
    conv = Conversation([Message("user", "问一"), Message("assistant", "答一"), Message("user", "问二"),
                         Message("assistant", "答二")], system="系统")
    eot = END_OF_TURN[name]
    _, last = encode(tiny_tokenizer, name, conv, "last_assistant")
    assert_trained_text(tiny_tokenizer.decode, last.input_ids, last.trained, ["答二" + eot])
    rendered, everything = encode(tiny_tokenizer, name, conv, "everything")
    assert everything.trained.all()
    assert tiny_tokenizer.decode(everything.input_ids.tolist()) == rendered.text


def test_template_tokens_never_train(tiny_tokenizer):
    conv = Conversation([Message("user", "用户说的话"), Message("assistant", "回答")], system="系统提示")
    rendered, sample = encode(tiny_tokenizer, "chatml", conv)
    untrained = tiny_tokenizer.decode(sample.input_ids[~sample.trained].tolist())
    assert "回答" not in untrained and "系统提示" in untrained and "用户说的话" in untrained
    assert "<|im_start|>assistant\n" in untrained


def test_straddling_token_rule():
    offsets = np.array([[0, 3], [3, 6], [6, 9]])
    # a span that starts inside token 1 trains token 1 (overlap rule), not token 0
    assert spans_to_mask(offsets, [(4, 9)]).tolist() == [False, True, True]
    assert spans_to_mask(offsets, [(3, 6)]).tolist() == [False, True, False]


def test_truncation_keeps_final_response(tiny_tokenizer):
    long_prompt = "很长的问题" * 40
    conv = Conversation([Message("user", long_prompt), Message("assistant", "短答")])
    template = build_template(template_spec("chatml", tiny_tokenizer))
    rendered = template.render(conv)
    enc = tiny_tokenizer.backend_tokenizer.encode(rendered.text, add_special_tokens=False)
    out = encode_conversation(rendered, enc.ids, enc.offsets, EncodeSettings(16, "all_assistant", "truncate_prompt"))
    assert len(out.input_ids) == 16 and out.truncated
    assert tiny_tokenizer.decode(out.input_ids[out.trained].tolist()) == "短答<|im_end|>"
    with pytest.raises(SampleRejected) as err:
        encode_conversation(rendered, enc.ids, enc.offsets, EncodeSettings(16, "all_assistant", "drop"))
    assert err.value.reason == "too_long"
    with pytest.raises(SampleRejected) as err:
        encode_conversation(rendered, enc.ids, enc.offsets, EncodeSettings(2, "all_assistant", "truncate_prompt"))
    assert err.value.reason == "response_too_long"


@pytest.mark.parametrize("jinja", [SIMPLE_CHATML_JINJA, THINK_JINJA, None])
@HYPOTHESIS
@given(conv=conversations(), tool_turn=st.booleans())
def test_marked_render_equals_incremental_render(shared_tokenizer, jinja, conv, tool_turn):
    """The two-render fast path gives the same text and spans as the 2-renders-per-turn method
    (None = the shared tokenizer's own template, with tool calls and an inserted think block)."""
    if tool_turn:
        conv.messages[-1:-1] = [Message("assistant", "", [ToolCall("f", {"x": "值"})]), Message("tool", "{}"),
                                Message("user", "再问")] if jinja else [
            Message("assistant", conv.messages[-1].content, [ToolCall("f", {"x": 1})]), Message("tool", "{}")]
    tokenizer = _jinja_tokenizers(jinja) if jinja else shared_tokenizer
    template = build_template(template_spec("auto", tokenizer)).inner
    assert template.render(conv) == template.incremental_render(conv)


def test_marked_render_falls_back_when_the_template_edits_content():
    template = build_template(template_spec("auto", _jinja_tokenizers(THINK_JINJA))).inner
    plain = Conversation([Message("user", "问"), Message("assistant", "答")])
    padded = Conversation([Message("user", "问"), Message("assistant", "  答\n")])  # `| trim` edits it
    assert template.render(plain) == template.incremental_render(plain) and template.fallbacks == 0
    assert template.render(padded) == template.incremental_render(padded) and template.fallbacks == 1


def test_template_without_generation_prompt_is_refused():
    tok = make_tiny_tokenizer("{% for m in messages %}{{ m.content }}{% endfor %}")
    with pytest.raises(TemplateError, match="add_generation_prompt"):
        build_template(template_spec("auto", tok))


def test_unknown_template_names_the_key(tiny_tokenizer):
    with pytest.raises(TemplateError) as err:
        template_spec("no_such_template", tiny_tokenizer)
    assert err.value.field == "template"


_JINJA_CACHE: dict = {}


def _jinja_tokenizers(jinja: str):
    if jinja not in _JINJA_CACHE:
        _JINJA_CACHE[jinja] = make_tiny_tokenizer(jinja)
    return _JINJA_CACHE[jinja]


def _dicts(conv: Conversation) -> list[dict]:
    from data_pipeline.render.templates import conversation_to_dicts

    return conversation_to_dicts(conv)
