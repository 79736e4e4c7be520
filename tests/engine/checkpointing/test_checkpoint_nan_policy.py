"""nan_policy: the decision table, and that DeepSpeed's ZeRO optimizer really refuses a step whose
gradient is NaN in fp32 (weights, Adam state and lr schedule untouched; skipped_steps counts it),
which is what nan_policy=skip relies on."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from engine.nan_policy import NonFiniteStepError, check_policy_supported, step_was_skipped
from tests.integration.tiny_run import REPO_ROOT, free_port, launch_env


def _decide(policy, loss, refused, loss_scaling=False):
    return step_was_skipped(policy, 7, loss, refused, loss_scaling=loss_scaling, describe_sources=lambda: "a=nan")


def test_finite_step_is_never_skipped():
    assert _decide("stop", 1.5, False) is False and _decide("skip", 1.5, False) is False


def test_stop_policy_raises_naming_step_and_sources():
    with pytest.raises(NonFiniteStepError, match=r"step 7: non-finite loss nan.*a=nan"):
        _decide("stop", float("nan"), True)
    with pytest.raises(NonFiniteStepError, match="non-finite gradient norm"):
        _decide("stop", 1.5, True)


def test_skip_policy_skips_refused_steps_only():
    assert _decide("skip", float("inf"), True) is True
    assert _decide("skip", 1.5, True) is True
    with pytest.raises(NonFiniteStepError, match="already applied"):
        _decide("skip", float("nan"), False)


def test_fp16_overflow_is_loss_scaling_not_an_error():
    assert _decide("stop", 1.5, True, loss_scaling=True) is False


def test_skip_needs_an_optimizer_that_refuses_non_finite_steps():
    with pytest.raises(ValueError, match="train.nan_policy=skip"):
        check_policy_supported("skip", 0, "fp32")
    check_policy_supported("skip", 0, "bf16")
    check_policy_supported("skip", 2, "fp32")
    check_policy_supported("stop", 0, "fp32")


PROBE = textwrap.dedent("""
    import deepspeed, torch
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    cfg = {"train_batch_size": 1, "train_micro_batch_size_per_gpu": 1, "gradient_clipping": 1.0,
           "optimizer": {"type": "AdamW", "params": {"lr": 0.1, "torch_adam": True}},
           "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 10}},
           "zero_optimization": {"stage": 2}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    x = torch.ones(1, 4)
    def step(poison):
        loss = engine(x).sum() * (float("nan") if poison else 1.0)
        engine.backward(loss)
        engine.step()
    step(False)
    before = [p.detach().clone() for p in engine.module.parameters()]
    lr_before, skipped_before = engine.get_lr()[0], engine.skipped_steps
    step(True)
    after = list(engine.module.parameters())
    assert engine.skipped_steps == skipped_before + 1, engine.skipped_steps
    assert all(torch.equal(a, b) for a, b in zip(before, after)), "weights changed"
    assert engine.get_lr()[0] == lr_before, "lr schedule advanced"
    step(False)
    assert all(torch.isfinite(p).all() for p in engine.module.parameters()), "NaN leaked into the weights"
    print("PROBE-OK")
""")


def test_zero2_fp32_refuses_a_nan_gradient_step():
    env = launch_env()
    env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert "PROBE-OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
