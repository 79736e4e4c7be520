"""The generated demo set: correct Chinese numerals and dates, deterministic, checkable."""

import json

import pytest

from data_pipeline.ingest.demo_data import (
    date_to_chinese,
    demo_prompts,
    generate,
    is_reserved,
    materialize_builtin,
    number_to_chinese,
    parse_builtin,
    score,
)


@pytest.mark.parametrize("n,text", [
    (0, "零"), (7, "七"), (10, "十"), (15, "十五"), (20, "二十"), (105, "一百零五"), (110, "一百一十"),
    (1001, "一千零一"), (1010, "一千零一十"), (10000, "一万"), (10001, "一万零一"), (100010, "十万零一十"),
    (123456, "十二万三千四百五十六"), (200300, "二十万零三百"), (99999999, "九千九百九十九万九千九百九十九"),
])
def test_number_to_chinese(n, text):
    assert number_to_chinese(n) == text


def test_number_range_is_checked():
    with pytest.raises(ValueError, match="0..99999999"):
        number_to_chinese(10**8)


def test_date_to_chinese():
    assert date_to_chinese(2024, 3, 15) == "二〇二四年三月十五日"
    assert date_to_chinese(1950, 10, 1) == "一九五〇年十月一日"


def test_generation_is_deterministic_and_answers_are_computed():
    a, b = generate(200, seed=3), generate(200, seed=3)
    assert a == b and generate(200, seed=4) != a
    for record in a:
        if record["instruction"].startswith("把数字 "):
            n = int(record["instruction"].split()[1])
            assert record["output"] == number_to_chinese(n)
        elif record["instruction"].endswith("写成阿拉伯数字。"):
            assert number_to_chinese(int(record["output"])) in record["instruction"]


def test_generated_instructions_are_distinct_and_never_reserved():
    records = generate(12000, seed=1)
    instructions = [r["instruction"] for r in records]
    assert len(set(instructions)) == len(instructions) == 12000
    assert not any(is_reserved(q) for q in instructions)
    prompts = demo_prompts(8)
    assert all(is_reserved(q) for q, _ in prompts) and len({q for q, _ in prompts}) == 8


def test_a_used_up_task_leaves_the_rotation_and_too_large_n_is_an_error(monkeypatch):
    import data_pipeline.ingest.demo_data as demo

    sums = [r for r in generate(10000) if "加" in r["instruction"]]
    assert 2400 <= len(sums) <= 2550  # all but the reserved of the 51 x 50 sums, then no more
    monkeypatch.setattr(demo, "TASKS", (demo._task_add,))
    with pytest.raises(ValueError, match="n=3000 asks for more"):
        demo.generate(3000)


def test_demo_prompts_can_exclude_the_training_set():
    train = {r["instruction"] for r in generate(10000, seed=0)}
    prompts = demo_prompts(8, exclude=train)
    assert len(prompts) == 8 and not any(q in train for q, _ in prompts)
    assert score([a for _, a in prompts], [a for _, a in prompts]) == 8
    assert score(["x"] * 8, [a for _, a in prompts]) == 0


def test_demo_config_prompts_are_unseen_and_answers_right():
    from pathlib import Path

    from engine.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[3] / "configs" / "sft" / "demo.yaml")
    path = cfg.data.sources[0].path
    n = parse_builtin(path)[1]
    train = {r["instruction"] for r in generate(n, seed=0)}
    assert not any(p in train for p in cfg.log.sample_prompts)
    pairs = list(zip(cfg.log.sample_prompts, cfg.log.sample_expected))
    assert pairs == demo_prompts(len(pairs), exclude=train)


def test_builtin_path_parsing_and_materialisation(tmp_path):
    assert parse_builtin("builtin:zh_demo") == ("zh_demo", 4000, 0)
    assert parse_builtin("builtin:zh_demo?n=10&seed=2") == ("zh_demo", 10, 2)
    for bad in ("builtin:nope", "builtin:zh_demo?n=0", "builtin:zh_demo?x=1", "builtin:zh_demo?n=a"):
        with pytest.raises(ValueError):
            parse_builtin(bad)
    path = materialize_builtin("builtin:zh_demo?n=5", tmp_path)
    lines = [json.loads(x) for x in open(path, encoding="utf-8")]
    assert lines == generate(5, 0)
    assert materialize_builtin("builtin:zh_demo?n=5", tmp_path) == path
