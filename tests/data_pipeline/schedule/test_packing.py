"""Packing: consumes a contiguous run of the schedule exactly once, fills by first-fit, never
overflows a row, and the loss of a packed batch equals the loss of the same samples unpacked
(on a real tiny transformers LlamaForCausalLM)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_pipeline.schedule.collate import LoadedSample, collate_rows
from data_pipeline.schedule.packing import SampleTooLongError, pack_global_batch
from tests.data_pipeline.fake_sources import VOCAB, FakeSource


def _lengths(seed: int, n: int = 500, high: int = 40) -> list[int]:
    return np.random.default_rng(seed).integers(1, high + 1, n).tolist()


@pytest.mark.parametrize("seed", range(5))
def test_pack_consumes_contiguous_positions_once_and_fits(seed):
    lengths = _lengths(seed)
    batch = pack_global_batch(7, lambda p: lengths[p], rows=6, seq_len=64)
    packed = sorted(p for row in batch.rows for p in row)
    assert packed == list(range(7, batch.end))
    loads = [sum(lengths[p] for p in row) for row in batch.rows]
    assert max(loads) <= 64
    assert lengths[batch.end] > 64 - min(loads), "the batch closes only when the next sample fits nowhere"


@pytest.mark.parametrize("seed", range(5))
def test_pack_is_first_fit(seed):
    """Reference: the plain linear-scan first-fit gives the same rows as the segment tree."""
    lengths = _lengths(seed)
    batch = pack_global_batch(0, lambda p: lengths[p], rows=5, seq_len=50)
    free, rows, position = [50] * 5, [[] for _ in range(5)], 0
    while (row := next((r for r in range(5) if free[r] >= lengths[position]), -1)) >= 0:
        free[row] -= lengths[position]
        rows[row].append(position)
        position += 1
    assert batch.rows == tuple(tuple(r) for r in rows) and batch.end == position


def test_too_long_sample_is_refused_with_its_position():
    with pytest.raises(SampleTooLongError, match="schedule position 2.*data.seq_len is 16"):
        pack_global_batch(0, lambda p: [4, 4, 17][p], rows=2, seq_len=16)


def _shifted_ce_sum(model, batch) -> torch.Tensor:
    """Sum of next-token CE over trained tokens (labels shifted once, -100 ignored)."""
    logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=batch.attention_mask).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), batch.labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
    )


@pytest.mark.parametrize("attn,mask_format", [("sdpa", "bool"), ("eager", "additive"), ("sdpa", "additive")])
def test_packed_loss_equals_unpacked_loss_on_tiny_llama(attn, mask_format):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, attn_implementation=attn,
    )
    model = transformers.LlamaForCausalLM(config).float().eval()
    source = FakeSource("s", _lengths(11, n=40, high=30))
    lengths = source.lengths.tolist()
    layout = pack_global_batch(0, lambda p: lengths[p], rows=3, seq_len=64)
    assert any(len(row) > 1 for row in layout.rows), "the test needs rows holding several samples"

    def load(p):
        ids, labels = source.get(p)
        return LoadedSample(0, p, ids, labels)

    packed = collate_rows([[load(p) for p in row] for row in layout.rows], 64, 0, mask_format)
    unpacked_rows = [[load(p)] for p in range(layout.start, layout.end)]
    with torch.no_grad():
        packed_loss = _shifted_ce_sum(model, packed)
        unpacked_loss = sum(_shifted_ce_sum(model, collate_rows([row], len(row[0].input_ids), 0, mask_format)) for row in unpacked_rows)
    assert packed_loss.item() == pytest.approx(unpacked_loss.item(), rel=1e-5, abs=1e-5)
    n_trained = int((packed.labels != -100).sum())
    assert n_trained == sum(int((load(p).labels != -100)[1:].sum()) for p in range(layout.start, layout.end))
