"""Invariant 1 of docs/ARCHITECTURE.md: one step's gradient is grad(sum of response-token CE) / global count,
whatever the split into micro-batches, accumulation steps and ranks; and the fused loss under
ZeRO-3 (partitioned lm_head) gives the gradients of the plain HF path."""

from __future__ import annotations

import subprocess

import pytest
import torch
import torch.nn.functional as F

from data_pipeline.schedule.labels import IGNORE_INDEX, count_targets, shift_labels
from engine.loss import CausalLMWithMaskedLoss, scaled_for_deepspeed
from tests.engine import grad_probe
from tests.integration.tiny_run import REPO_ROOT, free_port, launch_env

PROBE = REPO_ROOT / "tests" / "engine" / "grad_probe.py"


def test_shift_labels_moves_targets_left_and_masks_the_last_position():
    labels = torch.tensor([[-100, -100, 5, 6, 7], [1, 2, -100, 4, -100]])
    shifted = shift_labels(labels)
    assert shifted.tolist() == [[-100, 5, 6, 7, -100], [2, -100, 4, -100, -100]]
    assert count_targets(labels) == int((shifted != IGNORE_INDEX).sum()) == 5


def test_deepspeed_scaling_undoes_accumulation_and_rank_averaging():
    loss = torch.tensor(6.0)
    # DeepSpeed divides by accumulation steps and averages over ranks: 6 * (2*4/12) / 4 / 2 = 0.5.
    assert scaled_for_deepspeed(loss, 12, world_size=2, grad_accum=4).item() / 4 / 2 == pytest.approx(0.5)
    # A global batch with nothing to train gives zero, not NaN.
    assert scaled_for_deepspeed(torch.tensor(0.0), 0, world_size=2, grad_accum=4).item() == 0.0


def _reference(untied: bool = False) -> tuple[dict, float, int]:
    """float64, one process, the whole global batch at once: the definition of the right answer."""
    model = grad_probe.tiny_model(tie=not untied).double()
    batch = grad_probe.global_batch()
    logits = model(input_ids=batch["input_ids"]).logits
    targets = shift_labels(batch["labels"])
    loss_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")
    count = int((targets != IGNORE_INDEX).sum())
    (loss_sum / count).backward()
    grads = {f"lm.{n}": p.grad.detach().clone() for n, p in model.named_parameters()}
    return grads, float(loss_sum.detach()), count


def _probe(tmp_path, world: int, micro: int, accum: int, zero: int = 2, *extra: str) -> dict:
    out = tmp_path / f"grads_w{world}_m{micro}_a{accum}_z{zero}{''.join(extra)}.pt"
    cmd = ["deepspeed", "--num_gpus", str(world), "--master_port", str(free_port()), str(PROBE),
           "--out", str(out), "--zero", str(zero), "--micro", str(micro), "--accum", str(accum), *extra]
    proc = subprocess.run(cmd, cwd=tmp_path, env=launch_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return torch.load(out, weights_only=False)


def _assert_grads_match(got: dict, want: dict, rel: float) -> None:
    assert set(got) == set(want)
    num = sum(float((got[k] - want[k]).norm() ** 2) for k in want) ** 0.5
    den = sum(float(want[k].norm() ** 2) for k in want) ** 0.5
    assert num / den <= rel, f"relative gradient error {num / den:.3g} > {rel}"
    for k in want:  # and no single tensor hides a large error behind the global norm
        err = float((got[k] - want[k]).norm()) / max(float(want[k].norm()), 1e-12)
        assert err <= 100 * rel, f"{k}: relative error {err:.3g}"


@pytest.mark.distributed
@pytest.mark.parametrize("world,micro,accum", [(1, 2, 4), (2, 2, 2), (2, 4, 1)])
def test_gradient_is_global_token_mean_for_any_split(tmp_path, world, micro, accum):
    want, loss_sum, count = _reference()
    got = _probe(tmp_path, world, micro, accum)
    assert got["count"] == count == sum(grad_probe.RESPONSE_TOKENS)  # no response at position 0
    assert got["loss_sum"] == pytest.approx(loss_sum, rel=1e-5)
    _assert_grads_match(got["grads"], want, rel=1e-5)


def test_per_micro_batch_mean_would_fail_the_invariant():
    """The comparison above can fail: averaging per micro-batch gives a measurably different
    gradient on the same batch (so the invariant test is not passing by construction)."""
    want, _, _ = _reference()
    model = grad_probe.tiny_model().double()
    batch = grad_probe.global_batch()
    for j in range(4):
        mb = {k: v[2 * j:2 * j + 2] for k, v in batch.items()}
        logits = model(input_ids=mb["input_ids"]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), shift_labels(mb["labels"]).reshape(-1),
                               ignore_index=IGNORE_INDEX)
        (loss / 4).backward()
    wrong = {f"lm.{n}": p.grad for n, p in model.named_parameters()}
    with pytest.raises(AssertionError):
        _assert_grads_match(wrong, want, rel=1e-5)


@pytest.mark.distributed
@pytest.mark.parametrize("untied,strategy", [(False, "row_chunks"), (True, "row_chunks"), (True, "vocab_blocks")],
                         ids=["tied", "untied", "untied-vocab_blocks"])
def test_zero3_fused_loss_matches_hf_path(tmp_path, untied, strategy):
    """2 ranks, ZeRO-3: the lm_head weight is partitioned and gathered by DeepSpeed for the fused
    loss; loss and full gradients equal the plain HF (full logits) path, with either algorithm."""
    extra = ("--untied",) if untied else ()
    fused = _probe(tmp_path, 2, 2, 2, 3, "--strategy", strategy, *extra)
    hf = _probe(tmp_path, 2, 2, 2, 3, "--hf-loss", *extra)
    want, loss_sum, _ = _reference(untied=untied)
    assert fused["loss_sum"] == pytest.approx(hf["loss_sum"], rel=1e-6)
    assert fused["loss_sum"] == pytest.approx(loss_sum, rel=1e-5)
    _assert_grads_match(fused["grads"], hf["grads"], rel=1e-5)
    _assert_grads_match(fused["grads"], want, rel=1e-5)


def test_all_masked_batch_gives_zero_loss_and_zero_gradients():
    model = CausalLMWithMaskedLoss(grad_probe.tiny_model(), backend="torch")
    batch = grad_probe.global_batch(masked_everything=True)
    loss_sums, counts = model(**batch)
    assert int(counts.sum()) == 0
    loss = scaled_for_deepspeed(loss_sums.sum(), int(counts.sum()), world_size=1, grad_accum=1)
    loss.backward()
    assert loss.item() == 0.0
    for name, p in model.named_parameters():
        assert p.grad is None or torch.count_nonzero(p.grad) == 0, name


@pytest.mark.parametrize("strategy", ("row_chunks", "vocab_blocks"))
def test_fused_and_hf_paths_agree_in_process(strategy):
    torch.manual_seed(0)
    batch = grad_probe.global_batch()
    results = []
    for fused in (True, False):
        model = CausalLMWithMaskedLoss(grad_probe.tiny_model(), fused=fused, backend="torch", num_sources=2,
                                       strategy=strategy)
        source_index = torch.zeros_like(batch["input_ids"])
        source_index[4:] = 1
        loss_sums, counts = model(**batch, source_index=source_index)
        loss_sums.sum().backward()
        results.append((loss_sums.detach(), counts, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (lf, cf, gf), (lh, ch, gh) = results
    assert torch.equal(cf, ch) and cf.tolist() == [24, 48]
    torch.testing.assert_close(lf, lh, rtol=1e-5, atol=1e-5)
    _assert_grads_match({k: v.double() for k, v in gf.items()}, {k: v.double() for k, v in gh.items()}, rel=1e-5)
