"""Every shipped config loads, validates (each stage too) and fills its DeepSpeed template for the
world sizes its batch geometry allows."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.config import load_config
from engine.ds_config import build_ds_config
from engine.config import expand_stages

REPO_ROOT = Path(__file__).resolve().parents[2]
RUN_CONFIGS = sorted((REPO_ROOT / "configs").rglob("*.yaml"))
WORLD_SIZES = (1, 2, 8)


def test_there_are_configs_to_check():
    assert len(RUN_CONFIGS) >= 4


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_config_validates_and_fills_deepspeed(path):
    cfg = load_config(path)
    runs = [s.cfg for s in expand_stages(cfg)] if cfg.stages else [cfg]
    filled = 0
    for run in runs:
        for world in WORLD_SIZES:
            if run.train.global_batch_size % (run.train.micro_batch_size * world):
                continue
            ds = build_ds_config(run, world, on_cuda=False, base_dir=REPO_ROOT)
            assert ds["train_batch_size"] == run.train.global_batch_size
            filled += 1
    assert filled >= len(runs)  # at least one world size per run
