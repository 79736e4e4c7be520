"""inspect: the trained spans of prepared samples, decoded with the tokenizer that made them."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest

import data_pipeline.prepare as prepare_mod
from data_pipeline.inspect import (ANSI_TRAIN, TRAIN_CLOSE, TRAIN_OPEN, InspectError, inspect_samples,
                                   load_matching_tokenizer, open_source, token_runs)
from data_pipeline.inspect import main as inspect_cli
from data_pipeline.prepare import prepare_source
from data_pipeline.spec import DataConfig, SourceSpec
from data_pipeline.render.tokenizer import load_tokenizer
from tests.data_pipeline.conftest import make_tiny_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[2]

CONVERSATIONS = [
    [("user", "你好，请介绍一下自己。"), ("assistant", "我是一个语言模型。")],
    [("system", "你是助手。"), ("user", "一加一等于几？"), ("assistant", "等于二。"), ("user", "再加一呢？"),
     ("assistant", "等于三。")],
    [("user", "Say hi with an emoji"), ("assistant", "Hi 😀!")],
    [("user", "天空是什么颜色？"), ("assistant", "蓝色。")],
    [("user", "写两行字"), ("assistant", "第一行\n第二行")],
]
"""Five samples; prepared two per shard, so that samples 1..3 lie in three shards."""


def chatml(conversation) -> str:
    return "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in conversation)


def answers(conversation) -> list[str]:
    return [content + "<|im_end|>" for role, content in conversation if role == "assistant"]


def prepare_chat(records_dir: Path, out: Path, tokenizer) -> Path:
    src = records_dir / "chat.jsonl"
    lines = [json.dumps({"messages": [{"role": r, "content": c} for r, c in conv]}, ensure_ascii=False)
             for conv in CONVERSATIONS]
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = DataConfig(sources=[SourceSpec(name="chat", path=str(src))], template="chatml", num_proc=1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(prepare_mod, "CHUNK_RECORDS", 2)
        source, _ = prepare_source(cfg.sources[0], cfg, tokenizer, out, show_progress=False)
    assert len(source.manifest["shards"]) == 3
    return out


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, shared_tokenizer) -> Path:
    """<out> holding the one prepared source 'chat' (prepared with the shared tokenizer)."""
    base = tmp_path_factory.mktemp("inspect")
    return prepare_chat(base, base / "out", shared_tokenizer)


@pytest.fixture(scope="module")
def tokenizer_dir(shared_data) -> Path:
    return shared_data / "tokenizer-zh-6400"


def run_cli(capsys, *args) -> tuple[int, str, str]:
    rc = inspect_cli([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_trained_spans_are_the_answers_across_shards(prepared, shared_tokenizer):
    source = open_source(prepared / "chat")
    samples = inspect_samples(source, shared_tokenizer, index=0, count=len(CONVERSATIONS))
    assert [s.index for s in samples] == list(range(5))
    for sample, conversation in zip(samples, CONVERSATIONS):
        ids, trained = source.get_tokens_and_mask(sample.index)
        assert sample.text == shared_tokenizer.decode(ids.tolist()) == chatml(conversation)
        assert sample.trained == answers(conversation)
        assert sample.trained_tokens == int(trained.sum()) and sample.num_tokens == len(ids)
        for span in sample.trained:
            assert "<|im_start|>" not in span
            assert not any(content in span for role, content in conversation if role != "assistant")


def test_token_runs_are_maximal():
    mask = np.array([0, 0, 1, 1, 0, 1, 1, 1], dtype=bool)
    assert token_runs(mask) == [(0, 2, False), (2, 4, True), (4, 5, False), (5, 8, True)]
    assert token_runs(np.ones(3, dtype=bool)) == [(0, 3, True)]
    assert token_runs(np.zeros(0, dtype=bool)) == []


def test_cli_json_through_python_m(prepared, tokenizer_dir, shared_tokenizer):
    """The parent <out> (one source) is accepted; stdout is JSON lines and nothing else."""
    result = subprocess.run([sys.executable, "-m", "data_pipeline.inspect", str(prepared), "--index", "1",
                             "--count", "3", "--json", "--tokenizer", str(tokenizer_dir)],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    expected = inspect_samples(open_source(prepared / "chat"), shared_tokenizer, 1, 3)
    assert rows == [s.to_json() for s in expected]
    assert [r["trained"] for r in rows] == [answers(c) for c in CONVERSATIONS[1:4]]
    assert "😀" in result.stdout  # ensure_ascii=False


def test_human_view_marks_the_trained_spans(prepared, tokenizer_dir, capsys):
    rc, out, err = run_cli(capsys, prepared / "chat", "--index", 1, "--tokenizer", tokenizer_dir)
    assert rc == 0 and err == ""
    header, sample_head, body = out.split("\n", 2)
    assert "'chat'" in header and "5 samples" in header and TRAIN_OPEN in header
    ids, trained = open_source(prepared / "chat").get_tokens_and_mask(1)
    assert sample_head == f"=== sample 1 of 5: {len(ids)} tokens, {int(trained.sum())} trained in 2 spans ==="
    marked = re.findall(re.escape(TRAIN_OPEN) + "(.*?)" + re.escape(TRAIN_CLOSE), body, re.S)
    assert marked == answers(CONVERSATIONS[1])
    assert body.replace(TRAIN_OPEN, "").replace(TRAIN_CLOSE, "").rstrip("\n") == chatml(CONVERSATIONS[1]).rstrip("\n")
    rc, out, _ = run_cli(capsys, prepared / "chat", "--tokenizer", tokenizer_dir, "--color", "always")
    assert rc == 0 and f"{ANSI_TRAIN}我是一个语言模型。<|im_end|>" in out and TRAIN_OPEN not in out


@pytest.mark.parametrize("args, message", [
    (["--index", "5"], "--index 5 is out of range: source 'chat' has 5 samples (0..4)"),
    (["--index", "3", "--count", "3"], "asks for samples 3..5, but source 'chat' has 5 samples"),
])
def test_out_of_range_names_the_sample_count(prepared, tokenizer_dir, capsys, args, message):
    rc, out, err = run_cli(capsys, prepared / "chat", "--tokenizer", tokenizer_dir, *args)
    assert rc == 2 and out == "" and message in err and "Traceback" not in err


def test_last_samples_and_bad_numbers(prepared, tokenizer_dir, shared_tokenizer, capsys):
    rc, out, _ = run_cli(capsys, prepared / "chat", "--tokenizer", tokenizer_dir, "--index", 3, "--count", 2, "--json")
    assert rc == 0 and [json.loads(line)["index"] for line in out.splitlines()] == [3, 4]
    for bad in (["--count", "0"], ["--index", "-1"], ["--index", "x"]):
        with pytest.raises(SystemExit) as exit_info:
            inspect_cli([str(prepared / "chat"), *bad])
        assert exit_info.value.code == 2
    assert "whole number" in capsys.readouterr().err
    with pytest.raises(InspectError, match="has 5 samples"):
        inspect_samples(open_source(prepared / "chat"), shared_tokenizer, index=-1)


def write_manifest_text(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(text, encoding="utf-8")
    return folder


def test_bad_folders_exit_2_with_a_message(prepared, tokenizer_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    shutil.copytree(prepared / "chat", tmp_path / "two" / "a")
    shutil.copytree(prepared / "chat", tmp_path / "two" / "b")
    cases = {
        tmp_path / "missing": "no such folder",
        tmp_path / "empty": "no manifest.json, so this is not a prepared source folder",
        tmp_path / "file.txt": "is a file",
        write_manifest_text(tmp_path / "interrupted", '{"complete": false}'): "incomplete",
        write_manifest_text(tmp_path / "broken", '{"complete": tr'): "not valid JSON",
        write_manifest_text(tmp_path / "old", '{"complete": true, "format_version": 1}'): "'format_version' is 1",
        write_manifest_text(tmp_path / "fieldless", '{"complete": true, "format_version": 3}'): "malformed field",
        tmp_path / "two": "holds 2 prepared sources (a, b)",
    }
    for folder, message in cases.items():
        rc, out, err = run_cli(capsys, folder, "--tokenizer", tokenizer_dir)
        assert rc == 2 and out == "", folder
        assert message in err and str(folder) in err and "Traceback" not in err, err
    rc, _, _ = run_cli(capsys, prepared / "chat" / "manifest.json", "--tokenizer", tokenizer_dir)
    assert rc == 0


def copy_tokenizer(tokenizer_dir: Path, target: Path, chat_template: str | None = None) -> Path:
    shutil.copytree(tokenizer_dir, target)
    if chat_template is not None:
        config_file = target / "tokenizer_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8"))
        config["chat_template"] = chat_template
        config_file.write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    return target


def test_tokenizer_is_required_and_its_fingerprint_checked(prepared, tokenizer_dir, tmp_path, capsys):
    rc, out, err = run_cli(capsys, prepared / "chat")
    assert rc == 2 and out == "" and "pass --tokenizer DIR" in err and "fingerprint" in err
    edited = copy_tokenizer(tokenizer_dir, tmp_path / "edited", chat_template="{{ messages }}")
    rc, out, err = run_cli(capsys, prepared / "chat", "--tokenizer", edited, "--json")
    assert rc == 2 and out == "" and "was prepared with tokenizer" in err and "--ignore-fingerprint" in err
    rc, out, err = run_cli(capsys, prepared / "chat", "--tokenizer", edited, "--json", "--ignore-fingerprint")
    assert rc == 0 and "warning" in err and json.loads(out)["trained"] == answers(CONVERSATIONS[0])
    rc, _, err = run_cli(capsys, prepared / "chat", "--tokenizer", tmp_path / "nope")
    assert rc == 2 and "--tokenizer" in err and "no such folder" in err


def test_a_small_tokenizer_is_refused_even_when_the_fingerprint_is_ignored(prepared, tmp_path, capsys):
    make_tiny_tokenizer().save_pretrained(str(tmp_path / "tiny"))
    rc, out, err = run_cli(capsys, prepared / "chat", "--tokenizer", tmp_path / "tiny", "--ignore-fingerprint")
    assert rc == 2 and out == "" and "ids cannot be decoded with this one" in err
    shutil.copytree(prepared / "chat", tmp_path / "no_vocab")  # a manifest that does not say its vocab size
    manifest = json.loads((tmp_path / "no_vocab" / "manifest.json").read_text(encoding="utf-8"))
    del manifest["vocab_size"]
    (tmp_path / "no_vocab" / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    rc, out, err = run_cli(capsys, tmp_path / "no_vocab", "--tokenizer", tmp_path / "tiny", "--ignore-fingerprint",
                           "--json")
    assert rc == 2 and out == "" and "beyond the tokenizer's" in err and "Traceback" not in err


def test_a_tokenizer_without_pad_token_matches_as_the_trainer_loads_it(tmp_path, capsys):
    """The trainer's loader sets a pad token, which changes the fingerprint of a tokenizer folder
    that defines none: a source it prepared still matches that folder."""
    tokenizer = make_tiny_tokenizer()
    tokenizer.pad_token = None
    tokenizer.save_pretrained(str(tmp_path / "no_pad"))
    prepare_chat(tmp_path, tmp_path / "out", load_tokenizer(tmp_path / "no_pad"))
    rc, out, err = run_cli(capsys, tmp_path / "out" / "chat", "--tokenizer", tmp_path / "no_pad", "--json")
    assert rc == 0, err
    assert json.loads(out)["trained"] == answers(CONVERSATIONS[0])


def test_a_trainer_runs_own_tokenizer_is_used_when_it_matches(prepared, tokenizer_dir, tmp_path, capsys):
    shutil.copytree(prepared / "chat", tmp_path / "run" / "data" / "chat")
    copy_tokenizer(tokenizer_dir, tmp_path / "run" / "tokenizer")
    rc, out, err = run_cli(capsys, tmp_path / "run" / "data", "--json")
    assert rc == 0, err
    assert json.loads(out)["trained"] == answers(CONVERSATIONS[0])
    shutil.rmtree(tmp_path / "run" / "tokenizer")
    copy_tokenizer(tokenizer_dir, tmp_path / "run" / "tokenizer", chat_template="{{ messages }}")
    with pytest.raises(InspectError, match="pass --tokenizer DIR"):
        load_matching_tokenizer(open_source(tmp_path / "run" / "data"), None)


def test_a_source_at_an_fsspec_url(prepared, shared_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # local copies stay inside the test's folder
    fs = fsspec.filesystem("memory")
    root = f"/bucket-{uuid.uuid4().hex[:8]}"
    fs.put(str(prepared / "chat"), f"{root}/chat", recursive=True)
    try:
        source = open_source(f"memory://{root}/chat")
        (sample,) = inspect_samples(source, shared_tokenizer, index=4)
        assert sample.trained == answers(CONVERSATIONS[4])
    finally:
        fs.rm(root, recursive=True)
