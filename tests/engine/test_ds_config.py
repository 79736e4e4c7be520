"""DeepSpeed config fill-in: every "auto" resolved from the run config; contradictions refused."""

import json
from pathlib import Path

import pytest

from engine.config import ConfigError, load_config
from engine.ds_config import build_ds_config

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO = REPO_ROOT / "configs" / "sft" / "demo.yaml"
TEMPLATES = sorted((REPO_ROOT / "configs" / "ds").glob("*.json"))


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.stem)
@pytest.mark.parametrize("world", [1, 2, 4])
def test_templates_fill_completely(template, world):
    cfg = load_config(DEMO, [f"train.deepspeed={template}", "train.global_batch_size=16", "train.micro_batch_size=2"])
    ds = build_ds_config(cfg, world, on_cuda=False, base_dir=REPO_ROOT)
    assert ds["train_batch_size"] == 16
    assert ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] * 2 * world == 16
    assert ds["optimizer"]["params"]["lr"] == cfg.train.lr
    assert ds["optimizer"]["params"]["betas"] == list(cfg.train.betas)
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False
    assert "auto" not in json.dumps(ds)
    assert ds["zero_optimization"]["stage"] == int(template.stem[4])
    # On CPU: torch's AdamW (no multi-minute C++ build), and no pinned memory.
    assert ds["optimizer"]["params"]["torch_adam"] is True
    if "offload" in template.stem:
        assert ds["zero_force_ds_cpu_optimizer"] is False
        assert ds["zero_optimization"]["offload_optimizer"]["pin_memory"] is False


def test_gpu_defaults_pick_fused_and_cpu_adam():
    cfg = load_config(DEMO, ["train.deepspeed=configs/ds/zero3_offload.json", "model.dtype=bf16",
                             "train.global_batch_size=32"])
    ds = build_ds_config(cfg, 8, on_cuda=True, base_dir=REPO_ROOT)
    assert "torch_adam" not in ds["optimizer"]["params"]
    assert ds["bf16"]["enabled"] is True
    assert ds["zero_optimization"]["offload_optimizer"]["pin_memory"] is True


def _with_template(tmp_path, **top):
    template = json.loads((REPO_ROOT / "configs" / "ds" / "zero2.json").read_text())
    template.update(top)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(template))
    return path


def test_hard_coded_value_that_agrees_is_kept(tmp_path):
    path = _with_template(tmp_path, train_batch_size=16)
    cfg = load_config(DEMO, [f"train.deepspeed={path}", "train.global_batch_size=16", "train.micro_batch_size=4"])
    assert build_ds_config(cfg, 2, on_cuda=False)["train_batch_size"] == 16


@pytest.mark.parametrize("key,value,run_key", [
    ("train_batch_size", 32, "train.global_batch_size"),
    ("train_micro_batch_size_per_gpu", 8, "train.micro_batch_size"),
    ("gradient_clipping", 0.5, "train.grad_clip"),
])
def test_contradiction_names_both_keys(tmp_path, key, value, run_key):
    path = _with_template(tmp_path, **{key: value})
    cfg = load_config(DEMO, [f"train.deepspeed={path}"])
    with pytest.raises(ConfigError, match=f"{key}={value}.*{run_key}"):
        build_ds_config(cfg, 2, on_cuda=False)


def test_batch_geometry_that_does_not_divide_is_refused():
    cfg = load_config(DEMO, ["train.global_batch_size=10", "train.micro_batch_size=4"])
    with pytest.raises(ConfigError, match="train.global_batch_size=10 is not a multiple"):
        build_ds_config(cfg, 2, on_cuda=False, base_dir=REPO_ROOT)


def test_missing_or_invalid_template(tmp_path):
    cfg = load_config(DEMO, ["train.deepspeed=nope.json"])
    with pytest.raises(ConfigError, match="train.deepspeed"):
        build_ds_config(cfg, 1, on_cuda=False, base_dir=REPO_ROOT)
    bad = tmp_path / "bad.json"
    bad.write_text("{\n  'single quotes': 1\n}")
    cfg = load_config(DEMO, [f"train.deepspeed={bad}"])
    with pytest.raises(ConfigError, match="line 2"):
        build_ds_config(cfg, 1, on_cuda=False)


# ----------------------------------------------------------------------------------------------
# checked against DeepSpeed's own config classes


def _template_file(tmp_path, edit) -> Path:
    template = json.loads((REPO_ROOT / "configs" / "ds" / "zero2.json").read_text())
    edit(template)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(template))
    return path


def test_misspelt_top_level_key_is_refused_with_the_nearest_valid_one(tmp_path):
    path = _template_file(tmp_path, lambda t: t.update(zero_optimizaton=t.pop("zero_optimization")))
    cfg = load_config(DEMO, [f"train.deepspeed={path}"])
    with pytest.raises(ConfigError, match=r"ds.json: unknown DeepSpeed config key 'zero_optimizaton'; "
                                          r"did you mean 'zero_optimization'\?"):
        build_ds_config(cfg, 2, on_cuda=False)


def test_misspelt_zero_key_is_refused_with_the_nearest_valid_one(tmp_path):
    path = _template_file(tmp_path, lambda t: t["zero_optimization"].update(overlap_comms=True))
    cfg = load_config(DEMO, [f"train.deepspeed={path}"])
    with pytest.raises(ConfigError, match=r"'zero_optimization.overlap_comms'; did you mean "
                                          r"'zero_optimization.overlap_comm'\?"):
        build_ds_config(cfg, 2, on_cuda=False)


def test_valid_key_sets_come_from_deepspeed():
    from engine.ds_schema import top_level_keys, zero_keys

    for key in ("zero_optimization", "optimizer", "scheduler", "bf16", "flops_profiler", "activation_checkpointing",
                "tensorboard", "comms_logger", "zero_force_ds_cpu_optimizer"):
        assert key in top_level_keys(), key
    for key in ("stage", "offload_optimizer", "stage3_prefetch_bucket_size", "reduce_bucket_size"):
        assert key in zero_keys(), key


@pytest.mark.parametrize("edit,match", [
    (lambda t: t["zero_optimization"].update(stage=7), r"ds.json: zero_optimization.stage: .*got 7"),
    (lambda t: t["zero_optimization"].update(offload_optimizer={"device": "gpu"}),
     r"ds.json: zero_optimization.offload_optimizer.device: .*'gpu'"),
    (lambda t: t["fp16"].update(hysteresis="two"), r"ds.json: DeepSpeed rejects the config .*fp16.hysteresis: .*'two'"),
    (lambda t: t.update(gradient_allreduce_op="sum", zero_optimization={"stage": 3}),
     r"ds.json: DeepSpeed rejects the config: gradient_allreduce_op='sum' is not supported with ZeRO stage 3"),
])
def test_value_deepspeed_rejects_is_a_config_error_naming_file_and_key(tmp_path, edit, match):
    path = _template_file(tmp_path, edit)
    cfg = load_config(DEMO, [f"train.deepspeed={path}"])
    with pytest.raises(ConfigError, match=match):
        build_ds_config(cfg, 2, on_cuda=False)


SCHEDULER = {"type": "WarmupCosineLR", "params": {"total_num_steps": "auto", "warmup_num_steps": "auto"}}


def test_scheduler_block_is_refused_unless_the_run_config_asks_for_it(tmp_path):
    path = _template_file(tmp_path, lambda t: t.update(scheduler=SCHEDULER))
    cfg = load_config(DEMO, [f"train.deepspeed={path}"])
    with pytest.raises(ConfigError, match=r"scheduler block \(type 'WarmupCosineLR'\) would replace the run's "
                                          r"warmup \+ cosine.*train.use_deepspeed_scheduler: true"):
        build_ds_config(cfg, 2, on_cuda=False)
    cfg = load_config(DEMO, [f"train.deepspeed={path}", "train.use_deepspeed_scheduler=true"])
    ds = build_ds_config(cfg, 2, on_cuda=False)
    assert ds["scheduler"]["params"]["total_num_steps"] == cfg.train.max_steps
    assert ds["scheduler"]["params"]["warmup_num_steps"] == cfg.warmup_steps


def test_use_deepspeed_scheduler_without_a_scheduler_block_is_refused():
    cfg = load_config(DEMO, ["train.use_deepspeed_scheduler=true"])
    with pytest.raises(ConfigError, match="train.use_deepspeed_scheduler: true, but .*zero2.json has no scheduler"):
        build_ds_config(cfg, 2, on_cuda=False, base_dir=REPO_ROOT)


def test_foreign_optimizer_block_is_refused_unless_the_run_config_asks_for_it(tmp_path):
    lamb = {"type": "Lamb", "params": {"lr": "auto", "max_coeff": 0.3}}
    path = _template_file(tmp_path, lambda t: t.update(optimizer=lamb))
    cfg = load_config(DEMO, [f"train.deepspeed={path}"])
    with pytest.raises(ConfigError, match=r"optimizer block \(type 'Lamb' with params max_coeff\) would replace "
                                          r"the run's AdamW.*train.use_deepspeed_optimizer: true"):
        build_ds_config(cfg, 2, on_cuda=False)
    cfg = load_config(DEMO, [f"train.deepspeed={path}", "train.use_deepspeed_optimizer=true"])
    ds = build_ds_config(cfg, 2, on_cuda=False)
    assert ds["optimizer"]["type"] == "Lamb" and ds["optimizer"]["params"]["lr"] == cfg.train.lr
    assert "torch_adam" not in ds["optimizer"]["params"]


def test_template_without_optimizer_trains_with_the_runs_adamw(tmp_path):
    path = _template_file(tmp_path, lambda t: t.pop("optimizer"))
    cfg = load_config(DEMO, [f"train.deepspeed={path}"])
    ds = build_ds_config(cfg, 2, on_cuda=False)
    assert ds["optimizer"]["type"] == "AdamW"
    assert ds["optimizer"]["params"]["lr"] == cfg.train.lr and ds["optimizer"]["params"]["torch_adam"] is True
