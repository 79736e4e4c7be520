"""Evaluation: the token-weighted mean over ranks, packing that changes no loss, equal forwards."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from data_pipeline.schedule.eval_batches import EvalSet, eval_batches, forwards_needed, rank_batches, rank_rows
from engine.evaluate import all_reduce_sums, evaluate, token_weighted
from engine.loss import CausalLMWithMaskedLoss
from tests.data_pipeline.fake_sources import VOCAB, FakeSource

# Per-rank (loss sum, token count) of two eval sets: rank 0 saw many easy tokens, rank 1 few hard ones.
RANK_SUMS = {0: ([3.0, 1.0], [6, 1]), 1: ([10.0, 0.0], [2, 0])}


def _all_reduce_worker(rank: int, init_file: str, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        sums, counts = all_reduce_sums(*RANK_SUMS[rank])
        results[rank] = token_weighted(["a", "b"], sums, counts)
    finally:
        dist.destroy_process_group()


def test_all_reduce_gives_the_token_weighted_mean(tmp_path):
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_all_reduce_worker, args=(str(tmp_path / "init"), results), nprocs=2, join=True)
        got = dict(results)
    # Hand computation: set a = (3 + 10) / (6 + 2); the mean of rank means would be (0.5 + 5) / 2.
    assert got[0] == got[1]
    assert got[0]["eval/a/loss"] == pytest.approx(13 / 8)
    assert got[0]["eval/b/loss"] == pytest.approx(1.0)
    assert got[0]["eval/loss"] == pytest.approx(14 / 9)
    assert got[0]["eval/a/tokens"] == 8


def test_a_set_without_tokens_reports_no_loss():
    out = token_weighted(["a", "b"], [2.0, 0.0], [4, 0])
    assert "eval/b/loss" not in out and out["eval/b/tokens"] == 0 and out["eval/loss"] == 0.5


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ranks_cover_every_sample_once_with_equal_forwards(world_size):
    lengths = np.random.default_rng(0).integers(2, 30, 101)
    seen = []
    for rank in range(world_size):
        rows = rank_rows(lengths, rank, world_size, seq_len=40)
        assert all(sum(lengths[i] for i in row) <= 40 for row in rows)
        seen += [i for row in rows for i in row]
    assert sorted(seen) == list(range(101))
    source = FakeSource("s", lengths)
    counts = {len(list(rank_batches(source, rank=r, world_size=world_size, seq_len=40, micro_batch_size=2, pad_id=0,
                                    mask_format="bool"))) for r in range(world_size)}
    assert counts == {forwards_needed(lengths, world_size, 40, 2)}


class _EngineStandIn(torch.nn.Module):
    """The parts of a DeepSpeed engine that evaluate() uses."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        self.device = torch.device("cpu")

    def forward(self, **inputs):
        return self.module(**inputs)


def _tiny_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).eval()


def test_evaluate_equals_per_token_cross_entropy_of_unpacked_samples():
    lm = _tiny_lm()
    engine = _EngineStandIn(CausalLMWithMaskedLoss(lm, num_sources=2, backend="torch"))
    engine.train()
    source = FakeSource("s", np.random.default_rng(1).integers(3, 20, 13))
    got = evaluate(engine, eval_batches([EvalSet("s", source)], rank=0, world_size=1, seq_len=48, micro_batch_size=2,
                                        pad_id=0))
    assert engine.module.training  # restored
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(source)):
            ids, labels = (torch.from_numpy(x)[None] for x in source.get(i))
            logits = lm(input_ids=ids).logits[0, :-1]
            target = labels[0, 1:]
            total += float(F.cross_entropy(logits, target, ignore_index=-100, reduction="sum"))
            count += int((target != -100).sum())
    assert got["eval/s/tokens"] == count
    assert got["eval/s/loss"] == pytest.approx(total / count, rel=1e-5)
