"""Two stages (continued pretraining with SFT replay -> SFT) end to end through the real launcher."""

from __future__ import annotations

import json

import pytest

from engine.stages import STAGE_COMPLETE
from tests.integration.tiny_run import explain, launch_deepspeed, read_metrics, tiny_config, write_config

pytestmark = [pytest.mark.distributed]


def test_cpt_then_sft(tmp_path):
    run_dir = tmp_path / "run"
    cfg = tiny_config(run_dir, zero="zero2", max_steps=4)
    cfg["checkpoint"] = {"every_steps": 0}
    cfg["log"] = {"every_steps": 1}
    del cfg["data"]["sources"]
    cfg["stages"] = [
        {"name": "cpt", "train": {"kind": "cpt", "lr": 3e-3, "max_steps": 3},
         "data": {"sources": [{"name": "zh_text", "path": "builtin:zh_demo?n=300&seed=3", "format": "text",
                               "text_field": "output", "proportion": 0.6},
                              # replay: SFT data inside the cpt stage keeps its prompts masked
                              {"name": "zh_replay", "path": "builtin:zh_demo?n=300&seed=4", "format": "alpaca",
                               "proportion": 0.4, "train_on": "all_assistant"}]}},
        {"name": "sft", "train": {"kind": "sft", "max_steps": 3},
         "data": {"dedup": "exact",
                  "sources": [{"name": "zh_demo", "path": "builtin:zh_demo?n=300", "format": "alpaca",
                               "eval_count": 16}]}},
    ]
    proc = launch_deepspeed(write_config(tmp_path / "run.yaml", cfg), log=tmp_path / "run.log")
    assert proc.returncode == 0, explain(proc)

    for stage in ("cpt", "sft"):
        assert (run_dir / stage / "export" / "config.json").is_file()
        assert json.loads((run_dir / stage / STAGE_COMPLETE).read_text())["step"] == 3
    cpt, sft = read_metrics(run_dir / "cpt"), read_metrics(run_dir / "sft")
    cpt_lr = max(m["train/lr"] for m in cpt if "train/lr" in m)
    sft_lr = max(m["train/lr"] for m in sft if "train/lr" in m)
    assert sft_lr == pytest.approx(0.1 * cpt_lr, rel=1e-6)  # the default: 10% of the cpt lr
    # cpt trains every token of its text (but the first of each document, which nothing predicts);
    # the replayed chat samples and sft only the answers, a minority of each chat sample
    def trained_share(metrics: list[dict], source: str) -> float:
        rows = [m for m in metrics if f"source/{source}/tokens" in m]
        return (sum(m[f"source/{source}/response_tokens"] for m in rows)
                / sum(m[f"source/{source}/tokens"] for m in rows))

    cpt_share, replay_share = trained_share(cpt, "zh_text"), trained_share(cpt, "zh_replay")
    sft_share = trained_share(sft, "zh_demo")
    assert cpt_share > 0.6 and replay_share < 0.5 and sft_share < 0.5, (cpt_share, replay_share, sft_share)
    assert any("eval/zh_demo/loss" in m for m in sft)
    # The sft stage started from the cpt export (weights and tokenizer): a stage without a model
    # path would have trained its own tokenizer into sft/tokenizer.
    assert (run_dir / "cpt" / "tokenizer").is_dir() and not (run_dir / "sft" / "tokenizer").exists()
    assert "stage 2/2 'sft'" in proc.stderr
    assert proc.stderr.count("Loading weights: 100%") == 1  # rank 0 only
    summary = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith('{"step"')))
    assert summary["export_dir"].endswith("sft/export")
