"""LoRA end to end through the real launcher on 2 CPU ranks: a full stage from scratch, then a LoRA
stage under ZeRO-3 on its export; the adapter and merged exports; exact resume on another world size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.integration.tiny_run import explain, launch_deepspeed, read_metrics, tiny_config, write_config

pytestmark = [pytest.mark.distributed]

LORA_STEPS = 16
HALF = LORA_STEPS // 2
LOSS_RTOL = 1e-5  # fp32, the same global batches; only the reduction order may differ


def _losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["train/loss"] for m in read_metrics(run_dir) if "train/loss" in m}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> tuple[Path, str]:
    tmp = tmp_path_factory.mktemp("lora")
    run_dir = tmp / "run"
    cfg = tiny_config(run_dir, zero="zero2", max_steps=3)
    cfg["log"] = {"every_steps": 1, "sample_prompts": [], "tensorboard": False}
    sources = cfg["data"].pop("sources")
    cfg["stages"] = [
        {"name": "full", "train": {"max_steps": 8}, "checkpoint": {"every_steps": 0}, "data": {"sources": sources}},
        {"name": "lora", "model": {"lora": {"r": 8, "alpha": 16, "modules_to_save": ["lm_head"]}}, "data": {"sources": sources},
         "train": {"max_steps": LORA_STEPS, "lr": 5e-3, "global_batch_size": 16, "deepspeed": "configs/ds/zero3.json"},
         "checkpoint": {"every_steps": HALF, "keep_last": 2, "export_merged": True}},
    ]
    proc = launch_deepspeed(write_config(tmp / "run.yaml", cfg), log=tmp / "run.log")
    assert proc.returncode == 0, explain(proc)
    return run_dir, proc.stdout + proc.stderr


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_lora_stage_trains_and_its_exports_agree(lora_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from engine.export import export_checkpoint

    run_dir, output = lora_run
    lora_dir, base_dir = run_dir / "lora", run_dir / "full" / "export"
    losses = _losses(lora_dir)
    assert sorted(losses) == list(range(1, LORA_STEPS + 1))
    first = sum(losses[s] for s in (1, 2, 3)) / 3
    last = sum(losses[s] for s in range(LORA_STEPS - 2, LORA_STEPS + 1)) / 3
    assert last < first - 0.05, losses  # the loss falls with only the adapters training
    assert "trainable, " in output and "ZeRO-3" in output
    line = next(x for x in output.splitlines() if "M trainable" in x and "ZeRO-3" in x)
    assert "100.00%" not in line  # the optimizer holds the adapters, not the frozen base

    adapter = lora_dir / "export"
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(base_dir.resolve())
    assert adapter_config["r"] == 8 and adapter_config["peft_type"] == "LORA"
    assert (adapter / "tokenizer.json").is_file()

    ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    base_logits = _logits(AutoModelForCausalLM.from_pretrained(base_dir), ids)
    with_adapter = _logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter), ids)
    merged = _logits(AutoModelForCausalLM.from_pretrained(lora_dir / "export_merged"), ids)
    # and offline, straight from the ZeRO-3 shards of the last checkpoint
    offline_dir = export_checkpoint(lora_dir / "checkpoints" / f"step_{LORA_STEPS:08d}", run_dir / "offline")
    offline = _logits(AutoModelForCausalLM.from_pretrained(offline_dir), ids)
    assert (with_adapter - base_logits).abs().max() > 1e-2  # the adapter trained: the checks mean something
    torch.testing.assert_close(merged, with_adapter, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(offline, merged, rtol=1e-5, atol=1e-5)


def test_lora_resume_on_another_world_size_continues_exactly(lora_run, tmp_path):
    """Stop the same LoRA run half-way on 2 ranks, resume it on 1: the losses of the second half
    equal the uninterrupted run's."""
    run_dir, _ = lora_run
    reference = _losses(run_dir / "lora")
    saved = json.loads((run_dir / "lora" / "checkpoints" / f"step_{HALF:08d}" / "run_config.json").read_text())
    saved["run_dir"] = str(tmp_path / "resumed")
    saved["checkpoint"]["export_merged"] = False
    config = write_config(tmp_path / "lora.yaml", saved)
    first = launch_deepspeed(config, f"train.stop_at_step={HALF}", log=tmp_path / "first.log")
    assert first.returncode == 0, explain(first)
    second = launch_deepspeed(config, num_procs=1, log=tmp_path / "second.log")
    assert second.returncode == 0, explain(second)
    assert "through a universal copy" in second.stdout + second.stderr
    resumed = _losses(tmp_path / "resumed")
    for step in range(1, LORA_STEPS + 1):
        assert resumed[step] == pytest.approx(reference[step], rel=LOSS_RTOL), (step, resumed, reference)
    assert (tmp_path / "resumed" / "export" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("zero", ["zero0", "zero1", "zero2", "zero3_offload"])
def test_lora_on_every_zero_stage_gives_the_zero3_losses(lora_run, tmp_path, zero):
    """The same LoRA run under another ZeRO stage (offload included): the same per-step losses."""
    run_dir, _ = lora_run
    reference = _losses(run_dir / "lora")
    saved = json.loads((run_dir / "lora" / "checkpoints" / f"step_{HALF:08d}" / "run_config.json").read_text())
    saved["run_dir"] = str(tmp_path / zero)
    saved["train"]["deepspeed"] = f"configs/ds/{zero}.json"
    proc = launch_deepspeed(write_config(tmp_path / "lora.yaml", saved), "train.stop_at_step=4",
                            "checkpoint.every_steps=0", log=tmp_path / "run.log")
    assert proc.returncode == 0, explain(proc)
    losses = _losses(tmp_path / zero)
    assert sorted(losses) == [1, 2, 3, 4]
    for step, loss in losses.items():
        assert loss == pytest.approx(reference[step], rel=LOSS_RTOL), (zero, step, losses, reference)
