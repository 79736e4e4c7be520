"""Offline export (`python -m engine.export`) from a ZeRO-3 checkpoint written by 2 ranks.

Comparison: the reference run exports in-process at its last step (parameters gathered from the
live engine) and saves a checkpoint at that same step; the offline export rebuilds the weights from
the per-rank fp32 partitions on disk. Same step, same fp32 weights: logits must agree to 1e-5.
"""

from __future__ import annotations

import pytest
import torch

from engine.checkpointing import checkpoint
from engine.export import main as export_main
from tests.integration.lifecycle import MAX_STEPS, reference_run

pytestmark = [pytest.mark.distributed]


def _logits(model_dir, input_ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def test_offline_export_of_zero3_checkpoint_matches_in_process_export(tmp_path_factory, tmp_path):
    from transformers import AutoTokenizer

    run_dir = reference_run(tmp_path_factory.mktemp("lifecycle"))
    ckpt = run_dir / "checkpoints" / checkpoint.tag_for(MAX_STEPS)
    assert checkpoint.is_complete(ckpt)
    out = tmp_path / "exported"
    assert export_main(["--checkpoint", str(ckpt), "--out", str(out), "--dtype", "fp32"]) == 0

    tok = AutoTokenizer.from_pretrained(str(out))
    ids = tok.apply_chat_template([{"role": "user", "content": "把数字 7 写成中文。"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    offline, in_process = _logits(out, ids), _logits(run_dir / "export", ids)
    assert offline.shape == in_process.shape
    assert torch.allclose(offline, in_process, rtol=0, atol=1e-5), (offline - in_process).abs().max()

    assert export_main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "bf16"), "--dtype", "bf16"]) == 0
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(str(tmp_path / "bf16")).dtype == torch.bfloat16


def test_export_refuses_incomplete_checkpoint(tmp_path):
    partial = tmp_path / checkpoint.tag_for(3)
    partial.mkdir()
    assert export_main(["--checkpoint", str(partial), "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()
