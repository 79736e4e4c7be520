"""Reasoning turns train exactly what the model must generate after each turn's generation prompt.

The oracle is the definition itself, computed with transformers' own apply_chat_template: for
assistant turn k, P_k = the conversation before k rendered with add_generation_prompt=True (same
template arguments), F = the whole conversation; the turn trains F from the first character where
it departs from P_k through the end-of-turn marker. Built-in templates are checked against
hand-written expectations of their family and, for qwen3, against a Qwen3-style Jinja template.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_pipeline.render.builtin_templates import EMPTY_THINK
from data_pipeline.ingest.conversation import Conversation, Message
from data_pipeline.render.encoding import EncodeSettings, encode_conversation
from data_pipeline.errors import TemplateError
from data_pipeline.render.reasoning import render_samples, split_inline_think, turn_reasoning
from data_pipeline.render.rendering import common_prefix_len, conversation_to_dicts
from data_pipeline.render.templates import build_template, template_spec
from tests.data_pipeline.conftest import make_tiny_tokenizer
from tests.data_pipeline.mask_check import assert_trained_text

ALPHABET = st.sampled_from(list("你好世界机器学习回答指令。，！？abcXYZ 019{}\":_-\n\t") + ["😀", "\u3000"])
TEXT = st.text(ALPHABET, min_size=1, max_size=30)
ANSWER = TEXT.filter(lambda s: s.strip() != "")
HYPOTHESIS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def reasoning_conversations(draw) -> Conversation:
    """1-3 exchanges; each answer has no reasoning, a reasoning field (possibly empty), or inline
    `<think>` in its content."""
    system = draw(st.one_of(st.none(), TEXT))
    messages: list[Message] = []
    for _ in range(draw(st.integers(1, 3))):
        messages.append(Message("user", draw(TEXT)))
        answer, kind = draw(ANSWER), draw(st.sampled_from(["none", "field", "empty_field", "inline"]))
        if kind == "field":
            messages.append(Message("assistant", answer, reasoning=draw(ANSWER)))
        elif kind == "empty_field":
            messages.append(Message("assistant", answer, reasoning=""))
        elif kind == "inline":
            messages.append(Message("assistant", f"<think>\n{draw(ANSWER)}\n</think>\n\n{answer}"))
        else:
            messages.append(Message("assistant", answer))
    return Conversation(messages, system)


def qwen3_style_jinja(shared_template: str) -> str:
    """A Qwen3-style template (reasoning only after the last user query, enable_thinking picks the
    prompt) made from the shared tokenizer's template, which renders every turn's reasoning."""
    every_turn = "        {%- if true %}\n            {{- '<|im_start|>' + message.role + '\\n<think>\\n'"
    assert every_turn in shared_template
    qwen3 = shared_template.replace(every_turn, (
        "        {%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}\n"
        "            {{- '<|im_start|>' + message.role + '\\n<think>\\n'"))
    qwen3 = qwen3.replace("        {%- endif %}\n        {%- if message.tool_calls %}", (
        "        {%- else %}\n            {{- '<|im_start|>' + message.role + '\\n' + content }}\n"
        "        {%- endif %}\n        {%- if message.tool_calls %}"), 1)
    old_prompt = ("    {%- if open_thinking is defined and open_thinking is true %}\n        {{- '<think>\\n' }}\n"
                  "    {%- else %}\n        {{- '<think>\\n\\n</think>\\n\\n' }}\n    {%- endif %}")
    assert old_prompt in qwen3
    return qwen3.replace(old_prompt, "    {%- if enable_thinking is defined and enable_thinking is false %}\n"
                                     "        {{- '<think>\\n\\n</think>\\n\\n' }}\n    {%- endif %}")


def definition_oracle(tokenizer, conv: Conversation, kwargs: dict, eot: str) -> list[str]:
    """The trained text of every assistant turn by the mask rule, from apply_chat_template."""
    messages = conversation_to_dicts(conv)
    full = tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    out, cursor = [], 0
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True, **kwargs)
        start = common_prefix_len(prompt, full)
        assert start >= cursor
        cursor = full.index(eot, start) + len(eot)
        out.append(full[start:cursor])
    return out


def trained_texts(tokenizer, template_name: str, conv: Conversation, kwargs: dict):
    template = build_template(template_spec(template_name, tokenizer, kwargs))
    [rendered] = render_samples(template, conv, "template")
    enc = tokenizer.backend_tokenizer.encode(rendered.text, add_special_tokens=False)
    sample = encode_conversation(rendered, enc.ids, enc.offsets, EncodeSettings(100_000))
    return template, rendered, sample


def reasoning_turns(conv: Conversation) -> int:
    return sum(1 for m in conv.messages if (turn_reasoning(m) or "").strip())


@pytest.fixture(scope="module")
def qwen3_tokenizer(shared_tokenizer):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(shared_tokenizer.name_or_path)
    tok.chat_template = qwen3_style_jinja(shared_tokenizer.chat_template)
    return tok


@pytest.mark.parametrize("kwargs", [{}, {"enable_thinking": True}, {"enable_thinking": False}])
@HYPOTHESIS
@given(conv=reasoning_conversations())
def test_qwen3_style_jinja_trains_what_follows_each_generation_prompt(qwen3_tokenizer, kwargs, conv):
    template, rendered, sample = trained_texts(qwen3_tokenizer, "auto", conv, kwargs)
    assert rendered.text == qwen3_tokenizer.apply_chat_template(conversation_to_dicts(conv), tokenize=False, **kwargs)
    expected = definition_oracle(qwen3_tokenizer, conv, kwargs, "<|im_end|>")
    assert [rendered.text[s:e] for s, e in rendered.assistant_spans] == expected
    assert_trained_text(qwen3_tokenizer.decode, sample.input_ids, sample.trained, expected)
    last = expected[-1]
    if kwargs.get("enable_thinking", True):
        assert last.startswith("<think>\n")  # thinking mode: the model opens its thinking itself
    elif not (turn_reasoning(conv.messages[-1]) or "").strip("\n"):
        assert not last.startswith("<think>")  # the prompt's empty block never trains
    assert rendered.counts["reasoning_rendered"] + rendered.counts["reasoning_dropped_by_template"] \
        == reasoning_turns(conv)


@pytest.mark.parametrize("kwargs", [{}, {"open_thinking": True}])
@HYPOTHESIS
@given(conv=reasoning_conversations())
def test_shared_template_trains_reasoning_after_its_generation_prompt(shared_tokenizer, kwargs, conv):
    _, rendered, sample = trained_texts(shared_tokenizer, "auto", conv, kwargs)
    expected = definition_oracle(shared_tokenizer, conv, kwargs, "<|im_end|>")
    assert_trained_text(shared_tokenizer.decode, sample.input_ids, sample.trained, expected)
    for m, text in zip([m for m in conv.messages if m.role == "assistant"], expected):
        reasoning = (turn_reasoning(m) or "").strip("\n")
        if reasoning.strip():  # the shared template keeps every turn's reasoning: it trains
            assert text.startswith(reasoning) and rendered.counts["reasoning_dropped_by_template"] == 0


@pytest.mark.parametrize("kwargs", [{}, {"enable_thinking": False}])
@HYPOTHESIS
@given(conv=reasoning_conversations())
def test_builtin_qwen3_equals_the_qwen3_style_jinja(qwen3_tokenizer, kwargs, conv):
    _, jinja, jinja_sample = trained_texts(qwen3_tokenizer, "auto", conv, kwargs)
    _, builtin, builtin_sample = trained_texts(qwen3_tokenizer, "qwen3", conv, kwargs)
    assert builtin.text == jinja.text and builtin.assistant_spans == jinja.assistant_spans
    assert (builtin_sample.trained == jinja_sample.trained).all()
    assert builtin.counts == jinja.counts


def plain_family_expected(m: Message, eot: str) -> str:
    block = f"<think>\n{m.reasoning.strip(chr(10))}\n</think>\n\n" if (m.reasoning or "").strip() else ""
    return block + m.content + eot


@pytest.mark.parametrize("name, eot", [("chatml", "<|im_end|>"), ("llama3", "<|eot_id|>"), ("chatglm", "<|im_end|>"),
                                       ("zh_plain", "<|im_end|>")])
@HYPOTHESIS
@given(conv=reasoning_conversations())
def test_plain_families_render_a_reasoning_field_as_a_trained_think_block(tiny_tokenizer, name, eot, conv):
    _, rendered, sample = trained_texts(tiny_tokenizer, name, conv, {})
    expected = [plain_family_expected(m, eot) for m in conv.messages if m.role == "assistant"]
    assert [rendered.text[s:e] for s, e in rendered.assistant_spans] == expected
    assert rendered.counts["reasoning_rendered"] == reasoning_turns(conv)


@HYPOTHESIS
@given(conv=reasoning_conversations())
def test_deepseek_r1_prefill_never_trains_and_the_last_exchange_keeps_its_reasoning(conv):
    tokenizer = r1_tokenizer()
    _, rendered, sample = trained_texts(tokenizer, "deepseek-r1", conv, {})
    last_user = max(i for i, m in enumerate(conv.messages) if m.role == "user")
    expected = []
    for i, m in enumerate(conv.messages):
        if m.role != "assistant":
            continue
        reasoning, content = (m.reasoning, m.content) if m.reasoning is not None else split_inline_think(m.content)
        if i > last_user:  # after "<｜Assistant｜><think>\n", the model writes the rest of the block
            expected.append((reasoning or "").strip("\n") + "\n</think>\n\n" + content.lstrip("\n") + R1_EOS)
        else:
            expected.append(content + R1_EOS)
    assert [rendered.text[s:e] for s, e in rendered.assistant_spans] == expected
    assert "<｜Assistant｜><think>\n" in rendered.text
    assert_trained_text(tokenizer.decode, sample.input_ids, sample.trained, expected)


R1_MARKERS = ["<｜begin▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>"]
R1_EOS = "<｜end▁of▁sentence｜>"
_R1: list = []


def r1_tokenizer():
    if not _R1:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=R1_MARKERS, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        backend.train_from_iterator(["你好世界 <think>\n思考\n</think>\n\n回答"] * 4, trainer)
        _R1.append(PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=R1_EOS))
    return _R1[0]


def test_the_reported_reasoning_content_record_trains_its_reasoning(shared_tokenizer):
    """The record users met: the reasoning used to be dropped, rendered as an empty think block."""
    conv = Conversation([Message("user", "你好"), Message("assistant", "你好！", reasoning="用户在打招呼。")])
    _, rendered, sample = trained_texts(shared_tokenizer, "auto", conv, {})
    assert "<think>\n用户在打招呼。\n</think>\n\n你好！" in rendered.text
    assert_trained_text(shared_tokenizer.decode, sample.input_ids, sample.trained,
                        ["用户在打招呼。\n</think>\n\n你好！<|im_end|>"])


def test_every_turn_splits_where_the_template_drops_earlier_reasoning(qwen3_tokenizer):
    conv = Conversation([Message("user", "一"), Message("assistant", "答一", reasoning="想一"),
                         Message("user", "二"), Message("assistant", "答二", reasoning="想二")])
    template = build_template(template_spec("qwen3", qwen3_tokenizer))
    kept = render_samples(template, conv, "template")
    assert len(kept) == 1 and "想一" not in kept[0].text
    assert kept[0].counts == {"reasoning_turns": 2, "reasoning_rendered": 1, "reasoning_dropped_by_template": 1}
    split = render_samples(template, conv, "every_turn")
    assert [len(s.assistant_spans) for s in split] == [1, 1]
    assert [s.text[a:b] for s in split for a, b in s.assistant_spans] == [
        "<think>\n想一\n</think>\n\n答一<|im_end|>", "<think>\n想二\n</think>\n\n答二<|im_end|>"]
    assert all(s.counts["reasoning_split_samples"] == 1 and s.counts["reasoning_rendered"] == 1 for s in split)


def test_template_kwargs_reach_the_jinja_generation_prompt(shared_tokenizer):
    conv = Conversation([Message("user", "问"), Message("assistant", "答")])
    closed = build_template(template_spec("auto", shared_tokenizer, {})).inner
    opened = build_template(template_spec("auto", shared_tokenizer, {"open_thinking": True})).inner
    assert closed.generation_prompt.endswith(EMPTY_THINK) and opened.generation_prompt.endswith("<think>\n")
    spans_closed = closed.render(conv).assistant_spans
    spans_opened = opened.render(conv).assistant_spans
    text = closed.render(conv).text
    assert text[slice(*spans_closed[0])] == "答<|im_end|>"
    assert text[slice(*spans_opened[0])] == "\n</think>\n\n答<|im_end|>"  # after the prompt's "<think>\n"


def test_builtin_template_kwargs_and_markers_are_checked(tiny_tokenizer):
    with pytest.raises(TemplateError, match="takes no template_kwargs"):
        template_spec("chatml", tiny_tokenizer, {"enable_thinking": True})
    with pytest.raises(TemplateError, match="enable_thinking must be true or false"):
        template_spec("qwen3", tiny_tokenizer, {"enable_thinking": "yes"})
    chatml_only = make_tiny_tokenizer()
    with pytest.raises(TemplateError, match="<｜User｜>") as err:
        template_spec("deepseek-r1", chatml_only)
    assert err.value.field == "template"


def test_llama3_without_its_end_of_turn_token_is_refused(shared_tokenizer):
    """Before, the end-of-turn marker trained as plain-text pieces."""
    with pytest.raises(TemplateError, match="<\\|eot_id\\|>"):
        template_spec("llama3", shared_tokenizer)


def test_prepare_then_inspect_shows_the_reasoning_inside_trained_spans(shared_data, shared_tokenizer, qwen3_tokenizer,
                                                                       tmp_path, capsys):
    """End to end, as a user checks a new data set: prepare, then `inspect --json`."""
    import json

    from data_pipeline.inspect import main as inspect_cli
    from data_pipeline.prepare import prepare_sources
    from data_pipeline.spec import DataConfig, SourceSpec

    tokenizer_dir = shared_data / "tokenizer-zh-6400"
    field = tmp_path / "field.jsonl"
    field.write_text(json.dumps({"messages": [
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！", "reasoning_content": "用户在打招呼。"}]}, ensure_ascii=False) + "\n",
        encoding="utf-8")
    inline = tmp_path / "inline.jsonl"
    inline.write_text(json.dumps({"messages": [
        {"role": "user", "content": "一加一？"},
        {"role": "assistant", "content": "<think>\n算一下。\n</think>\n\n二。"},
        {"role": "user", "content": "再加一？"},
        {"role": "assistant", "content": "<think>\n再算。\n</think>\n\n三。"}]},
        ensure_ascii=False) + "\n", encoding="utf-8")
    qwen3_file = tmp_path / "qwen3_style.jinja"
    qwen3_file.write_text(qwen3_tokenizer.chat_template, encoding="utf-8")

    def trained_spans(template: str, path, name: str) -> list[str]:
        cfg = DataConfig(sources=[SourceSpec(name=name, path=str(path), format="messages")], template=template,
                         num_proc=1)
        prepare_sources(cfg, shared_tokenizer, tmp_path / "out", show_progress=False)
        capsys.readouterr()
        assert inspect_cli([str(tmp_path / "out" / name), "--json", "--tokenizer", str(tokenizer_dir)]) == 0
        return json.loads(capsys.readouterr().out.splitlines()[0])["trained"]

    # the shared tokenizer's own template (open_thinking unset): the reasoning trains
    assert trained_spans("auto", field, "field") == ["用户在打招呼。\n</think>\n\n你好！<|im_end|>"]
    # a Qwen3-style template in thinking mode (its generation prompt ends at "assistant\n"): the last
    # turn's span starts at <think>; the earlier turn comes back without its thinking, as at inference
    spans = trained_spans(str(qwen3_file), inline, "inline")
    assert spans == ["二。<|im_end|>", "<think>\n再算。\n</think>\n\n三。<|im_end|>"]
