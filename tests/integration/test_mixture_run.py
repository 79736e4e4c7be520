"""A real 2-rank run mixing the shared alpaca and tool-call sets at 70/30 with the shared tokenizer:
every global batch holds exactly 7 + 3 samples (from the sample-id log, joined over ranks), and
TensorBoard has a loss curve per source."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest

from tests.integration.test_train_zero import _tb_scalar_tags
from tests.integration.tiny_run import explain, launch_deepspeed, read_metrics, tiny_config, write_config

pytestmark = [pytest.mark.distributed]


def test_70_30_mixture_is_exact_per_global_batch(tmp_path: Path, shared_data: Path):
    run_dir = tmp_path / "run"
    cfg = tiny_config(
        run_dir, max_steps=5,
        model={"from_scratch": {**tiny_config(run_dir)["model"]["from_scratch"], "max_position_embeddings": 512}},
        tokenizer={"path": str(shared_data / "tokenizer-zh-6400")},
        data={"sources": [
            {"name": "alpaca", "path": str(shared_data / "alpaca_zh_demo.json"), "format": "alpaca", "proportion": 0.7},
            {"name": "toolcall", "path": str(shared_data / "glaive_toolcall_zh_demo.json"), "format": "sharegpt",
             "proportion": 0.3},
        ], "seq_len": 512, "packing": False, "log_sample_ids": True, "num_proc": 1},
        train={"micro_batch_size": 5, "global_batch_size": 10},
        log={"sample_prompts": []},
        checkpoint={"every_steps": 0, "keep_last": 1, "export_at_end": False},
    )
    proc = launch_deepspeed(write_config(tmp_path / "mix.yaml", cfg), log=tmp_path / "mix.log")
    assert proc.returncode == 0, explain(proc)

    per_step: dict[int, list] = defaultdict(list)
    for rank_log in sorted((run_dir / "sample_ids").glob("rank*.jsonl")):
        for line in rank_log.read_text().splitlines():
            record = json.loads(line)
            per_step[record["step"]].extend(tuple(x) for x in record["ids"])
    assert sorted(per_step) == [1, 2, 3, 4, 5]
    seen = set()
    for step, ids in per_step.items():
        by_source = [sum(1 for s, _ in ids if s == k) for k in (0, 1)]
        assert by_source == [7, 3], f"step {step}: {by_source}"
        assert not seen & set(ids), f"step {step} repeats a sample within the first pass"
        seen |= set(ids)

    tags = _tb_scalar_tags(run_dir / "tb")
    for name in ("alpaca", "toolcall"):
        assert len(tags[f"source/{name}/loss"]) == 5
    metrics = read_metrics(run_dir)
    assert all(m["source/alpaca/samples"] == 7 and m["source/toolcall/samples"] == 3 for m in metrics)
