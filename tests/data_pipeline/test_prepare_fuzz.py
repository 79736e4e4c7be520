"""Fuzz: 10,000+ corrupted records (seeded, so every run sees the same ones) through prepare in both
error modes. Whatever the damage, prepare raises only DataError subclasses; every strict error
names file and line (and the index inside a JSON array); in skip mode kept + skipped == records."""

from __future__ import annotations

import copy
import gzip
import json
import random
from pathlib import Path

import pytest

import data_pipeline.prepare as prepare_mod
from data_pipeline.errors import DataError
from data_pipeline.prepare import prepare_sources
from data_pipeline.ingest.readers import iter_records, list_files
from data_pipeline.spec import DataConfig, SourceSpec
from data_pipeline.store.tokenize_chunk import ChunkTokenizer

SEED = 20240601
RECORDS_PER_FILE = 2200

BASES = {
    "alpaca": [
        {"instruction": "把这句话翻译成英文", "input": "今天天气很好。", "output": "The weather is nice today."},
        {"instruction": "写一首诗", "output": "床前明月光 😀", "system": "你是诗人", "history": [["你好", "你好！"]]},
    ],
    "sharegpt": [
        {"conversations": [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "你好！有什么可以帮你？"}]},
        {"conversations": [{"from": "system", "value": "工具助手"}, {"from": "human", "value": "查天气"},
                           {"from": "function_call",
                            "value": "{\"name\": \"weather\", \"arguments\": {\"city\": \"北京\"}}"},
                           {"from": "observation", "value": "{\"temp\": 20}"}, {"from": "gpt", "value": "20 度。"}],
         "tools": "[{\"name\": \"weather\", \"parameters\": {}}]"},
    ],
    "messages": [
        {"messages": [{"role": "system", "content": "简洁"}, {"role": "user", "content": "1+1?"},
                      {"role": "assistant", "content": "2"}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "查一下"}]},
                      {"role": "assistant", "content": None, "tool_calls": [
                          {"type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}}]},
                      {"role": "tool", "content": "ok"}, {"role": "assistant", "content": "好了"}],
         "tools": [{"type": "function", "function": {"name": "f"}}]},
    ],
}
ODD_VALUES = [0, -1, 3.5, None, True, False, [], {}, "", " ", [1, 2], {"a": 1}, ["x"], "\x00", "\u202e", "NaN"]
DEEP = "\x00DEEP\x00"


def _paths(value, path=()):
    """Every (container, key) inside a record, for picking what to damage."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        yield value, key
        yield from _paths(item, path + (key,))


def _damage_value(record, rng: random.Random):
    """A record with one field damaged: type swapped, removed, renamed, an unknown role, a huge or
    invalid string, deep nesting; returned as a value (DEEP marks where deep nesting goes)."""
    record = copy.deepcopy(record)
    spots = list(_paths(record))
    container, key = rng.choice(spots)
    kind = rng.randrange(9)
    if kind == 0:
        container[key] = rng.choice(ODD_VALUES)
    elif kind == 1 and isinstance(container, dict):
        del container[key]
    elif kind == 2 and isinstance(container, dict):
        container[key[::-1] if len(key) > 1 else key + "x"] = container.pop(key)  # misspelt key
    elif kind == 3:
        for c, k in spots:
            if k in ("from", "role"):
                c[k] = rng.choice(["alien", "GPT", "Human", "", "assistant ", "function", "developer", "bot"])
                break
    elif kind == 4:
        container[key] = DEEP
    elif kind == 5:
        container[key] = rng.choice(["字", "ab ", "😀", "\n"]) * (30_000 if rng.random() < 0.02 else 1_000)
    elif kind == 6:
        container[key] = "坏\ud800字" if rng.random() < 0.5 else "\udfff"  # lone surrogates
    elif kind == 7:
        for c, k in spots:
            if k in ("value", "content") and isinstance(c[k], str):
                c[k] = [{"type": "text", "value": c[k]}] if rng.random() < 0.5 else [{"text": 1}]
                break
    else:
        record = rng.choice([None, [], "just a string", 42, [record], {"wrapped": record}, {}])
    return record


def _serialise(value, rng: random.Random) -> bytes:
    text = json.dumps(value, ensure_ascii=rng.random() < 0.3)
    if '"\\u0000DEEP\\u0000"' in text:  # control characters are always escaped
        depth = 100_000 if rng.random() < 0.01 else rng.choice([50, 900, 5_000])
        opening = rng.choice(["[", '{"a":'])
        closing = "]" if opening == "[" else "}"
        text = text.replace('"\\u0000DEEP\\u0000"', opening * depth + "1" + closing * depth)
    return text.encode("utf-8", "surrogatepass")  # a raw lone surrogate is one more kind of invalid UTF-8


def _damage_bytes(line: bytes, rng: random.Random) -> bytes:
    kind = rng.randrange(5)
    pos = rng.randrange(len(line))
    if kind == 0:
        return line[:pos]  # truncated
    if kind == 1:
        return line[:pos] + bytes([rng.randrange(256)]) + line[pos + 1:]  # one byte flipped
    if kind == 2:
        return line[:pos] + rng.choice([b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xe4\xbd"]) + line[pos:]
    if kind == 3:
        return line[:pos] + rng.choice([b"NaN", b"Infinity", b",", b"}", b"\\", b'"']) + line[pos:]
    return line.replace(b'"', b"'", 1)


DAMAGED: list[int] = []
"""1 per damaged, 0 per intact record the fixture wrote (intact ones are mixed in, as in real files)."""


def fuzz_lines(fmt: str, n: int, rng: random.Random) -> list[bytes]:
    lines = []
    for _ in range(n):
        base = rng.choice(BASES[fmt])
        roll = rng.random()
        if roll < 0.12:
            lines.append(_serialise(base, rng))  # intact
            DAMAGED.append(0)
            continue
        if roll < 0.6:
            lines.append(_serialise(_damage_value(base, rng), rng))
        else:
            lines.append(_damage_bytes(_serialise(base, rng), rng))
        DAMAGED.append(1)
    return lines


def fuzz_array_elements(fmt: str, n: int, rng: random.Random) -> list[bytes]:
    """Elements for a JSON array: damaged values, and bad bytes inside strings (a broken element
    must not take the rest of the array with it)."""
    out = []
    for _ in range(n):
        damaged = rng.random() < 0.88
        value = _damage_value(rng.choice(BASES[fmt]), rng) if damaged else rng.choice(BASES[fmt])
        text = _serialise(value, rng)
        if damaged and rng.random() < 0.1 and b'": "' in text:
            text = text.replace(b'": "', b'": "\xff', 1)
        out.append(text)
        DAMAGED.append(int(damaged))
    return out


@pytest.fixture(scope="module")
def fuzz_files(tmp_path_factory) -> list[tuple[Path, str]]:
    rng = random.Random(SEED)
    DAMAGED.clear()
    folder = tmp_path_factory.mktemp("fuzz")
    files = []
    for fmt in BASES:
        path = folder / f"{fmt}.jsonl"
        path.write_bytes(b"\n".join(fuzz_lines(fmt, RECORDS_PER_FILE, rng)))
        files.append((path, fmt))
    one_line = folder / "alpaca_one_line.json"
    one_line.write_bytes(b"[" + b", ".join(fuzz_array_elements("alpaca", 2000, rng)) + b"]")
    files.append((one_line, "alpaca"))
    pretty = folder / "messages_pretty.json"
    pretty.write_bytes(b"[\n  " + b",\n  ".join(fuzz_array_elements("messages", 2000, rng)) + b"\n]\n")
    files.append((pretty, "messages"))
    packed = folder / "sharegpt.jsonl.gz"
    packed.write_bytes(gzip.compress(b"\n".join(fuzz_lines("sharegpt", 1500, rng))))
    files.append((packed, "sharegpt"))
    auto = folder / "mixed_auto.jsonl"
    auto.write_bytes(b"\n".join(fuzz_lines(rng.choice(list(BASES)), 800, rng)))
    files.append((auto, "auto"))
    return files


def test_there_are_enough_corrupted_records(fuzz_files):
    assert sum(DAMAGED) >= 10_000
    total = sum(1 for path, _ in fuzz_files for _ in iter_records(list_files(str(path))))
    assert total >= 0.98 * len(DAMAGED)  # nearly every written record is read back as one record


def _config(path: Path, fmt: str, on_error: str) -> DataConfig:
    return DataConfig(sources=[SourceSpec(name="fuzz", path=str(path), format=fmt)], template="chatml", seq_len=256,
                      on_error=on_error, num_proc=1, max_skip_fraction=1.0)


def test_skip_mode_counts_every_record(fuzz_files, tiny_tokenizer, tmp_path):
    for path, fmt in fuzz_files:
        read = sum(1 for _ in iter_records(list_files(str(path))))
        (source,) = prepare_sources(_config(path, fmt, "skip"), tiny_tokenizer, tmp_path / path.name,
                                    show_progress=False)
        counts, skips = source.manifest["counts"], source.manifest["skips"]
        assert counts["records"] == read, path.name
        assert counts["kept_records"] + sum(skips.values()) == read, path.name
        assert 0 < counts["samples"] and len(source) == counts["samples"]
        for example in source.manifest["skip_examples"]:
            assert example["file"] == str(path) and example["line"] >= 1
            assert (example["index"] is not None) == path.name.endswith(".json"), example


def test_skip_mode_over_the_threshold_is_a_data_error(fuzz_files, tiny_tokenizer, tmp_path):
    path, fmt = fuzz_files[0]
    cfg = _config(path, fmt, "skip")
    cfg.max_skip_fraction = 0.1
    with pytest.raises(DataError, match="max_skip_fraction"):
        prepare_sources(cfg, tiny_tokenizer, tmp_path, show_progress=False)


def test_strict_mode_names_file_and_line_of_every_bad_record(fuzz_files, tiny_tokenizer, tmp_path):
    """Each record alone through a strict worker: it trains, or it raises a DataError that says
    where it is. The whole file through strict prepare stops at the first one, located too."""
    crashes = []
    for path, fmt in fuzz_files:
        cfg = _config(path, fmt, "strict")
        with pytest.raises(DataError) as err:
            prepare_sources(cfg, tiny_tokenizer, tmp_path / path.name, show_progress=False)
        assert err.value.file == str(path) and err.value.line >= 1
        assert (err.value.index is not None) == path.name.endswith(".json")
        build = prepare_mod._plan(cfg.sources[0], cfg, tiny_tokenizer, tmp_path / f"{path.name}-one", "data.sources[0]")
        worker = ChunkTokenizer(build.job, "fuzz")
        for record in build.records:
            try:
                worker.run(0, [record])
            except DataError as e:
                assert e.file == str(path) and e.line == record.line, (e, record)
                assert e.index == record.index and (e.index is not None) == path.name.endswith(".json")
            except Exception as e:  # collected, so that one run shows every crashing record
                crashes.append(f"{path.name}:{record.line}: {type(e).__name__}: {e} <- {str(record.payload)[:300]}")
    assert not crashes, "\n".join(crashes[:10])


def _deep_json_text(depth: int) -> str:
    return '{"a": ' * depth + "1" + "}" * depth


DEEP_INSIDE_TEXT = [  # JSON held in a string field, parsed by the record parser itself (RecursionError there)
    ("sharegpt", {"conversations": [{"from": "human", "value": "q"},
                                    {"from": "function_call", "value": '{"name": "f", "arguments": '
                                     + _deep_json_text(5_000) + "}"},
                                    {"from": "observation", "value": "r"}, {"from": "gpt", "value": "ok"}]}),
    ("sharegpt", {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
                  "tools": "[" + _deep_json_text(5_000) + "]"}),
]


@pytest.mark.parametrize("fmt, record", DEEP_INSIDE_TEXT)
def test_deep_nesting_inside_a_json_text_field_is_a_bad_record(fmt, record, tiny_tokenizer, tmp_path):
    path = tmp_path / "deep.jsonl"
    path.write_text(json.dumps(record) + "\n" + json.dumps(BASES[fmt][0]) + "\n")
    cfg = _config(path, fmt, "skip")
    (source,) = prepare_sources(cfg, tiny_tokenizer, tmp_path / "out", show_progress=False)
    assert len(source) == 1 and source.manifest["skip_examples"][0]["line"] == 1
