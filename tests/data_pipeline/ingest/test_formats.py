"""Readers and format parsers: round-trips over formats/containers/compression, errors, fuzz."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import fsspec
import pytest

from data_pipeline.errors import DataError, MalformedInputError
from data_pipeline.ingest.formats import Conversation, Message, ToolCall, TextDocument, detect_format, parse_record
from data_pipeline.ingest.readers import decode_payload, iter_records, list_files

CONV = Conversation([Message("user", "你好 😀\n"), Message("assistant", "", [ToolCall("f", {"x": 1})]),
                     Message("tool", "{\"ok\": true}"), Message("assistant", "好的。")], system="系统", tools=[{"name": "f"}])


def as_record(conv: Conversation, fmt: str) -> dict:
    if fmt == "alpaca":
        return {"instruction": conv.messages[0].content, "input": "", "output": conv.messages[1].content,
                "system": conv.system}
    if fmt == "sharegpt":
        turns = [{"from": "system", "value": conv.system}]
        for m in conv.messages:
            if m.tool_calls:
                turns.append({"from": "function_call", "value": m.tool_calls[0].as_json_text()})
            else:
                turns.append({"from": {"user": "human", "assistant": "gpt", "tool": "observation"}[m.role],
                              "value": m.content})
        return {"conversations": turns, "tools": json.dumps(conv.tools, ensure_ascii=False)}
    msgs = [{"role": "system", "content": conv.system}]
    for m in conv.messages:
        d = {"role": m.role, "content": m.content}
        if m.tool_calls:
            d["tool_calls"] = [{"type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                               for c in m.tool_calls]
        msgs.append(d)
    return {"messages": msgs, "tools": conv.tools}


ALPACA_CONV = Conversation([Message("user", "问题"), Message("assistant", "回答 🚀")], system="系统")


def write(path: Path, records: list, container: str) -> Path:
    if container == "json":
        data = json.dumps(records, ensure_ascii=False, indent=2).encode()
    elif container == "jsonl":
        data = "\n".join(json.dumps(r, ensure_ascii=False) for r in records).encode()
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist([{"payload": json.dumps(r)} for r in records]), path)
        return path
    if path.suffix == ".gz":
        data = gzip.compress(data)
    elif path.suffix == ".zst":
        import zstandard

        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


def read_back(path: str, fmt: str = "auto") -> list:
    out = []
    for rec in iter_records(list_files(path)):
        value = decode_payload(rec)
        if isinstance(value, dict) and "payload" in value:  # parquet rows wrap the record as JSON text
            value = json.loads(value["payload"])
        out.append(parse_record(value, detect_format(value) if fmt == "auto" else fmt))
    return out


@pytest.mark.parametrize("fmt", ["alpaca", "sharegpt", "messages"])
@pytest.mark.parametrize("name", ["d.json", "d.jsonl", "d.json.gz", "d.jsonl.zst", "d.parquet"])
def test_round_trip(tmp_path, fmt, name):
    conv = ALPACA_CONV if fmt == "alpaca" else CONV
    path = write(tmp_path / name, [as_record(conv, fmt)] * 3, "parquet" if "parquet" in name else name.split(".")[1])
    assert read_back(str(path)) == [conv] * 3


def test_folder_glob_file_url_and_memory_fs(tmp_path):
    for i in range(3):
        write(tmp_path / f"part{i}.jsonl", [as_record(CONV, "messages")], "jsonl")
    assert len(read_back(str(tmp_path))) == 3
    assert len(read_back(str(tmp_path / "part[01].jsonl"))) == 2
    assert read_back(f"file://{tmp_path}/part0.jsonl") == [CONV]
    fs = fsspec.filesystem("memory")
    with fs.open("/bench/x.jsonl.gz", "wb") as f:
        f.write(gzip.compress(json.dumps(as_record(CONV, "sharegpt")).encode()))
    try:
        assert read_back("memory://bench/x.jsonl.gz") == [CONV]
    finally:
        fs.rm("/bench", recursive=True)


def test_text_documents(tmp_path):
    (tmp_path / "c.txt").write_text("第一篇\n\n第二篇 doc\n", encoding="utf-8")
    assert read_back(str(tmp_path / "c.txt")) == [TextDocument("第一篇"), TextDocument("第二篇 doc")]
    write(tmp_path / "t.jsonl", [{"body": "正文"}], "jsonl")
    rec = next(iter_records([str(tmp_path / "t.jsonl")]))
    assert parse_record(decode_payload(rec), "text", "body") == TextDocument("正文")


@pytest.mark.parametrize("record, reason, field", [
    ({"instruction": "q"}, "missing_field", "output"),
    ({"instruction": 3, "output": "a"}, "bad_type", "instruction"),
    ({"instruction": "q", "output": "  "}, "empty_response", "output"),
    ({"conversations": [{"from": "alien", "value": "x"}]}, "unknown_role", "conversations[0].from"),
    ({"conversations": [{"from": "gpt", "value": "x"}]}, "bad_turn_order", "conversations[0]"),
    ({"conversations": [{"from": "human", "value": "x"}]}, "ends_without_response", "conversations[0]"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "bad_turn_order",
     "messages[1]"),
])
def test_bad_records_name_the_field(record, reason, field):
    with pytest.raises(DataError) as err:
        parse_record(record, "alpaca" if "instruction" in record else detect_format(record))
    assert (err.value.reason, err.value.field) == (reason, field)


def test_malformed_json_and_utf8_name_the_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": \n' + b'{"text": "\xff"}\n')
    records = list(iter_records([str(p)]))
    for rec in records:
        with pytest.raises(MalformedInputError) if rec.line > 1 else _nothing():
            decode_payload(rec)
    with pytest.raises(MalformedInputError) as err:
        decode_payload(records[1])
    assert err.value.line == 2 and "bad.jsonl:2" in str(err.value)
    with pytest.raises(MalformedInputError) as err:
        decode_payload(records[2])
    assert err.value.reason == "invalid_utf8" and err.value.line == 3
    arr = tmp_path / "bad.json"
    arr.write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": "a" "output": "b"}\n]')
    recs = list(iter_records([str(arr)]))
    assert recs[0].line == 2 and recs[1].error is not None and recs[1].error.line == 3


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _corrupt(line: bytes, rng: random.Random) -> bytes:
    kind = rng.randrange(5)
    if kind == 0:
        return line[: rng.randrange(len(line))]
    if kind == 1:
        pos = rng.randrange(len(line))
        return line[:pos] + bytes([rng.randrange(256)]) + line[pos + 1:]
    if kind == 2:
        return line.replace(b'"output"', b'"outptu"')
    if kind == 3:
        return line.replace(b'"gpt"', b'"robot"')
    return line


@pytest.mark.parametrize("on_error", ["skip", "strict"])
def test_fuzz_corrupted_records(tmp_path, tiny_tokenizer, on_error):
    from data_pipeline.prepare import prepare_sources
    from data_pipeline.spec import DataConfig, SourceSpec

    rng = random.Random(0)
    good = [json.dumps(as_record(ALPACA_CONV, "alpaca"), ensure_ascii=False).encode()] * 1500
    good += [json.dumps(as_record(CONV, "sharegpt")).replace('"alpaca"', "").encode()] * 1500
    lines = [_corrupt(x, rng) for x in good]
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(b"\n".join(lines))
    cfg = DataConfig(sources=[SourceSpec(name="f", path=str(path), format="auto")], template="chatml",
                     on_error=on_error, num_proc=1, max_skip_fraction=1.0)  # mostly broken on purpose
    if on_error == "strict":
        with pytest.raises(DataError) as err:
            prepare_sources(cfg, tiny_tokenizer, tmp_path / "out", show_progress=False)
        assert err.value.file.endswith("fuzz.jsonl") and err.value.line >= 1
        return
    (source,) = prepare_sources(cfg, tiny_tokenizer, tmp_path / "out", show_progress=False)
    counts = source.manifest["counts"]
    non_blank = sum(1 for x in lines if x.strip())
    assert counts["records"] == non_blank
    assert counts["samples"] + sum(source.manifest["skips"].values()) == non_blank
    assert 0 < counts["samples"] < non_blank


# ----------------------------------------------------------------------------- reasoning, non-SFT records, content parts

def test_reasoning_fields_are_kept_in_every_format():
    for record, fmt in [
        ({"messages": [{"role": "user", "content": "你好"},
                       {"role": "assistant", "content": "你好！", "reasoning_content": "用户在打招呼。"}]}, "messages"),
        ({"conversations": [{"from": "human", "value": "你好"},
                            {"from": "gpt", "value": "你好！", "reasoning": "用户在打招呼。"}]}, "sharegpt"),
        ({"instruction": "你好", "output": "你好！", "think": "用户在打招呼。"}, "alpaca"),
        ({"instruction": "你好", "input": "", "output": "你好！", "reasoning_content": "用户在打招呼。"}, "alpaca"),
    ]:
        conv = parse_record(record, detect_format(record))
        assert detect_format(record) == fmt
        assert (conv.messages[-1].content, conv.messages[-1].reasoning) == ("你好！", "用户在打招呼。")


def test_two_different_reasoning_fields_are_refused():
    record = {"messages": [{"role": "user", "content": "q"},
                           {"role": "assistant", "content": "a", "reasoning_content": "x", "thinking": "y"}]}
    with pytest.raises(DataError) as err:
        parse_record(record, "messages")
    assert err.value.reason == "ambiguous_reasoning" and err.value.field.startswith("messages[1]")


@pytest.mark.parametrize("record, reason", [
    ({"instruction": "q", "input": "", "chosen": "好", "rejected": "坏"}, "preference_pair"),
    ({"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "好"},
      "rejected": {"from": "gpt", "value": "坏"}}, "preference_pair"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "label": False},
     "kto_label"),
])
def test_preference_and_kto_records_say_what_they_are(record, reason):
    for fmt in ("auto", "alpaca", "sharegpt", "messages"):
        with pytest.raises(DataError) as err:
            parse_record(record, detect_format(record)) if fmt == "auto" else parse_record(record, fmt)
        assert err.value.reason == reason and "format to 'chosen'" in err.value.message


@pytest.mark.parametrize("record", [
    {"instruction": "问", "input": "", "chosen": "好答", "rejected": "坏答"},
    {"prompt": "问", "chosen": "好答", "rejected": "坏答"},
    {"conversations": [{"from": "human", "value": "问"}], "chosen": {"from": "gpt", "value": "好答"},
     "rejected": {"from": "gpt", "value": "坏答"}},
    {"prompt": [{"role": "user", "content": "问"}], "chosen": [{"role": "assistant", "content": "好答"}],
     "rejected": [{"role": "assistant", "content": "坏答"}]},
    {"chosen": [{"role": "user", "content": "问"}, {"role": "assistant", "content": "好答"}],
     "rejected": [{"role": "user", "content": "问"}, {"role": "assistant", "content": "坏答"}]},
    {"messages": [{"role": "user", "content": "问"}, {"role": "assistant", "content": "好答"}], "label": True},
    {"prompt": "问", "completion": "好答", "label": True},
])
def test_format_chosen_trains_the_chosen_answer(record):
    conv = parse_record(record, "chosen")
    assert [(m.role, m.content) for m in conv.messages] == [("user", "问"), ("assistant", "好答")]


def test_format_chosen_never_trains_a_kto_label_false():
    from data_pipeline.errors import SampleExcluded

    with pytest.raises(SampleExcluded) as err:
        parse_record({"prompt": "问", "completion": "坏答", "label": False}, "chosen")
    assert err.value.reason == "kto_label_false"


def test_content_parts_are_read_under_text_value_or_content():
    parts = [{"type": "text", "value": "你"}, {"type": "text", "text": "好"}]
    record = {"conversations": [{"from": "human", "value": parts},
                                {"from": "gpt", "value": [{"type": "text", "content": "嗯"}]}]}
    conv = parse_record(record, "sharegpt")
    assert [m.content for m in conv.messages] == ["你好", "嗯"]
    with pytest.raises(DataError) as err:
        parse_record({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]},
                                   {"role": "assistant", "content": "a"}]}, "messages")
    assert err.value.reason == "non_text_content" and err.value.field == "messages[0].content[0].type"


@pytest.mark.parametrize("record, field", [
    ({"conversations": [{"from": "human", "valu": "问"}, {"from": "gpt", "value": "答"}]}, "conversations[0].value"),
    ({"conversations": [{"from": "human"}, {"from": "gpt", "value": "答"}]}, "conversations[0].value"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "答"}]}, "messages[0].content"),
    ({"conversations": [{"role": "user", "content": "问"}, {"from": "gpt", "value": "答"}]}, "conversations[0].from"),
])
def test_a_missing_or_misspelt_prompt_is_an_error_naming_the_files_own_key(record, field):
    """Before, a misspelt `value` became an empty prompt, even in strict mode; ShareGPT's `from`
    was reported as `role`."""
    with pytest.raises(DataError) as err:
        parse_record(record, "sharegpt" if "conversations" in record else "messages")
    assert err.value.field == field and err.value.reason == "missing_field"


@pytest.mark.parametrize("record, field", [
    ({"conversations": [{"from": "human", "value": "q"},
                        {"from": "function_call", "value": '{"name": "f", "arguments": ' + '{"a": ' * 5000 + "1"
                         + "}" * 5000 + "}"}]}, "conversations[1].value"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
      "tools": "[" * 5000 + "]" * 5000}, "tools"),
])
def test_json_nested_too_deeply_inside_a_string_field_names_the_field(record, field):
    with pytest.raises(DataError) as err:
        parse_record(record, "sharegpt")
    assert err.value.reason == "too_deep" and err.value.field == field
