"""TrainerState and RunSummary: the records a run leaves, round-tripped and keyed as stored."""

from __future__ import annotations

import json

from engine.finished import SUMMARY, SUMMARY_KEYS, write_summary
from engine.state import RunSummary, TrainerState


def test_trainer_state_round_trips_through_its_json_record():
    state = TrainerState(step=7, data={"step": 7, "position": 60}, world_size=2, consumption={"names": ["a"]},
                         time=123.0)
    record = json.loads(json.dumps(state.to_json()))
    assert list(record) == ["step", "data", "world_size", "time", "consumption"]
    assert TrainerState.from_json({**record, "metric": 1.5}) == TrainerState(7, {"step": 7, "position": 60}, 2,
                                                                            {"names": ["a"]}, 123.0, 1.5)


def test_a_checkpoint_without_consumption_counters_still_reads():
    state = TrainerState.from_json({"step": 3, "data": {}, "world_size": 1, "time": 0.0, "metric": None})
    assert state.consumption == {} and state.step == 3


def test_run_summary_record_has_the_summary_keys_and_never_nan(tmp_path):
    summary = RunSummary(step=4, final_loss=float("nan"), export_dir=None, before=["x"])
    assert summary.record() == {"step": 4, "final_loss": None, "export_dir": None}
    assert tuple(summary.record()) == SUMMARY_KEYS
    write_summary(tmp_path, summary.record())
    stored = json.loads((tmp_path / SUMMARY).read_text())
    assert RunSummary.from_record(stored) == RunSummary(step=4, final_loss=None, export_dir=None)
