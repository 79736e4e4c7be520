"""The run config: YAML + overrides, strict keys with suggestions, typed values, --help text."""

from pathlib import Path

import pytest

from engine.config import ConfigError, RunConfig, config_help, field_docs, load_config, parse_override

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO = REPO_ROOT / "configs" / "sft" / "demo.yaml"


def test_demo_config_loads_with_overrides():
    cfg = load_config(DEMO, ["train.lr=1e-4", "data.sources[0].proportion=0.5", "model.dtype=bf16"])
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.data.sources[0].proportion == 0.5
    assert cfg.model.dtype == "bf16"
    assert cfg.data.sources[0].name == "zh_demo"


@pytest.mark.parametrize("override,expected", [
    ("train.lrr=1", "unknown config key 'train.lrr'; did you mean 'train.lr'?"),
    ("trian.lr=1", "unknown config key 'trian'; did you mean 'train'?"),
    ("data.sources[0].proprtion=0.3", "did you mean 'data.sources[0].proportion'?"),
])
def test_unknown_key_names_it_and_suggests(override, expected):
    with pytest.raises(ConfigError, match=expected.replace("[", r"\[").replace("]", r"\]").replace("?", r"\?")):
        load_config(DEMO, [override])


@pytest.mark.parametrize("override,key", [
    ("train.max_steps=ten", "train.max_steps"),
    ("train.micro_batch_size=0", "train.micro_batch_size"),
    ("model.dtype=fp8", "model.dtype"),
    ("data.packing=yes please", "data.packing"),
    ("train.betas=[0.9]", "train.betas"),
    ("data.sources[0].format=csv", "data.sources[0].format"),
    ("data.train_on=prompts", "data.train_on"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        load_config(DEMO, [override])


def test_source_with_two_mixture_settings_is_refused(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("data:\n  sources:\n    - {name: a, path: a.jsonl, proportion: 0.5, repeat: 2}\n")
    with pytest.raises(ConfigError, match=r"data.sources\[0\].*proportion and repeat"):
        load_config(path)


def test_override_values_are_yaml():
    assert parse_override("a.b=1e-4") == (["a", "b"], "1e-4")  # YAML 1.1: no dot -> string...
    cfg = load_config(DEMO, ["train.lr=1e-4"])  # ...which the float field still accepts
    assert isinstance(cfg.train.lr, float)
    assert parse_override("x=[1, 2]") == (["x"], [1, 2])
    with pytest.raises(ConfigError):
        parse_override("no_equals_sign")


def test_missing_file_and_bad_yaml_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)


def test_every_field_is_documented():
    import dataclasses
    import typing

    def walk(cls):
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            inner = [a for a in (tp, *typing.get_args(tp)) if dataclasses.is_dataclass(a)]
            if inner:
                yield from walk(inner[0])
            else:
                yield cls.__name__, f.name, docs.get(f.name)

    undocumented = [(c, n) for c, n, d in walk(RunConfig) if not d]
    assert not undocumented, undocumented
    text = config_help()
    assert "train.lr = 2e-05" in text and "Peak learning rate" in text


def test_warmup_default_depends_on_kind():
    cfg = load_config(DEMO, ["train.warmup_steps=null", "train.max_steps=1000"])
    assert cfg.warmup_steps == 30
    cfg = load_config(DEMO, ["train.warmup_steps=null", "train.max_steps=1000", "train.kind=cpt"])
    assert cfg.warmup_steps == 10
