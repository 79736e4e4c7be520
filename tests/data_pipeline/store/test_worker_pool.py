"""prepare's worker processes: a killed worker fails the run promptly (naming the chunk) instead of
hanging it, and a script without a `__main__` guard does not hang either. Real subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


from data_pipeline.prepare import main as prepare_cli

REPO_ROOT = Path(__file__).resolve().parents[3]


def write_records(path: Path, n: int) -> Path:
    path.write_text("\n".join(json.dumps({"instruction": f"问题{i}：你好", "output": f"回答{i} 😀"}, ensure_ascii=False)
                              for i in range(n)) + "\n", encoding="utf-8")
    return path


def _pool_workers(pid: int) -> list[int]:
    """Pids of the worker processes of `pid` (from /proc): children that run the parent's own command
    line (forked) or multiprocessing's spawn entry point, not its resource tracker or a short-lived
    helper some import starts."""
    try:
        own = (Path("/proc") / str(pid) / "cmdline").read_bytes()
    except OSError:
        return []
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        if ppid == pid and (cmdline == own or b"spawn_main" in cmdline):
            found.append(int(entry.name))
    return found


def test_a_killed_worker_fails_prepare_promptly_and_the_next_run_finishes(tokenizer_dir, tmp_path, capsys):
    """The out-of-memory killer's SIGKILL on one worker used to leave prepare waiting forever."""
    src = write_records(tmp_path / "big.jsonl", 6000)
    tok = tokenizer_dir
    args = ["--source", f"big={src}", "--tokenizer", str(tok), "--out", str(tmp_path / "out"), "--num-proc", "2",
            "--template", "chatml", "--quiet"]
    proc = subprocess.Popen([sys.executable, "-m", "data_pipeline.prepare", *args], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while len(workers := _pool_workers(proc.pid)) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(workers) == 2, "the worker processes did not appear"
        os.kill(workers[0], signal.SIGKILL)
        killed_at = time.monotonic()
        _, err = proc.communicate(timeout=30)
        elapsed = time.monotonic() - killed_at
    finally:
        proc.kill()
    assert proc.returncode == 2, err
    assert elapsed < 10
    assert "worker process died" in err and "SIGKILL" in err and "source 'big' chunk" in err and "big.jsonl:" in err
    assert "Traceback" not in err
    assert not list((tmp_path / "out").glob(".tmp-*"))
    assert prepare_cli(args[:-4] + ["1", "--template", "chatml", "--quiet"]) == 0  # the next run finishes
    assert "6000 kept" in capsys.readouterr().out


def _run_script_without_main_guard(tmp_path, tokenizer_dir, records: int, num_proc: str = ""):
    """A script with no `if __name__ == "__main__":` guard that prepares `records` records with 2
    processes while it runs a thread (so workers are spawned); returns (run, times it ran)."""
    src = write_records(tmp_path / "a.jsonl", records)
    runs = tmp_path / "runs.txt"
    script = tmp_path / "no_guard.py"
    script.write_text(f"""
import threading, time
open({str(runs)!r}, "a").write("ran\\n")  # once per execution of this script
from transformers import AutoTokenizer
from data_pipeline.prepare import prepare_sources
from data_pipeline.spec import DataConfig, SourceSpec

threading.Thread(target=time.sleep, args=(60,), daemon=True).start()  # threads: workers are spawned
tokenizer = AutoTokenizer.from_pretrained({str(tokenizer_dir)!r})
cfg = DataConfig(sources=[SourceSpec(name="a", path={str(src)!r})], template="chatml", num_proc=2)
(source,) = prepare_sources(cfg, tokenizer, {str(tmp_path / "out")!r}, show_progress=False{num_proc})
print("prepared", len(source))
""")
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=env)
    return done, runs.read_text().count("ran\n") if runs.exists() else 0


def test_prepare_from_a_script_without_main_guard_does_not_hang(tokenizer_dir, tmp_path):
    """Spawned workers re-import the main script; one without `if __name__ == "__main__":` used to
    re-run prepare in every worker and hang the pool."""
    done, _ = _run_script_without_main_guard(tmp_path, tokenizer_dir, 3000)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "prepared 3000"


def test_spawned_workers_never_run_the_callers_main_script(tokenizer_dir, tmp_path):
    """ProcessPoolExecutor starts spawned workers one per submit; every one of them, not only the
    first, must start while __main__ is hidden, or it re-runs the caller's script (a training script:
    seconds of imports; one without a main guard: a RuntimeError in the worker). Many chunks, so
    that later submits would start workers."""
    done, runs = _run_script_without_main_guard(tmp_path, tokenizer_dir, 6000, num_proc=", num_proc=2")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "prepared 6000"
    assert runs == 1, "a worker ran the caller's main script"
