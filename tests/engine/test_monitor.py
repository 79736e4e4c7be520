"""Monitor: the MFU formula against a hand count, hparams/scalars read back, consumption shares."""

from __future__ import annotations

import numpy as np
import pytest

from engine.checkpointing.consumption import SourceConsumption
from engine.monitor import Monitor, attention_context, flatten_for_hparams, flops_per_token, matmul_parameters, mfu

H, I, L, V, KV_HEADS, HEADS = 64, 160, 3, 500, 2, 4


def _llama(tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=L,
                                        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                                        tie_word_embeddings=tied))


@pytest.mark.parametrize("tied", [True, False])
def test_matmul_parameters_by_hand(tied):
    kv = H // HEADS * KV_HEADS
    per_layer = H * H + 2 * H * kv + H * H + 3 * H * I  # q, k, v, o, gate/up/down
    expected = L * per_layer + V * H  # the lm_head is a matmul; the input embedding is a lookup
    assert matmul_parameters(_llama(tied)) == expected


def test_flops_per_token_and_mfu_by_hand():
    n, seq = 1_000_000, 512
    flops = flops_per_token(n, L, H, seq)
    assert flops == 6 * n + 12 * L * H * seq
    # 10k tokens/s per rank at 7.2e9 FLOPs per token = 72 TFLOP/s of 100 peak = 72%.
    assert mfu(10_000, 7.2e9, 100.0) == pytest.approx(0.72)
    assert mfu(10_000, 7.2e9, 0.0) is None


def test_flatten_for_hparams():
    flat = flatten_for_hparams({"train": {"lr": 1e-3, "betas": (0.9, 0.95)}, "run_dir": "r", "world_size": None,
                                "data": {"sources": [{"name": "a"}]}})
    assert flat == {"train.lr": 1e-3, "train.betas": "[0.9, 0.95]", "run_dir": "r", "world_size": "none",
                    "data.sources": '[{"name": "a"}]'}


def test_monitor_writes_hparams_scalars_and_text(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    mon = Monitor(tmp_path, rank=0, enabled_tb=True, total_steps=2, start_step=0, peak_tflops=1.0, world_size=1)
    mon.log_config({"train": {"lr": 0.5}}, metric_tags=("train/loss", "eval/loss"))
    mon.log_step(1, {"train/loss": 2.0})
    mon.log_scalars(2, {"eval/loss": 1.5})
    mon.close()
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    assert [e.value for e in acc.Scalars("eval/loss")] == [1.5]
    assert [e.step for e in acc.Scalars("train/loss")] == [1]
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = acc.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert {m.name.tag for m in experiment.metric_infos} == {"train/loss", "eval/loss"}
    assert [h.name for h in experiment.hparam_infos] == ["train.lr"]
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 2


def test_other_ranks_write_nothing(tmp_path):
    mon = Monitor(tmp_path, rank=1, enabled_tb=True, total_steps=2, start_step=0, peak_tflops=1.0, world_size=2)
    mon.log_config({"a": 1})
    mon.log_step(1, {"train/loss": 2.0})
    mon.log_scalars(1, {"eval/loss": 2.0})
    mon.close()
    assert list(tmp_path.iterdir()) == []


def test_consumption_shares_and_resume():
    c = SourceConsumption.from_quotas(["a", "b"], [300, 100])
    c.add([3, 1], [30, 20], [10, 5])
    c.add([2, 2], [20, 40], [8, 9])
    s = c.scalars()
    assert s["mixture/a/cum_samples"] == 5 and s["mixture/b/cum_tokens"] == 60
    assert s["mixture/a/share"] == pytest.approx(5 / 8) and s["mixture/a/target_share"] == pytest.approx(0.75)
    resumed = SourceConsumption.from_quotas(["a", "b"], [300, 100])
    resumed.load_state_dict(c.state_dict())
    assert resumed.scalars() == s
    other = SourceConsumption.from_quotas(["x", "b"], [1, 1])
    other.load_state_dict(c.state_dict())  # another mixture: counters start afresh
    assert other.samples == [0, 0]


def test_attention_context_is_the_token_weighted_sample_length():
    # samples of 2 and 6 tokens: 2 tokens see a 2-square, 6 tokens a 6-square -> (4 + 36) / 8
    assert attention_context([np.array([2]), np.array([6])], seq_len=512) == pytest.approx(5.0)
    assert attention_context([np.array([600, 700])], seq_len=512) == 512  # never beyond a row
    assert attention_context([np.zeros(0)], seq_len=64) == 64
