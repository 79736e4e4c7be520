"""Resume on another number of ranks, same global batch: a 2-rank ZeRO-3 job stops at step 5 and a
1-rank job finishes the run. The joined sample-id log equals the uninterrupted 2-rank run's (same
global sample ids at every step: nothing repeated, nothing skipped) and so do the per-step losses.

Loss tolerance, rel 1e-5: both runs are fp32 with the same global batch and the same global token
normalisation, so they differ only in reduction order (DeepSpeed averages gradients over 2 ranks
vs accumulating 2x the micro-batches on 1 rank, and sharded vs whole-tensor optimizer updates):
rounding of ~1e-7 relative per step, a few steps at lr 3e-3. A repeated, skipped or reordered
sample, a lost Adam moment or a restarted lr schedule changes the loss by 1e-3 or more.
"""

from __future__ import annotations

import pytest

from engine.checkpointing import checkpoint, reshard
from tests.integration.lifecycle import (LOSS_RTOL, MAX_STEPS, global_sample_ids, lifecycle_config, losses_by_step,
                                         reference_run, run, write_config)

pytestmark = [pytest.mark.distributed]

STOP_AT = 5


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return reference_run(tmp_path_factory.mktemp("lifecycle"))


def test_stop_on_two_ranks_resume_on_one(reference, tmp_path):
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", lifecycle_config(run_dir))
    first = run(config, f"train.stop_at_step={STOP_AT}", num_procs=2, log=tmp_path / "first.log")
    assert first.proc.returncode == 0, first.explain()
    ckpt = run_dir / "checkpoints" / checkpoint.tag_for(STOP_AT)
    assert checkpoint.is_complete(ckpt) and checkpoint.read_trainer_state(ckpt)["world_size"] == 2

    second = run(config, num_procs=1, log=tmp_path / "second.log")
    assert second.proc.returncode == 0, second.explain()
    log = second.log.read_text(encoding="utf-8")
    assert "saved on 2 rank(s), on 1 rank(s) through a universal copy" in log, second.explain()
    assert reshard.is_converted(ckpt)

    ids, expected_ids = global_sample_ids(run_dir), global_sample_ids(reference)
    assert sorted(expected_ids) == list(range(1, MAX_STEPS + 1))
    assert ids == expected_ids
    losses, expected = losses_by_step(run_dir), losses_by_step(reference)
    assert sorted(losses) == list(range(1, MAX_STEPS + 1))
    for step in expected:
        assert losses[step] == pytest.approx(expected[step], rel=LOSS_RTOL), f"step {step}"
