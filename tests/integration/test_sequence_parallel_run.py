"""Sequence parallelism end to end through the real launcher on 2 CPU ranks: a run with
sequence_parallel=2 stopped half-way resumes with sequence_parallel=1 (another sp x dp split of the
same world) and continues the exact sample order and losses of an uninterrupted sp=1 run."""

from __future__ import annotations

import pytest

from tests.integration.lifecycle import global_sample_ids
from tests.integration.tiny_run import explain, launch_deepspeed, read_metrics, tiny_config, write_config

pytestmark = [pytest.mark.distributed]

STEPS = 8
LOSS_RTOL = 1e-5  # fp32, the same global batches; only the reduction order differs


def _config(tmp_path, name: str, sp: int):
    cfg = tiny_config(tmp_path / name, zero="zero2", max_steps=STEPS)
    cfg["train"]["sequence_parallel"] = sp
    cfg["data"]["log_sample_ids"] = True
    cfg["checkpoint"] = {"every_steps": 4, "export_at_end": False}
    cfg["log"] = {"every_steps": 1, "sample_prompts": [], "tensorboard": False}
    return write_config(tmp_path / f"{name}.yaml", cfg)


def _losses(run_dir) -> dict[int, float]:
    return {m["step"]: m["train/loss"] for m in read_metrics(run_dir) if "train/loss" in m}


def test_sp2_run_resumes_as_sp1_with_the_same_order_and_losses(tmp_path):
    reference = launch_deepspeed(_config(tmp_path, "reference", 1), log=tmp_path / "reference.log")
    assert reference.returncode == 0, explain(reference)

    config = _config(tmp_path, "split", 2)
    first = launch_deepspeed(config, "train.stop_at_step=4", log=tmp_path / "first.log")
    assert first.returncode == 0, explain(first)
    assert "(sequence parallel 2 x data parallel 1)" in first.stdout + first.stderr
    second = launch_deepspeed(config, "train.sequence_parallel=1", log=tmp_path / "second.log")
    assert second.returncode == 0, explain(second)
    assert "resumed from" in second.stdout + second.stderr

    want, got = _losses(tmp_path / "reference"), _losses(tmp_path / "split")
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=LOSS_RTOL), (step, got, want)
    assert global_sample_ids(tmp_path / "split") == global_sample_ids(tmp_path / "reference")
