"""A real 2-rank ZeRO-3 run with evaluation, read back the way users read it: TensorBoard's own
event reader, and a real `tensorboard --logdir` server queried over HTTP."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.integration.tiny_run import explain, free_port, launch_deepspeed, read_metrics, tiny_config, write_config

pytestmark = [pytest.mark.distributed]

MAX_STEPS = 6
EVAL_EVERY = 3
SOURCES = [
    {"name": "zh_demo", "path": "builtin:zh_demo?n=400", "format": "alpaca", "eval_count": 24, "proportion": 0.7},
    {"name": "zh_more", "path": "builtin:zh_demo?n=200&seed=5", "format": "alpaca", "proportion": 0.3},
]
EVAL_SOURCES = [{"name": "zh_eval", "path": "builtin:zh_demo?n=20&seed=9", "format": "alpaca"}]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tb")
    run_dir = tmp / "run"
    cfg = tiny_config(run_dir, zero="zero3", max_steps=MAX_STEPS,
                      data={"sources": SOURCES, "eval_sources": EVAL_SOURCES},
                      eval={"every_steps": EVAL_EVERY}, log={"sample_every": 3})
    proc = launch_deepspeed(write_config(tmp / "run.yaml", cfg), log=tmp / "run.log")
    assert proc.returncode == 0, explain(proc)
    return run_dir, proc


def _accumulator(tb_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_event_files_answer_the_questions(finished_run):
    run_dir, _ = finished_run
    acc = _accumulator(run_dir / "tb")
    scalars = set(acc.Tags()["scalars"])
    wanted = {"train/loss", "train/lr", "perf/tokens_per_s", "eval/zh_demo/loss", "eval/zh_eval/loss", "eval/loss",
              "mixture/zh_demo/cum_tokens", "mixture/zh_more/share", "mixture/zh_more/target_share"}
    assert wanted <= scalars, f"missing: {wanted - scalars}"
    assert [e.step for e in acc.Scalars("eval/zh_demo/loss")] == [3, 6]  # every 3 steps, the end once
    cum = [e.value for e in acc.Scalars("mixture/zh_demo/cum_samples")]
    assert cum == sorted(cum) and cum[-1] > cum[0] > 0
    share = acc.Scalars("mixture/zh_more/share")[-1].value
    assert share == pytest.approx(0.3, abs=0.12)
    plugins = acc.PluginTagToContent("hparams")
    assert "_hparams_/experiment" in plugins and "_hparams_/session_start_info" in plugins
    assert "samples/text_summary" in acc.Tags()["tensors"]
    assert "config/text_summary" in acc.Tags()["tensors"]


def test_eval_loss_is_token_weighted_over_sets(finished_run):
    run_dir, proc = finished_run
    evals = [m for m in read_metrics(run_dir) if "eval/loss" in m]
    assert [m["step"] for m in evals] == [3, 6]
    last = evals[-1]
    assert last["eval/zh_demo/tokens"] > 0 and last["eval/zh_eval/tokens"] > 0
    weighted = (last["eval/zh_demo/loss"] * last["eval/zh_demo/tokens"]
                + last["eval/zh_eval/loss"] * last["eval/zh_eval/tokens"]) / (
        last["eval/zh_demo/tokens"] + last["eval/zh_eval/tokens"])
    assert last["eval/loss"] == pytest.approx(weighted, rel=1e-9)
    assert last["eval/zh_demo/loss"] < evals[0]["eval/zh_demo/loss"]  # the model learns
    assert f"eval loss at step {MAX_STEPS}: zh_demo " in proc.stderr  # the console reports evaluations


def test_one_console_voice(finished_run):
    _, proc = finished_run
    # A library warning shows once (rank 0), not once per rank; DeepSpeed's INFO stays off.
    warnings = [line for line in proc.stderr.splitlines() if "FutureWarning" in line]
    assert len(warnings) == len(set(warnings)), warnings
    # (DeepSpeed logs to stdout; the launcher process's own INFO lines come from launch/runner.py.)
    rank_info = [line for line in proc.stdout.splitlines()
                 if "[INFO]" in line and not any(f"[{f}:" in line for f in ("launch.py", "runner.py"))]
    assert rank_info == []
    # the float32 CPU run trains with the fused layer kernels, and says so once
    fused = [line for line in proc.stderr.splitlines() if line.startswith("fused layers: ")]
    assert len(fused) == 1 and "RMSNorm" in fused[0] and "(CPU kernels)" in fused[0], fused


def test_tensorboard_server_serves_the_scalars(finished_run):
    run_dir, _ = finished_run
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(run_dir), "--host", "127.0.0.1", "--port", str(port),
         "--load_fast", "false"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        tags, deadline = {}, time.monotonic() + 60
        while time.monotonic() < deadline and not tags:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/plugin/scalars/tags", timeout=5) as r:
                    tags = json.loads(r.read())
            except OSError:
                assert server.poll() is None, server.stderr.read()
            if not tags:
                time.sleep(1)
        assert tags, "tensorboard served no scalar tags within 60 s"
        served = {tag for run in tags.values() for tag in run}
        assert {"train/loss", "eval/loss", "mixture/zh_demo/share"} <= served
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)


def test_model_size_is_in_tensorboard_not_in_the_step_lines(finished_run):
    run_dir, _ = finished_run
    acc = _accumulator(run_dir / "tb")
    (total,) = acc.Scalars("model/parameters")
    (trainable,) = acc.Scalars("model/trainable_parameters")
    assert trainable.value == total.value > 0  # full-parameter training
    assert "model/text_summary" in acc.Tags()["tensors"]
    assert all(line["step"] >= 1 for line in read_metrics(run_dir))
