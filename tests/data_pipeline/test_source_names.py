"""Source names name folders under the prepared-data folder: a hostile name is refused with the
config key, and prepare never deletes anything it did not create."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from data_pipeline.errors import DataError
from data_pipeline.prepare import main as prepare_cli
from data_pipeline.prepare import parse_source_arg, prepare_source, prepare_sources
from data_pipeline.spec import DataConfig, DataConfigError, SourceSpec

HOSTILE_NAMES = [".", "..", "a/b", "../x", "/abs", "a\\b", "", ".tmp-a", ".hidden", "-flag", "a b", "*", "a\x00b",
                 "x" * 101, "a\nb", "~"]


@pytest.fixture
def data_file(tmp_path) -> Path:
    path = tmp_path / "in" / "a.jsonl"
    path.parent.mkdir()
    path.write_text("\n".join(json.dumps({"instruction": f"问{i}", "output": f"答{i}"}) for i in range(4)) + "\n",
                    encoding="utf-8")
    return path


@pytest.fixture
def out_dir(tmp_path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("the user's own file")
    return out


def _untouched(out_dir: Path) -> None:
    assert (out_dir / "notes.txt").read_text() == "the user's own file"
    assert sorted(p.name for p in out_dir.iterdir()) == ["notes.txt"]  # no temp folder left either


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_name_is_refused_by_the_config_and_the_library(name, data_file, out_dir, tiny_tokenizer):
    cfg = DataConfig(sources=[SourceSpec(name="ok"), SourceSpec(name=name, path=str(data_file))], template="chatml")
    cfg.sources[0].path = str(data_file)
    with pytest.raises(DataConfigError, match=r"data\.sources\[1\]\.name"):
        cfg.validate()
    with pytest.raises(DataConfigError):
        prepare_sources(cfg, tiny_tokenizer, out_dir, show_progress=False)
    with pytest.raises(DataConfigError, match="source name"):  # the unvalidated entry point checks too
        prepare_source(cfg.sources[1], cfg, tiny_tokenizer, out_dir, show_progress=False)
    _untouched(out_dir)


@pytest.mark.parametrize("name", [n for n in HOSTILE_NAMES if n and "\x00" not in n and "\n" not in n])
def test_hostile_name_is_refused_by_the_cli(name, data_file, out_dir, tokenizer_dir, capsys):
    code = prepare_cli([f"--source={name}={data_file}", "--tokenizer", str(tokenizer_dir), "--out", str(out_dir),
                        "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "source name" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    _untouched(out_dir)


def test_good_names_are_accepted():
    for name in ["zh_demo", "v1.2-final", "中文数据", "_x", "A9"]:
        SourceSpec(name=name, path="x.jsonl").validate("data.sources[0]")
        assert parse_source_arg(f"{name}=x.jsonl").name == name


def test_an_unrelated_folder_with_the_source_name_is_never_replaced(data_file, out_dir, tiny_tokenizer):
    """`--out .` with a source called like the user's data folder must not delete that folder."""
    own = out_dir / "a"
    own.mkdir()
    (own / "raw.jsonl").write_text("precious")
    cfg = DataConfig(sources=[SourceSpec(name="a", path=str(data_file))], template="chatml")
    with pytest.raises(DataError, match="not a prepared source folder"):
        prepare_sources(cfg, tiny_tokenizer, out_dir, show_progress=False)
    assert (own / "raw.jsonl").read_text() == "precious"
    assert sorted(p.name for p in out_dir.iterdir()) == ["a", "notes.txt"]
    link = out_dir / "b"
    link.symlink_to(own)
    cfg.sources[0].name = "b"
    with pytest.raises(DataError, match="not a prepared source folder"):
        prepare_sources(cfg, tiny_tokenizer, out_dir, show_progress=False)
    assert link.is_symlink() and (own / "raw.jsonl").exists()


def test_stale_temp_cleanup_touches_only_the_tools_own_folders(data_file, out_dir, tiny_tokenizer):
    host = socket.gethostname()
    dead_pid = 999_999_999
    stale = out_dir / f".tmp-a-{host}-{dead_pid}-deadbeef"
    stale.mkdir()
    (stale / "tokens-00000.bin").write_bytes(b"\0" * 4)
    lookalike = out_dir / f".tmp-a-{host}-{dead_pid}-cafe0000"  # the tool's name, but the user's content
    lookalike.mkdir()
    (lookalike / "keep.me").write_text("x")
    other_source = out_dir / f".tmp-ab-{host}-{dead_pid}-deadbeef"
    other_source.mkdir()
    cfg = DataConfig(sources=[SourceSpec(name="a", path=str(data_file))], template="chatml")
    prepare_sources(cfg, tiny_tokenizer, out_dir, show_progress=False)
    assert not stale.exists()
    assert (lookalike / "keep.me").exists() and other_source.exists()
    assert (out_dir / "notes.txt").exists() and (out_dir / "a" / "manifest.json").exists()
    # Replacing its own (outdated) folder is allowed and leaves the rest alone.
    data_file.write_text(data_file.read_text() + json.dumps({"instruction": "新", "output": "答"}) + "\n")
    os.utime(data_file, (1, 1))
    (source,) = prepare_sources(cfg, tiny_tokenizer, out_dir, show_progress=False)
    assert len(source) == 5 and (out_dir / "notes.txt").exists()
    assert not any(p.name.startswith(".old-") for p in out_dir.iterdir())


def test_a_source_folder_holding_the_output_does_not_read_prepares_own_files(data_file, tiny_tokenizer):
    """`--source a=data --out data/prepared`: the second run must not train on manifest.json."""
    cfg = DataConfig(sources=[SourceSpec(name="a", path=str(data_file.parent))], template="chatml")
    out = data_file.parent / "prepared"
    (first,) = prepare_sources(cfg, tiny_tokenizer, out, show_progress=False)
    os.utime(data_file, (2, 2))  # an input change: the source is prepared again, with its folder in place
    (second,) = prepare_sources(cfg, tiny_tokenizer, out, show_progress=False)
    assert len(first) == len(second) == 4 and second.manifest["files"] == [str(data_file)]
    assert second.manifest["skips"] == {}
