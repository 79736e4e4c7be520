"""Checkpoint policy without DeepSpeed: retention (keep last K + best M), the save clock, config
compatibility on resume, the world-size plan, and crash-safe pointers/rotation on disk."""

from __future__ import annotations

import json

import pytest

from engine.checkpointing import checkpoint, reshard
from engine.checkpointing.retention import SavedCheckpoint, best_steps, steps_to_delete
from engine.checkpointing.run_compat import ResumeConfigError, check_resume_config, config_differences
from engine.checkpointing.save_schedule import SaveSchedule


def _saved(*pairs):
    return [SavedCheckpoint(step, metric) for step, metric in pairs]


def test_keep_last_only():
    saved = _saved((2, None), (4, None), (6, None), (8, None))
    assert steps_to_delete(saved, keep_last=2) == [2, 4]


def test_keep_best_survives_rotation_and_ignores_unrated_and_nan():
    saved = _saved((2, 1.5), (4, 0.9), (6, None), (8, float("nan")), (10, 1.2), (12, 2.0))
    assert best_steps(saved, 2) == [4, 10]
    assert steps_to_delete(saved, keep_last=1, keep_best=2) == [2, 6, 8]


def test_retention_rejects_bad_counts():
    with pytest.raises(ValueError, match="checkpoint.keep_last"):
        steps_to_delete(_saved((1, None)), keep_last=0)


def test_save_schedule_minutes_and_steps():
    now = [100.0]
    sched = SaveSchedule(every_steps=5, every_minutes=2.0, clock=lambda: now[0])
    assert not sched.time_due()
    now[0] += 119.0
    assert not sched.time_due()
    now[0] += 1.0
    assert sched.time_due()
    sched.saved()
    assert not sched.time_due()
    assert sched.step_due(10) and not sched.step_due(11)
    assert not SaveSchedule().step_due(4) and not SaveSchedule(clock=lambda: 1e9).time_due()


SAVED = {"run_dir": "runs/a", "model": {"from_scratch": {"hidden_size": 64}, "dtype": "fp32"},
         "data": {"sources": [{"name": "a", "path": "x.json"}], "seq_len": 128, "num_proc": 1},
         "train": {"global_batch_size": 8, "seed": 7, "lr": 1e-3, "betas": [0.9, 0.95], "max_steps": 10},
         "checkpoint": {"every_steps": 4}, "log": {"every_steps": 1}}


def _changed(**edits):
    cfg = json.loads(json.dumps(SAVED))
    for dotted, value in edits.items():
        node = cfg
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


@pytest.mark.parametrize("key, value", [
    ("model__from_scratch__hidden_size", 128), ("data__seq_len", 256), ("train__global_batch_size", 16),
    ("train__seed", 8), ("model__dtype", "bf16"),
])
def test_resume_refuses_meaningful_changes(key, value):
    with pytest.raises(ResumeConfigError, match=key.replace("__", ".")):
        check_resume_config(SAVED, _changed(**{key: value}), checkpoint="ckpt")


def test_resume_refuses_changed_source_listing_every_key():
    now = _changed(data__sources=[{"name": "a", "path": "y.json"}], train__seed=9)
    with pytest.raises(ResumeConfigError) as err:
        check_resume_config(SAVED, now, checkpoint="ckpt")
    assert "data.sources[0].path" in str(err.value) and "train.seed" in str(err.value)


def test_resume_allows_benign_changes_and_reports_them():
    now = _changed(checkpoint__every_steps=2, log__every_steps=5, run_dir="runs/b", train__max_steps=20,
                   data__num_proc=4, train__lr=5e-4)
    changes = check_resume_config(SAVED, now, checkpoint="ckpt")
    assert len(changes) == 6 and any("train.max_steps" in c for c in changes)
    assert check_resume_config(SAVED, _changed(train__betas=(0.9, 0.95)), checkpoint="ckpt") == []
    assert config_differences(SAVED, SAVED) == {}


def test_a_key_newer_than_the_checkpoint_is_benign_at_its_default_only():
    now = _changed()
    now["model"]["lora"] = {"r": 0, "alpha": 16.0}  # SAVED was written before model.lora existed
    check_resume_config(SAVED, now, checkpoint="ckpt")
    now["model"]["lora"]["r"] = 8  # turning LoRA on changes the model: refused
    with pytest.raises(ResumeConfigError, match=r"model\.lora\.r"):
        check_resume_config(SAVED, now, checkpoint="ckpt")


def _fake_checkpoint(root, step, world_size, *, zero_files=True, complete=True):
    ckpt = root / checkpoint.tag_for(step)
    ckpt.mkdir(parents=True)
    (ckpt / checkpoint.TRAINER_STATE).write_text(json.dumps({"step": step, "world_size": world_size}))
    if zero_files:
        (ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    if complete:
        (ckpt / checkpoint.COMPLETE).write_text(f"{step}\n")
    return ckpt


def test_resume_plan_by_world_size_and_stage(tmp_path):
    zero = _fake_checkpoint(tmp_path, 4, world_size=2)
    assert not reshard.plan_resume(zero, 2).universal
    plan = reshard.plan_resume(zero, 1)
    assert plan.universal and plan.load_dir == zero and plan.tag == reshard.UNIVERSAL_DIR
    assert reshard.ds_config_for(plan, {"zero_optimization": {"stage": 2}})["checkpoint"]["load_universal"]
    zero0 = _fake_checkpoint(tmp_path, 8, world_size=2, zero_files=False)
    assert not reshard.plan_resume(zero0, 1).universal  # ZeRO-0 state is not partitioned
    assert "checkpoint" not in reshard.ds_config_for(reshard.plan_resume(zero0, 1), {})


def test_latest_falls_back_to_newest_complete(tmp_path):
    _fake_checkpoint(tmp_path, 2, 1)
    _fake_checkpoint(tmp_path, 4, 1)
    _fake_checkpoint(tmp_path, 6, 1, complete=False)  # killed mid-save
    (tmp_path / checkpoint.LATEST).write_text(checkpoint.tag_for(6))
    assert checkpoint.find_latest(tmp_path).name == checkpoint.tag_for(4)


def test_rotation_keeps_best_and_clears_stale_partials(tmp_path):
    for step, metric in ((2, 0.5), (4, 0.9), (6, None), (8, 0.7)):
        ckpt = _fake_checkpoint(tmp_path, step, 1)
        state = json.loads((ckpt / checkpoint.TRAINER_STATE).read_text())
        (ckpt / checkpoint.TRAINER_STATE).write_text(json.dumps({**state, "metric": metric}))
    _fake_checkpoint(tmp_path, 5, 1, complete=False)  # a partial save older than the newest
    checkpoint.rotate(tmp_path, keep_last=1, keep_best=1)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [checkpoint.BEST, checkpoint.tag_for(2), checkpoint.tag_for(8)]
    assert (tmp_path / checkpoint.BEST).read_text().strip() == checkpoint.tag_for(2)
