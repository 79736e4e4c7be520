"""Readers against real users' files: byte order marks, JSON arrays under a .jsonl name, bad bytes
and broken elements inside arrays (named by file, line and index), corrupt compressed files."""

from __future__ import annotations

import gzip
import json
import pickle
from pathlib import Path

import pytest
import zstandard

from data_pipeline.errors import DataError, FieldError, MalformedInputError
from data_pipeline.prepare import prepare_sources
from data_pipeline.ingest.readers import decode_payload, iter_records
from data_pipeline.spec import DataConfig, SourceSpec

BOM = b"\xef\xbb\xbf"
RECORDS = [{"instruction": f"问题{i}", "output": f"回答{i}"} for i in range(50)]


def values(path: Path) -> list:
    """(line, index, value or error text) of every record of the file."""
    out = []
    for record in iter_records([str(path)]):
        try:
            out.append((record.line, record.index, decode_payload(record)))
        except DataError as err:
            out.append((record.line, record.index, str(err)))
    return out


@pytest.mark.parametrize("name, data", [
    ("a.json", BOM + json.dumps(RECORDS, ensure_ascii=False, indent=2).encode()),
    ("a.jsonl", BOM + "\n".join(json.dumps(r, ensure_ascii=False) for r in RECORDS).encode()),
    ("a.json.gz", gzip.compress(BOM + json.dumps(RECORDS, ensure_ascii=False).encode())),
])
def test_utf8_bom_is_accepted(tmp_path, name, data):
    (tmp_path / name).write_bytes(data)
    assert [v for _, _, v in values(tmp_path / name)] == RECORDS


def test_bom_is_never_trained_as_text(tmp_path, tiny_tokenizer):
    (tmp_path / "doc.txt").write_bytes(BOM + "第一篇\n第二篇\n".encode())
    assert [v for _, _, v in values(tmp_path / "doc.txt")] == ["第一篇", "第二篇"]
    cfg = DataConfig(sources=[SourceSpec(name="d", path=str(tmp_path / "doc.txt"))])
    (source,) = prepare_sources(cfg, tiny_tokenizer, tmp_path / "out", show_progress=False)
    assert "\ufeff" not in tiny_tokenizer.decode(source.get(0)[0].tolist())


def test_a_utf16_file_is_named_not_garbled(tmp_path):
    (tmp_path / "u.jsonl").write_bytes(json.dumps(RECORDS[0]).encode("utf-16"))
    with pytest.raises(MalformedInputError, match=r"u\.jsonl:1: the file is UTF-16 encoded"):
        values(tmp_path / "u.jsonl")


@pytest.mark.parametrize("indent", [None, 2])
def test_a_json_array_saved_as_jsonl_is_read_as_an_array(tmp_path, indent):
    (tmp_path / "a.jsonl").write_text(json.dumps(RECORDS, ensure_ascii=False, indent=indent), encoding="utf-8")
    read = values(tmp_path / "a.jsonl")
    assert [v for _, _, v in read] == RECORDS
    assert [index for _, index, _ in read] == list(range(50))


def test_a_bad_byte_in_a_one_line_array_names_file_line_and_index(tmp_path):
    data = json.dumps(RECORDS, ensure_ascii=False).encode().replace("问题37".encode(), b"\xff37")
    (tmp_path / "one.json").write_bytes(data)
    read = values(tmp_path / "one.json")
    assert len(read) == 50  # the rest of the array is still read
    line, index, error = read[37]
    assert (line, index) == (1, 37) and "one.json:1 [item 37]" in error and "invalid_utf8" in error
    assert all(isinstance(v, dict) for i, (_, _, v) in enumerate(read) if i != 37)


def test_a_broken_element_names_its_index_and_reading_resumes(tmp_path):
    pretty = json.dumps(RECORDS, ensure_ascii=False, indent=2)
    broken = pretty.replace('"instruction": "问题20"', '"instruction" "问题20"')
    (tmp_path / "p.json").write_text(broken, encoding="utf-8")
    read = values(tmp_path / "p.json")
    assert len(read) == 50 and read[20][1] == 20 and "[item 20]" in read[20][2] and "malformed_json" in read[20][2]
    assert read[21][2] == RECORDS[21] and read[21][1] == 21
    one_line = json.dumps(RECORDS, ensure_ascii=False).replace('"output": "回答5"', '"output" "回答5"')
    (tmp_path / "o.json").write_text(one_line, encoding="utf-8")
    read = values(tmp_path / "o.json")
    assert len(read) == 50 and "o.json:1 [item 5]" in read[5][2] and read[6][2] == RECORDS[6]


def test_a_truncated_array_is_an_error_naming_the_place(tmp_path):
    pretty = json.dumps(RECORDS, ensure_ascii=False, indent=2)
    (tmp_path / "t.json").write_text(pretty[: len(pretty) // 2], encoding="utf-8")
    with pytest.raises(MalformedInputError, match=r"t\.json:\d+ \[item \d+\].*cannot be read past this point"):
        values(tmp_path / "t.json")


def test_two_arrays_in_one_file_are_not_silently_half_read(tmp_path):
    (tmp_path / "two.json").write_text(json.dumps(RECORDS[:2]) + "\n" + json.dumps(RECORDS[2:4]))
    with pytest.raises(MalformedInputError, match="after the end of the JSON array"):
        values(tmp_path / "two.json")


def test_deep_nesting_is_a_bad_record_not_a_crash(tmp_path):
    deep = "[" * 200_000 + "]" * 200_000
    (tmp_path / "d.jsonl").write_text(deep + "\n" + json.dumps(RECORDS[0]) + "\n")
    read = values(tmp_path / "d.jsonl")
    assert "nested too deeply" in read[0][2] and read[1][2] == RECORDS[0]


@pytest.mark.parametrize("name, data", [
    ("x.jsonl.gz", b"not gzip at all"),
    ("x.jsonl.gz", gzip.compress(b'{"a": 1}\n' * 1000)[:25]),
    ("x.jsonl.zst", b"not zstd at all"),
    ("x.jsonl.zst", zstandard.ZstdCompressor().compress(b'{"a": 1}\n' * 100_000)[:40]),
])
def test_corrupt_or_truncated_compressed_file_is_named(tmp_path, name, data):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(MalformedInputError) as err:
        values(tmp_path / name)
    assert err.value.file.endswith(name) and err.value.reason == "unreadable_file"


def test_errors_with_an_index_pickle_and_locate():
    err = FieldError("required field 'output' is missing", field="output", reason="missing_field")
    located = err.located("f.json", 1, 37)
    assert str(located) == "f.json:1 [item 37] field 'output': required field 'output' is missing [missing_field]"
    copy = pickle.loads(pickle.dumps(located))
    assert type(copy) is FieldError and copy.index == 37 and str(copy) == str(located)
    assert str(FieldError("no location", reason="x")) == "no location [x]"  # no "<input>"


def test_skip_examples_from_an_array_carry_the_index(tmp_path, tiny_tokenizer):
    records = [dict(r) for r in RECORDS]
    del records[37]["output"]
    (tmp_path / "one.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    cfg = DataConfig(sources=[SourceSpec(name="a", path=str(tmp_path / "one.json"))], template="chatml")
    (source,) = prepare_sources(cfg, tiny_tokenizer, tmp_path / "out", show_progress=False)
    (example,) = source.manifest["skip_examples"]
    assert (example["line"], example["index"], example["field"]) == (1, 37, "output")
    cfg.on_error = "strict"
    with pytest.raises(DataError, match=r"one\.json:1 \[item 37\] field 'output'"):
        prepare_sources(cfg, tiny_tokenizer, tmp_path / "strict", show_progress=False)


def test_a_bom_inside_an_array_or_between_concatenated_files(tmp_path):
    elements = [json.dumps(r, ensure_ascii=False) for r in RECORDS[:5]]
    elements[3] = "\ufeff" + elements[3]  # e.g. a text editor's save of one pasted element
    (tmp_path / "a.json").write_text("[\n  " + ",\n  ".join(elements) + "\n]", encoding="utf-8")
    read = values(tmp_path / "a.json")
    assert len(read) == 5 and read[3][:2] == (5, 3) and "a.json:5 [item 3]" in read[3][2] and read[4][2] == RECORDS[4]
    one = "\n".join(json.dumps(r, ensure_ascii=False) for r in RECORDS[:2]).encode()
    (tmp_path / "cat.jsonl").write_bytes(BOM + one + b"\n" + BOM + one)  # cat a.jsonl b.jsonl
    assert [v for _, _, v in values(tmp_path / "cat.jsonl")] == RECORDS[:2] * 2


def test_an_array_that_cannot_be_resumed_is_not_silently_half_read(tmp_path):
    """After a broken element, the next ones start differently (other key order): no place to resume
    is found, and later elements plainly exist, so the file is an error, not 2 records of 40."""
    elements = [json.dumps(r, ensure_ascii=False) for r in RECORDS[:2]] + ['{"instruction" "坏"}']
    elements += [json.dumps({"output": r["output"], "instruction": r["instruction"]}, ensure_ascii=False)
                 for r in RECORDS[3:40]]
    (tmp_path / "mixed.json").write_text("[" + ", ".join(elements) + "]", encoding="utf-8")
    with pytest.raises(MalformedInputError, match=r"mixed\.json:1 \[item 2\].*cannot be read past this point"):
        values(tmp_path / "mixed.json")
    (tmp_path / "last.json").write_text("[" + ", ".join(elements[:3]) + "]", encoding="utf-8")
    read = values(tmp_path / "last.json")  # the broken element is the last one: one bad record
    assert len(read) == 3 and "[item 2]" in read[2][2] and "last element" in read[2][2]
