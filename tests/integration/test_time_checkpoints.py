"""checkpoint.every_minutes through the real launcher: rank 0's clock decides, every rank saves
after the same step (a disagreement would hang the collective save), and the run resumes from a
time-triggered checkpoint."""

from __future__ import annotations

import pytest

from engine.checkpointing import checkpoint
from tests.integration.tiny_run import explain, launch_deepspeed, read_metrics, tiny_config, write_config

pytestmark = [pytest.mark.distributed]


def test_time_triggered_checkpoints_are_taken_and_resumed_from(tmp_path):
    run_dir = tmp_path / "run"
    # No step-based saves: every checkpoint before the last step is due to the clock. The interval
    # (60 microseconds) is shorter than any training step, so the count does not depend on how fast
    # the tiny model trains on this machine; what is tested is that the clock triggers saves at all,
    # that every rank saves after the same step, and that the run resumes from one.
    cfg = tiny_config(run_dir, max_steps=10, checkpoint={"every_steps": 0, "every_minutes": 1e-6, "keep_last": 100,
                                                         "export_at_end": False},
                      train={"stop_at_step": 6})
    config = write_config(tmp_path / "run.yaml", cfg)
    first = launch_deepspeed(config, log=tmp_path / "first.log")
    assert first.returncode == 0, explain(first)
    saved = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if checkpoint.is_complete(p))
    before_stop = [name for name in saved if name < checkpoint.tag_for(6)]
    assert len(before_stop) >= 2, saved
    assert checkpoint.find_latest(run_dir / "checkpoints").name == checkpoint.tag_for(6)

    second = launch_deepspeed(config, "train.stop_at_step=null", log=tmp_path / "second.log")
    assert second.returncode == 0, explain(second)
    assert [m["step"] for m in read_metrics(run_dir)] == list(range(1, 11))
