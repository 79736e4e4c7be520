"""The real launcher, 2 ranks, every ZeRO stage: the loss falls, TensorBoard holds the scalars, a
checkpoint resumes to the same next-step loss, and the export loads and generates."""

from __future__ import annotations

import math

import pytest
import torch

from engine.checkpointing import checkpoint
from tests.integration.tiny_run import explain, launch_deepspeed, read_metrics, tiny_config, write_config

pytestmark = [pytest.mark.distributed]

STAGES = ["zero0", "zero1", "zero2", "zero3", "zero3_offload"]
SCALARS = {"train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_s", "source/zh_demo/loss"}


def _tb_scalar_tags(tb_dir) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.parametrize("stage", STAGES)
def test_train_resume_export(stage, tmp_path):
    run_dir = tmp_path / "run"
    # First job: 8-step schedule, checkpoints at 4 and (stop) 5, then it stops.
    cfg = tiny_config(run_dir, zero=stage, max_steps=8, train={"stop_at_step": 5})
    config = write_config(tmp_path / "run.yaml", cfg)
    first = launch_deepspeed(config, log=tmp_path / "first.log")
    assert first.returncode == 0, explain(first)
    first_metrics = read_metrics(run_dir)
    assert [m["step"] for m in first_metrics] == [1, 2, 3, 4, 5]
    ckpt4 = run_dir / "checkpoints" / checkpoint.tag_for(4)
    assert checkpoint.is_complete(ckpt4)
    assert checkpoint.find_latest(run_dir / "checkpoints").name == checkpoint.tag_for(5)
    assert not (run_dir / "export").exists()  # a stopped job does not export a half-trained model

    # Second job: resume from step 4 explicitly and run to the end.
    second = launch_deepspeed(config, "train.stop_at_step=null", f"checkpoint.resume={ckpt4}",
                              log=tmp_path / "second.log")
    assert second.returncode == 0, explain(second)
    resumed = read_metrics(run_dir)[len(first_metrics):]
    assert [m["step"] for m in resumed] == [5, 6, 7, 8]
    # Same weights, optimizer, schedule and data position: the same step-5 loss.
    assert resumed[0]["train/loss"] == pytest.approx(first_metrics[4]["train/loss"], rel=1e-5)
    assert resumed[0]["train/lr"] == pytest.approx(first_metrics[4]["train/lr"], rel=1e-9)

    losses = [m["train/loss"] for m in first_metrics[:4] + resumed]
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-2:]) / 2 < losses[0] - 0.3, f"loss did not fall: {losses}"

    tags = _tb_scalar_tags(run_dir / "tb")
    assert SCALARS <= set(tags), f"missing scalars: {SCALARS - set(tags)}"
    assert len(tags["train/loss"]) >= 8

    export = run_dir / "export"
    assert (export / "model.safetensors").is_file()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(export))
    tok = AutoTokenizer.from_pretrained(str(export))
    ids = tok.apply_chat_template([{"role": "user", "content": "把数字 7 写成中文。"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids.shape[1]
