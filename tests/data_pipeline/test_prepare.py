"""prepare_sources / open_prepared / the CLI: real data, idempotence, kill-safety, bad input."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest
import zstandard

import data_pipeline.prepare as prepare_mod
from data_pipeline.errors import DataError, PreparedDataError
from data_pipeline.prepare import main as prepare_cli
from data_pipeline.prepare import parse_source_arg, prepare_source, prepare_sources
from data_pipeline.store.shards import open_prepared
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


# ----------------------------------------------------------------------------- whole-source checks

def test_a_source_that_keeps_nothing_is_an_error_in_both_modes(tiny_tokenizer, tmp_path):
    """Wrong format: every record skipped. Before, prepare said "0 samples kept" and the run crashed later."""
    src = write_jsonl(tmp_path / "chat.jsonl", [{"conversations": [{"from": "human", "value": "x"}]}] * 5)
    cfg = DataConfig(sources=[SourceSpec(name="chat", path=str(src), format="alpaca")], template="chatml",
                     on_error="skip", max_skip_fraction=1.0)
    with pytest.raises(DataError) as err:
        prepare_sources(cfg, tiny_tokenizer, tmp_path / "skip", show_progress=False)
    text = str(err.value)
    assert "'chat'" in text and "chat.jsonl" in text and "data.sources[0]" in text
    assert "no sample kept of its 5 records" in text and "missing_field=5" in text and "format alpaca" in text
    assert not any((tmp_path / "skip").iterdir())  # no temp folder, no half-valid output
    cfg.on_error = "strict"
    with pytest.raises(DataError, match=r"chat\.jsonl:1 field 'instruction'"):
        prepare_sources(cfg, tiny_tokenizer, tmp_path / "strict", show_progress=False)
    # Strict mode keeps going past declared exclusions; a source of nothing else is still empty.
    kto = write_jsonl(tmp_path / "kto.jsonl", [{"instruction": "q", "output": "a", "label": False}] * 3)
    cfg = DataConfig(sources=[SourceSpec(name="kto", path=str(kto), format="chosen")], template="chatml",
                     on_error="strict")
    with pytest.raises(DataError, match=r"source 'kto' \(data\.sources\[0\]\): no sample kept of its 3 records"):
        prepare_sources(cfg, tiny_tokenizer, tmp_path / "kto", show_progress=False)


def test_declared_exclusions_do_not_count_as_skipped(tiny_tokenizer, tmp_path):
    records = [{"instruction": f"q{i}", "output": "a", "label": i < 2} for i in range(10)]
    cfg = DataConfig(sources=[SourceSpec(name="kto", path=str(write_jsonl(tmp_path / "k.jsonl", records)),
                                         format="chosen")], template="chatml")
    (source,) = prepare_sources(cfg, tiny_tokenizer, tmp_path / "out", show_progress=False)
    assert len(source) == 2 and source.manifest["counts"]["excluded"] == 8
    _, report = prepare_source(cfg.sources[0], cfg, tiny_tokenizer, tmp_path / "out", show_progress=False)
    assert "2 kept, 8 skipped (8 of them excluded by rule) -> 2 samples" in report.lines()[0]


def test_skipping_more_than_max_skip_fraction_is_an_error(tiny_tokenizer, tmp_path, capsys):
    records = alpaca_records(10)
    for i in range(6):
        records[i] = {"instruction": "坏"}
    src = write_jsonl(tmp_path / "a.jsonl", records)
    cfg = config(src)
    assert cfg.max_skip_fraction == 0.5
    with pytest.raises(DataError, match=r"6 of 10 records skipped \(60.0%\), more than data.max_skip_fraction=0.5"):
        prepare_sources(cfg, tiny_tokenizer, tmp_path / "out", show_progress=False)
    cfg.max_skip_fraction = 0.7
    (source,) = prepare_sources(cfg, tiny_tokenizer, tmp_path / "out", show_progress=False)
    assert len(source) == 4
    cfg.max_skip_fraction = 0.5  # a reused folder is checked against the current threshold too
    with pytest.raises(DataError, match="max_skip_fraction"):
        prepare_sources(cfg, tiny_tokenizer, tmp_path / "out", show_progress=False)
    args = ["--source", f"a={src}", "--tokenizer", str(_saved_tokenizer(tiny_tokenizer, tmp_path)), "--quiet",
            "--template", "chatml", "--out", str(tmp_path / "cli")]
    assert prepare_cli(args) == 2
    assert "max_skip_fraction" in capsys.readouterr().err
    assert prepare_cli(args + ["--max-skip-fraction", "0.6"]) == 0


@pytest.mark.parametrize("value", [-0.1, 1.5, "0.5", True, float("nan")])
def test_max_skip_fraction_is_validated(value):
    with pytest.raises(DataConfigError, match=r"data\.max_skip_fraction"):
        DataConfig(sources=[SourceSpec(name="a", path="x.jsonl")], max_skip_fraction=value).validate()


@pytest.mark.parametrize("name, fmt", [("empty.jsonl", "alpaca"), ("blank.json", "auto"), ("empty.txt", "text"),
                                       ("empty.jsonl.gz", "auto")])
@pytest.mark.parametrize("on_error", ["skip", "strict"])
def test_an_empty_file_is_an_error(tiny_tokenizer, tmp_path, name, fmt, on_error):
    path = tmp_path / name
    path.write_bytes(gzip.compress(b"") if name.endswith(".gz") else b"\n  \n" if "blank" in name else b"")
    cfg = DataConfig(sources=[SourceSpec(name="e", path=str(path), format=fmt)], template="chatml", on_error=on_error)
    with pytest.raises(DataError) as err:
        prepare_sources(cfg, tiny_tokenizer, tmp_path / "out", show_progress=False)
    assert str(err.value).startswith(str(path)) and "no records" in str(err.value) and "<input>" not in str(err.value)


def test_one_empty_file_among_good_ones_is_named(tiny_tokenizer, tmp_path):
    folder = tmp_path / "parts"
    folder.mkdir()
    write_jsonl(folder / "p0.jsonl", alpaca_records(3))
    (folder / "p1.jsonl").write_text("")
    with pytest.raises(DataError, match=r"p1\.jsonl: the file holds no records"):
        prepare_sources(config(folder), tiny_tokenizer, tmp_path / "out", show_progress=False)


# ----------------------------------------------------------------------------- report wording

def test_report_counts_records_kept_and_samples(tiny_tokenizer, tmp_path):
    """Text documents longer than seq_len give several samples: the report says so instead of
    "986 samples kept of 985 records"."""
    docs = ["短文档 short document"] * 9 + ["很长的文档 " * 200]
    (tmp_path / "docs.txt").write_text("\n".join(docs) + "\n", encoding="utf-8")
    cfg = DataConfig(sources=[SourceSpec(name="docs", path=str(tmp_path / "docs.txt"))], seq_len=64)
    _, report = prepare_source(cfg.sources[0], cfg, tiny_tokenizer, tmp_path / "out", show_progress=False)
    head, extra = report.lines()[:2]
    assert report.samples > 10
    assert head.startswith(f"docs: 10 records read from 1 file, 10 kept, 0 skipped -> {report.samples} samples")
    assert f"{report.samples - 10} more samples than kept records" in extra and "seq_len" in extra


# ----------------------------------------------------------------------------- CLI messages

def _saved_tokenizer(tokenizer, tmp_path: Path) -> Path:
    folder = tmp_path / "tokenizer"
    if not folder.exists():
        tokenizer.save_pretrained(folder)
    return folder


def _cli_error(capsys, args: list[str]) -> str:
    assert prepare_cli(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize("name, data", [
    ("bad.jsonl.gz", b"this is not gzip data"),
    ("cut.jsonl.gz", gzip.compress(b'{"instruction": "q", "output": "a"}\n' * 200)[:40]),
    ("bad.json.zst", b"this is not zstd data"),
    ("cut.jsonl.zst", zstandard.ZstdCompressor().compress(b'{"instruction": "q", "output": "a"}\n' * 2000)[:30]),
])
def test_corrupt_compressed_file_names_the_file(tiny_tokenizer, tmp_path, capsys, name, data):
    (tmp_path / name).write_bytes(data)
    err = _cli_error(capsys, ["--source", f"a={tmp_path / name}", "--tokenizer",
                              str(_saved_tokenizer(tiny_tokenizer, tmp_path)), "--out", str(tmp_path / "out"),
                              "--quiet", "--on-error", "skip"])
    assert name in err


def test_bad_cli_input_is_one_line_and_exit_2(tiny_tokenizer, tmp_path, capsys):
    src = write_jsonl(tmp_path / "a.jsonl", alpaca_records(3))
    tok = str(_saved_tokenizer(tiny_tokenizer, tmp_path))
    base = ["--source", f"a={src}", "--quiet", "--template", "chatml"]
    err = _cli_error(capsys, base + ["--tokenizer", str(tmp_path / "no_such_tokenizer"), "--out", str(tmp_path / "o")])
    assert "--tokenizer" in err and "no_such_tokenizer" in err
    err = _cli_error(capsys, base + ["--tokenizer", str(tmp_path), "--out", str(tmp_path / "o")])  # no tokenizer files
    assert "--tokenizer" in err
    (tmp_path / "taken").write_text("a file")
    err = _cli_error(capsys, base + ["--tokenizer", tok, "--out", str(tmp_path / "taken")])
    assert "taken" in err and "file" in err
    assert (tmp_path / "taken").read_text() == "a file"
    for option, message in ((["--num-proc", "-1"], "--num-proc: must be >= 0"),
                            (["--on-error", "ignore"], "--on-error: invalid choice: 'ignore'"),
                            (["--max-skip-fraction", "2"], "--max-skip-fraction: must be in [0, 1]")):
        with pytest.raises(SystemExit) as exit_info:
            prepare_cli(base + ["--tokenizer", tok, "--out", str(tmp_path / "o"), *option])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        prepare_cli(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--source", "--tokenizer", "--out", "--cache-dir", "--template", "--seq-len", "--train-on",
                   "--truncation", "--on-error", "--max-skip-fraction", "--num-proc", "--text-field", "--quiet"):
        assert option in text
    for shown in ("all_assistant", "last_assistant", "everything", "truncate_prompt", "drop", "strict", "skip",
                  "(default: 1024)", "(default: 0.5)", "0 = all cores", "(default: auto)"):
        assert shown in text, shown


def test_eval_count_larger_than_the_source_names_the_key_and_size(tiny_tokenizer, tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", alpaca_records(5))
    cfg = config(src)
    cfg.sources[0].eval_count = 5
    with pytest.raises(DataError, match=r"data\.sources\[0\]\.eval_count: holding out 5 of the 5 samples"):
        prepare_sources(cfg, tiny_tokenizer, tmp_path / "out", show_progress=False)


# ----------------------------------------------------------------------------- rendering outcomes in the manifest

def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text(encoding="utf-8"))


def test_reasoning_and_truncation_outcomes_are_counted_in_manifest_and_report(tokenizer_dir, tmp_path, capsys):
    two_turns = {"messages": [{"role": "user", "content": "一"},
                              {"role": "assistant", "content": "答一", "reasoning_content": "想一"},
                              {"role": "user", "content": "二"},
                              {"role": "assistant", "content": "答二", "reasoning_content": "想二"}]}
    long_history = {"messages": [{"role": "system", "content": "系统"}, {"role": "user", "content": "问" * 300},
                                 {"role": "assistant", "content": "答" * 300}, {"role": "user", "content": "再问"},
                                 {"role": "assistant", "content": "再答"}]}
    src = write_jsonl(tmp_path / "r.jsonl", [two_turns, long_history])
    kept = tmp_path / "kept"
    assert prepare_cli(["--source", f"r={src}:messages", "--tokenizer", str(tokenizer_dir), "--out",
                        str(kept), "--template", "qwen3", "--seq-len", "96", "--quiet", "--num-proc", "1"]) == 0
    report = capsys.readouterr().out
    counts = _manifest(kept / "r")["rendering"]
    assert counts == {"reasoning_turns": 2, "reasoning_rendered": 1, "reasoning_dropped_by_template": 1,
                      "truncated_whole_turns": 1}
    assert "1 dropped by the template" in report and "data.reasoning_turns=every_turn" in report
    assert "1 lost their oldest exchanges" in report
    split = tmp_path / "split"
    assert prepare_cli(["--source", f"r={src}:messages", "--tokenizer", str(tokenizer_dir), "--out",
                        str(split), "--template", "qwen3", "--seq-len", "96", "--quiet", "--num-proc", "1",
                        "--reasoning-turns", "every_turn", "--template-kwargs", '{"enable_thinking": true}']) == 0
    manifest = _manifest(split / "r")
    assert manifest["rendering"]["reasoning_split_samples"] == 2 and manifest["rendering"]["reasoning_rendered"] == 2
    assert manifest["counts"]["samples"] == 3  # the two-turn record became two samples
    assert manifest["settings"]["template_fingerprint"] != _manifest(kept / "r")["settings"]["template_fingerprint"]


def test_a_builtin_source_is_read_from_where_prepare_writes_it(tiny_tokenizer, tmp_path):
    """builtin: data is written under the output folder, which is otherwise never read back as data."""
    cfg = DataConfig(sources=[SourceSpec(name="demo", path="builtin:zh_demo?n=40")], template="chatml", num_proc=1)
    (source,) = prepare_sources(cfg, tiny_tokenizer, tmp_path, show_progress=False)
    assert len(source) > 0
