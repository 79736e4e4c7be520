"""Rules of thumb across stages and epochs: each warning fires when a config strays, not otherwise."""

from __future__ import annotations

from pathlib import Path

from engine.config import RunConfig, SourceSpec, Stage, load_config
from engine.rules import check_epochs, check_rules_of_thumb, check_stage_rules

DEMO = Path(__file__).resolve().parents[2] / "configs" / "sft" / "demo.yaml"


def _stage(name: str, kind: str, lr: float, train_on: str) -> Stage:
    cfg = RunConfig()
    cfg.train.kind, cfg.train.lr, cfg.data.train_on = kind, lr, train_on
    cfg.data.sources = [SourceSpec(name="s", path="x")]
    return Stage(0, name, cfg, ())


def test_usual_pipelines_raise_no_warning():
    assert check_stage_rules([_stage("cpt", "cpt", 1e-4, "everything"), _stage("sft", "sft", 1e-5, "all_assistant")]) == []
    assert check_stage_rules([_stage("g", "sft", 2e-5, "all_assistant"), _stage("d", "sft", 1e-5, "all_assistant")]) == []


def test_stage_rules_fire_and_say_why():
    warnings = check_stage_rules([
        _stage("general", "sft", 1e-5, "everything"),
        _stage("domain", "sft", 5e-5, "all_assistant"),
        _stage("late_cpt", "cpt", 1e-4, "all_assistant"),
    ])
    text = "\n".join(warnings)
    assert len(warnings) == 4
    assert "'general' is SFT with data.train_on=everything" in text
    assert "'domain': lr 5e-05 is above the lr 1e-05" in text
    assert "'late_cpt' is continued pretraining but data.train_on=all_assistant" in text
    assert "'late_cpt': continued pretraining after an SFT stage" in text


def test_epoch_rule_scales_with_data_size():
    assert check_epochs("sft", ["small"], [5_000], [15_000]) == []  # 3 epochs of 5k: fine
    assert len(check_epochs("sft", ["big"], [500_000], [1_000_000])) == 1  # 2 epochs of 500k: too many
    assert len(check_epochs("sft", ["small"], [5_000], [20_000])) == 1
    assert check_epochs("cpt", ["text"], [1_000], [4_000]) == []
    assert "overfits" in check_epochs("cpt", ["text"], [1_000], [5_000])[0]


def test_sft_source_that_trains_everything_is_flagged_and_replay_source_is_not():
    sft = _stage("sft", "sft", 1e-5, "all_assistant")
    sft.cfg.data.sources = [SourceSpec(name="chat", path="x.jsonl", train_on="everything")]
    cpt = _stage("cpt", "cpt", 1e-4, "everything")
    cpt.cfg.data.sources = [SourceSpec(name="replay", path="y.jsonl", train_on="all_assistant")]
    warnings = check_stage_rules([cpt, sft])
    assert len(warnings) == 1 and "source 'chat' sets train_on=everything" in warnings[0]


def test_long_warmup_warning_fits_a_from_scratch_model():
    cfg = RunConfig()
    cfg.train.max_steps, cfg.train.warmup_steps = 100, 30
    (scratch,) = check_rules_of_thumb(cfg)
    assert "30 warmup steps are 30% of the run" in scratch and "random weights" in scratch
    assert "trained model" not in scratch
    cfg.model.path = "/models/base"
    assert any("SFT starts from a trained model" in w for w in check_rules_of_thumb(cfg))


def test_lora_lr_is_checked_against_its_own_range_not_the_full_sft_one(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    lora = ["model.lora.r=8", f"model.path={tmp_path}", "train.warmup_steps=1"]
    assert check_rules_of_thumb(load_config(DEMO, [*lora, "train.lr=2e-4"])) == []
    (high,) = check_rules_of_thumb(load_config(DEMO, [*lora, "train.lr=5e-3"]))
    assert "with LoRA" in high and "diverge" in high
    (low,) = check_rules_of_thumb(load_config(DEMO, [*lora, "train.lr=1e-6"]))
    assert "barely moves" in low
    scratch = check_rules_of_thumb(load_config(DEMO, ["model.lora.r=8", "train.lr=2e-4", "train.warmup_steps=1"]))
    assert any("trained from scratch" in w for w in scratch)
