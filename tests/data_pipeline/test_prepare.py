"""prepare_sources / open_prepared / the CLI: real data, idempotence, kill-safety, bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import data_pipeline.prepare as prepare_mod
from data_pipeline.errors import DataError, PreparedDataError
from data_pipeline.prepare import main as prepare_cli
from data_pipeline.prepare import parse_source_arg, prepare_source, prepare_sources
from data_pipeline.shards import open_prepared
from data_pipeline.spec import DataConfig, DataConfigError, SourceSpec
from tests.data_pipeline.mask_check import assert_trained_text


def alpaca_records(n: int) -> list[dict]:
    return [{"instruction": f"问题{i}：你好", "input": "补充" if i % 3 == 0 else "", "output": f"回答{i} 😀"}
            for i in range(n)]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", encoding="utf-8")
    return path


def config(path: Path, name: str = "a", **kw) -> DataConfig:
    kw.setdefault("template", "chatml")
    return DataConfig(sources=[SourceSpec(name=name, path=str(path))], **kw)


def test_shared_data_prepares_and_masks_decode(shared_data, shared_tokenizer, tmp_path):
    cfg = DataConfig(sources=[SourceSpec(name="alpaca", path=str(shared_data / "alpaca_zh_demo.json")),
                              SourceSpec(name="glaive", path=str(shared_data / "glaive_toolcall_zh_demo.json"))],
                     seq_len=4096, num_proc=2)
    alpaca, glaive = prepare_sources(cfg, shared_tokenizer, tmp_path, show_progress=False)
    raw = json.loads((shared_data / "alpaca_zh_demo.json").read_text(encoding="utf-8"))
    assert len(alpaca) == len(raw) == alpaca.manifest["counts"]["samples"]
    for i in range(0, len(raw), 7):
        ids, labels = alpaca.get(i)
        assert_trained_text(shared_tokenizer.decode, ids, labels != -100, [raw[i]["output"].lstrip("\n") + "<|im_end|>"])
        prompt = raw[i]["instruction"] + ("\n" + raw[i]["input"] if raw[i]["input"] else "")
        chat = [{"role": "user", "content": prompt}, {"role": "assistant", "content": raw[i]["output"]}]
        reference = shared_tokenizer.apply_chat_template(chat, tokenize=False)
        assert ids.tolist() == shared_tokenizer(reference, add_special_tokens=False)["input_ids"]
        assert isinstance(alpaca.lengths, np.memmap)
    manifest = glaive.manifest
    assert manifest["counts"]["records"] == 300
    assert manifest["counts"]["samples"] + sum(manifest["skips"].values()) == 300
    assert all(ex["line"] and ex["file"].endswith("glaive_toolcall_zh_demo.json") for ex in manifest["skip_examples"])
    for i in range(len(glaive)):
        ids, labels = glaive.get(i)
        trained = shared_tokenizer.decode(ids[labels != -100].tolist())
        assert "<|im_start|>" not in trained and "<tool_response>" not in trained and "<think>" not in trained
        assert trained.endswith("<|im_end|>")
    assert [s.name for s in open_prepared(cfg, shared_tokenizer, tmp_path)] == ["alpaca", "glaive"]


def test_rerun_reuses_and_setting_change_rebuilds(tiny_tokenizer, tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", alpaca_records(50))
    cfg = config(src)
    _, first = prepare_source(cfg.sources[0], cfg, tiny_tokenizer, tmp_path / "out", show_progress=False)
    manifest_file = tmp_path / "out" / "a" / "manifest.json"
    stamp = manifest_file.stat().st_mtime_ns
    _, second = prepare_source(cfg.sources[0], cfg, tiny_tokenizer, tmp_path / "out", show_progress=False)
    assert not first.reused and second.reused and "reused" in second.lines()[0]
    assert manifest_file.stat().st_mtime_ns == stamp
    cfg.seq_len = 512
    _, third = prepare_source(cfg.sources[0], cfg, tiny_tokenizer, tmp_path / "out", show_progress=False)
    assert not third.reused
    write_jsonl(src, alpaca_records(51))
    _, fourth = prepare_source(cfg.sources[0], cfg, tiny_tokenizer, tmp_path / "out", show_progress=False)
    assert not fourth.reused and fourth.samples == 51


def test_source_train_on_overrides_the_data_config(tiny_tokenizer, tmp_path):
    """Replay: a chat source keeps its prompt masked inside a stage that trains on everything."""
    src = write_jsonl(tmp_path / "a.jsonl", alpaca_records(6))
    cfg = DataConfig(sources=[SourceSpec(name="chat_everything", path=str(src)),
                              SourceSpec(name="chat_replay", path=str(src), train_on="all_assistant")],
                     template="chatml", train_on="everything")
    everything, replay = prepare_sources(cfg, tiny_tokenizer, tmp_path / "out", show_progress=False)
    for i in range(6):
        ids, labels = everything.get(i)
        assert (labels == ids).all()
        ids, labels = replay.get(i)
        assert_trained_text(tiny_tokenizer.decode, ids, labels != -100, [f"回答{i} 😀<|im_end|>"])
    assert replay.manifest["settings"]["train_on"] == "all_assistant"
    # The source's own setting is part of what decides reuse: changing it rebuilds that source only.
    cfg.sources[1].train_on = "everything"
    _, replay_report = prepare_source(cfg.sources[1], cfg, tiny_tokenizer, tmp_path / "out", show_progress=False)
    _, everything_report = prepare_source(cfg.sources[0], cfg, tiny_tokenizer, tmp_path / "out", show_progress=False)
    assert not replay_report.reused and everything_report.reused


def test_source_train_on_is_validated():
    spec = SourceSpec(name="a", path="x.jsonl", train_on="responses")
    with pytest.raises(DataConfigError, match=r"sources\[0\]\.train_on: 'responses'"):
        DataConfig(sources=[spec]).validate()


def test_partial_output_is_never_read_as_valid(tiny_tokenizer, tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", alpaca_records(20))
    cfg = config(src)
    out = tmp_path / "out"
    (out / "a").mkdir(parents=True)
    (out / "a" / "tokens-00000.bin").write_bytes(b"\0" * 10)  # a half-written folder without manifest
    (out / "a" / "manifest.json").write_text('{"complete": false}')
    stale = out / f".tmp-a-{os.uname().nodename}-999999999-dead"
    stale.mkdir()
    with pytest.raises(PreparedDataError, match="manifest"):
        open_prepared(cfg, tiny_tokenizer, out)
    prepare_sources(cfg, tiny_tokenizer, out, show_progress=False)
    assert len(open_prepared(cfg, tiny_tokenizer, out)[0]) == 20
    assert not stale.exists()


def test_failed_run_leaves_no_valid_looking_output(tiny_tokenizer, tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", alpaca_records(5) + [{"instruction": "x"}])
    cfg = config(src, on_error="strict")
    with pytest.raises(DataError):
        prepare_sources(cfg, tiny_tokenizer, tmp_path / "out", show_progress=False)
    assert list((tmp_path / "out").iterdir()) == []


def test_open_prepared_refuses_other_tokenizer(tiny_tokenizer, shared_tokenizer, tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", alpaca_records(5))
    cfg = config(src)
    prepare_sources(cfg, tiny_tokenizer, tmp_path, show_progress=False)
    with pytest.raises(PreparedDataError) as err:
        open_prepared(cfg, shared_tokenizer, tmp_path)
    assert err.value.reason == "tokenizer_mismatch" and "'a'" in str(err.value)
    cfg.train_on = "last_assistant"
    with pytest.raises(PreparedDataError, match="train_on"):
        open_prepared(cfg, tiny_tokenizer, tmp_path)


def test_same_result_with_any_number_of_processes(tiny_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_mod, "CHUNK_RECORDS", 16)  # several shards
    records = alpaca_records(60)
    records[17] = {"instruction": "坏", "output": ""}
    src = write_jsonl(tmp_path / "a.jsonl", records)
    results = []
    for num_proc in (1, 2):
        cfg = config(src, num_proc=num_proc)
        (source,) = prepare_sources(cfg, tiny_tokenizer, tmp_path / f"p{num_proc}", show_progress=False)
        results.append([np.concatenate(source.get(i)).tolist() for i in range(len(source))])
        assert len(source) == 59 and len(source.manifest["shards"]) == 4
        assert source.manifest["skips"] == {"empty_response": 1}
        assert source.manifest["skip_examples"][0]["line"] == 18
    assert results[0] == results[1]


def test_corrupted_copy_strict_names_line_skip_counts(shared_data, shared_tokenizer, tmp_path, capsys):
    lines = (shared_data / "glaive_toolcall_zh_demo.json").read_text(encoding="utf-8").split("\n")
    broken_line = 39  # a "value": ... line; dropping its first quote breaks the JSON
    lines[broken_line - 1] = lines[broken_line - 1].replace('"', "", 1)
    bad = tmp_path / "glaive_bad.json"
    bad.write_text("\n".join(lines), encoding="utf-8")
    args = ["--source", f"g={bad}:sharegpt", "--tokenizer", str(shared_data / "tokenizer-zh-6400"), "--quiet"]
    assert prepare_cli(args + ["--out", str(tmp_path / "s"), "--on-error", "strict"]) == 2
    err = capsys.readouterr().err
    assert f"glaive_bad.json:{broken_line}" in err and "Traceback" not in err
    assert prepare_cli(args + ["--out", str(tmp_path / "k"), "--on-error", "skip"]) == 0
    out = capsys.readouterr().out
    assert "malformed_json=1" in out and f"glaive_bad.json:{broken_line}" in out


def test_source_argument_parsing():
    assert parse_source_arg("x=memory://a/b.jsonl").path == "memory://a/b.jsonl"
    spec = parse_source_arg("x=file:///d/f.json:sharegpt")
    assert (spec.path, spec.format) == ("file:///d/f.json", "sharegpt")
    with pytest.raises(ValueError, match="NAME=PATH"):
        parse_source_arg("no_equals_sign")
