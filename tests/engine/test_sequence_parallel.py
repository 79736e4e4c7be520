"""Sequence parallelism (engine/sequence_parallel.py): the layout, the cut of a micro-batch, the
segment-aware attention, and (2 ranks, gloo, the real launcher) loss and gradients with
sequence_parallel=2 equal to sequence_parallel=1 and to the float64 definition, packed or not."""

from __future__ import annotations

import subprocess

import pytest
import torch
import torch.nn.functional as F

from data_pipeline.schedule.collate import collate_rows
from data_pipeline.schedule.labels import IGNORE_INDEX, count_targets, shift_labels
from engine.config import ConfigError
from engine.sequence_parallel import SequenceParallelLayout, check_heads
from tests.engine import grad_probe, sp_probe
from tests.engine.test_loss import REPO_ROOT, _assert_grads_match
from tests.integration.tiny_run import free_port, launch_env

PROBE = REPO_ROOT / "tests" / "engine" / "sp_probe.py"


def test_groups_are_consecutive_ranks_and_the_sizes_must_divide():
    assert SequenceParallelLayout.of(5, 8, 2) == SequenceParallelLayout(size=2, rank=1, group=2, groups=4)
    assert not SequenceParallelLayout.of(0, 1, 1).enabled
    with pytest.raises(ConfigError, match="train.sequence_parallel=3 must divide the world size 4"):
        SequenceParallelLayout.of(0, 4, 3)
    check_heads(2, heads=14, kv_heads=2, where="config.json")
    check_heads(4, heads=8, kv_heads=2, where="x")  # kv heads replicated
    with pytest.raises(ConfigError, match="must divide the number of attention heads, 14"):
        check_heads(4, heads=14, kv_heads=2, where="config.json")


def test_a_shard_keeps_each_target_where_the_full_row_put_it():
    mb = collate_rows(sp_probe.samples(packed=True)[:2], grad_probe.LENGTH, 0, "none")
    cuts = [mb.sequence_shard(r, 3) for r in range(3)]
    assert torch.equal(torch.cat([c.targets for c in cuts], dim=1), shift_labels(mb.labels))
    assert torch.equal(torch.cat([c.position_ids for c in cuts], dim=1), mb.position_ids)
    assert sum(int((c.targets != IGNORE_INDEX).sum()) for c in cuts) == count_targets(mb.labels)
    assert set(cuts[1].model_inputs()) == {"input_ids", "targets", "position_ids", "source_index"}
    with pytest.raises(ValueError, match="do not cut into 5 equal parts"):
        mb.sequence_shard(0, 5)


def _reference(packed: bool) -> tuple[dict, float, int]:
    """float64, one process, every sample run alone through the plain HF model: the definition."""
    from engine.loss import CausalLMWithMaskedLoss

    model = CausalLMWithMaskedLoss(grad_probe.tiny_model(), fused=False).double()
    loss_sum, count = torch.zeros((), dtype=torch.float64), 0
    for row in sp_probe.samples(packed):
        for sample in row:
            ids = torch.as_tensor(sample.input_ids)[None]
            labels = torch.as_tensor(sample.labels)[None].clone()
            labels[0, 0] = IGNORE_INDEX
            targets = shift_labels(labels)
            logits = model.lm(input_ids=ids).logits
            loss_sum = loss_sum + F.cross_entropy(logits[0], targets[0], ignore_index=IGNORE_INDEX, reduction="sum")
            count += int((targets != IGNORE_INDEX).sum())
    (loss_sum / count).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}, float(loss_sum.detach()), count


def _probe(tmp_path, sp: int, *extra: str) -> dict:
    out = tmp_path / f"sp{sp}{''.join(extra)}.pt"
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), str(PROBE), "--out", str(out),
           "--sp", str(sp), "--micro", "2", *extra]
    proc = subprocess.run(cmd, cwd=tmp_path, env=launch_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return torch.load(out, weights_only=False)


@pytest.mark.distributed
@pytest.mark.parametrize("packed,zero", [(False, "2"), (True, "2"), (True, "3")],
                         ids=["unpacked-zero2", "packed-zero2", "packed-zero3"])
def test_sp2_loss_and_gradients_equal_sp1_and_the_definition(tmp_path, packed, zero):
    extra = (("--packed",) if packed else ()) + ("--zero", zero)
    sp1, sp2 = _probe(tmp_path, 1, *extra), _probe(tmp_path, 2, *extra)
    want, loss_sum, count = _reference(packed)
    assert sp2["count"] == sp1["count"] == count
    assert sp2["loss_sum"] == pytest.approx(sp1["loss_sum"], rel=1e-6)
    assert sp2["loss_sum"] == pytest.approx(loss_sum, rel=1e-5)
    _assert_grads_match(sp2["grads"], sp1["grads"], rel=1e-5)
    _assert_grads_match(sp2["grads"], want, rel=1e-5)
