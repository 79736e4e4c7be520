"""The per-rank stream: rank slices tile the global batch for any world size, resume is exact
(also onto another world size), changed schedule inputs are refused, tensors follow the contract."""

from __future__ import annotations

import time

import pytest
import torch

from data_pipeline.schedule.accounting import consumed_sample_ids, source_counts
from data_pipeline.spec import DataConfigError
from data_pipeline.schedule.stream import SFTStream, StreamStateError
from tests.data_pipeline.fake_sources import fake_sources

GBS, SEQ = 8, 64


def make_stream(sources, specs, rank=0, world=1, mb=1, packing=True, seed=5, total_steps=20):
    return SFTStream(
        sources, specs, seq_len=SEQ, global_batch_size=GBS, micro_batch_size=mb, rank=rank,
        world_size=world, seed=seed, packing=packing, pad_id=0, total_steps=total_steps,
    )


def rows_of(micro_batches):
    """Per row: its sample ids and its non-padding tokens (padding length may differ per micro-batch)."""
    out = []
    for batch in micro_batches:
        for r, ids in enumerate(batch.sample_ids):
            real = batch.source_index[r] >= 0
            out.append((tuple(ids), batch.input_ids[r][real].tolist(), batch.labels[r][real].tolist()))
    return out


def global_steps(world, mb, packing, steps, start_state=None):
    """Concatenate every rank's rows per step, in rank order."""
    sources, specs = fake_sources([23, 57, 9])
    streams = [make_stream(sources, specs, rank=r, world=world, mb=mb, packing=packing) for r in range(world)]
    if start_state is not None:
        for s in streams:
            s.load_state_dict(start_state)
    return [sum((rows_of(s.next_step()) for s in streams), []) for _ in range(steps)], streams


@pytest.mark.parametrize("packing", [True, False])
def test_rank_slices_tile_the_global_batch_for_any_world_size(packing):
    reference, _ = global_steps(world=1, mb=2, packing=packing, steps=4)
    for world, mb in ((2, 1), (2, 2), (4, 1), (4, 2)):
        steps, _ = global_steps(world=world, mb=mb, packing=packing, steps=4)
        assert steps == reference, (world, mb)


def test_rank_reads_only_its_own_rows():
    sources, specs = fake_sources([23, 57, 9])
    stream = make_stream(sources, specs, rank=1, world=2, mb=2)
    batches = stream.next_step()
    reads = sorted((s.source_id, i) for s in sources for i in s.reads)
    assert reads == sorted(consumed_sample_ids(batches))


@pytest.mark.parametrize("packing", [True, False])
def test_resume_continues_identically_also_on_another_world_size(packing):
    straight, _ = global_steps(world=1, mb=4, packing=packing, steps=6)
    _, streams = global_steps(world=2, mb=2, packing=packing, steps=3)
    state = streams[0].state_dict()
    assert state == streams[1].state_dict(), "all ranks hold the same data state"
    assert state["step"] == 3
    resumed, _ = global_steps(world=4, mb=1, packing=packing, steps=3, start_state=state)
    assert resumed == straight[3:]


def test_changed_schedule_inputs_are_refused():
    sources, specs = fake_sources([23, 57, 9])
    stream = make_stream(sources, specs)
    stream.next_step()
    state = stream.state_dict()
    with pytest.raises(StreamStateError, match="seed"):
        make_stream(sources, specs, seed=6).load_state_dict(state)
    with pytest.raises(StreamStateError, match="packing"):
        make_stream(sources, specs, packing=False).load_state_dict(state)


def test_grad_accum_must_divide():
    sources, specs = fake_sources([5])
    with pytest.raises(DataConfigError, match="train.global_batch_size=8.*train.micro_batch_size"):
        make_stream(sources, specs, world=3, mb=1)
    assert make_stream(sources, specs, world=2, mb=2).grad_accum == 2


def test_no_sample_skipped_or_repeated_within_a_pass():
    sources, specs = fake_sources([40, 25])
    stream = make_stream(sources, specs, packing=True, total_steps=10)
    consumed = [sid for _ in range(6) for sid in consumed_sample_ids(stream.next_step())]
    drawn = stream.schedule.draws_before(stream.position)
    for source, n in enumerate((40, 25)):
        ids = [i for s, i in consumed if s == source]
        assert len(ids) == drawn[source]
        counts = [ids.count(i) for i in range(n)]
        assert max(counts) - min(counts) <= 1, counts


@pytest.mark.parametrize("packing", [True, False])
def test_tensor_contract(packing):
    sources, specs = fake_sources([23, 57, 9])
    stream = make_stream(sources, specs, world=2, mb=2, packing=packing)
    for batch in stream.next_step():
        ids, labels, pos, src = batch.input_ids, batch.labels, batch.position_ids, batch.source_index
        assert ids.dtype == labels.dtype == pos.dtype == src.dtype == torch.int64
        assert ids.shape == labels.shape == pos.shape == src.shape
        if packing:
            assert ids.shape[1] == SEQ
        mask = batch.attention_mask
        assert mask.shape == (ids.shape[0], 1, ids.shape[1], ids.shape[1]) and mask.dtype == torch.bool
        for r, row_ids in enumerate(batch.sample_ids):
            starts = (pos[r] == 0).nonzero().flatten().tolist()
            real = int((src[r] >= 0).sum())
            assert starts[: len(row_ids)] == [0] + starts[1 : len(row_ids)]
            for k, (start, (source, index)) in enumerate(zip(starts, row_ids)):
                n = int(sources[source].lengths[index])
                assert labels[r, start] == -100, "first token of a sample never trains"
                assert (src[r, start : start + n] == source).all()
                assert not mask[r, 0, start, :start].any(), "no attention to an earlier sample"
            assert (labels[r, real:] == -100).all() and (src[r, real:] == -1).all()


def test_source_counts_match_the_tensors():
    sources, specs = fake_sources([23, 57, 9])
    stream = make_stream(sources, specs)
    batches = stream.next_step()
    counts = source_counts(batches, 3)
    ids = consumed_sample_ids(batches)
    assert counts["samples"] == [sum(1 for s, _ in ids if s == k) for k in range(3)]
    assert counts["tokens"] == [sum(int(sources[s].lengths[i]) for s, i in ids if s == k) for k in range(3)]
    trained = [sum(int((sources[s].get(i)[1] != -100)[1:].sum()) for s, i in ids if s == k) for k in range(3)]
    assert counts["response_tokens"] == trained


def test_repeat_is_met_exactly_without_packing():
    """repeat=2 on a 12-sample source in a 10-step run of 8: exactly two passes over it."""
    sources, specs = fake_sources([12, 50])
    specs[0].repeat = 2.0
    stream = make_stream(sources, specs, packing=False, total_steps=10)
    consumed = [sid for _ in range(10) for sid in consumed_sample_ids(stream.next_step())]
    repeated = [i for s, i in consumed if s == 0]
    assert sorted(repeated) == sorted(list(range(12)) * 2)


def test_resume_far_into_the_run_does_not_replay():
    sources, specs = fake_sources([23, 57, 9])
    state = make_stream(sources, specs).state_dict()
    state.update(step=10**9, position=10**11)
    stream = make_stream(sources, specs)
    started = time.perf_counter()
    stream.load_state_dict(state)
    ids = consumed_sample_ids(stream.next_step())
    assert time.perf_counter() - started < 1.0
    assert stream.step == 10**9 + 1 and stream.position > 10**11 and ids


@pytest.mark.parametrize("packing", [True, False])
def test_padding_free_micro_batches_hold_the_same_samples_in_one_row(packing):
    sources, specs = fake_sources([23, 57, 9])
    padded = make_stream(sources, specs, world=2, mb=2, packing=packing)
    free = SFTStream(sources, specs, seq_len=SEQ, global_batch_size=GBS, micro_batch_size=2, rank=0, world_size=2,
                     seed=5, packing=packing, pad_id=0, total_steps=20, padding_free=True, pad_multiple=4)
    for _ in range(3):
        for want, got in zip(padded.next_step(), free.next_step()):
            assert got.attention_mask is None and got.input_ids.shape[0] == 1 and got.input_ids.shape[1] % 4 == 0
            assert got.sample_ids == [[s for row in want.sample_ids for s in row]]
            real = want.source_index >= 0
            n = int(real.sum())
            assert torch.equal(got.input_ids[0, :n], want.input_ids[real])
            assert torch.equal(got.labels[0, :n], want.labels[real])
            assert torch.equal(got.position_ids[0, :n], want.position_ids[real])
            assert (got.labels[0, n:] == -100).all() and (got.source_index[0, n:] == -1).all()
    assert free.state_dict()["position"] == padded.state_dict()["position"]
