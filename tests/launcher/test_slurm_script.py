"""The sbatch script launcher/slurm.py writes: key lines, option validation, the CLI."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.dist_env import slurm_port_for_job
from launcher.slurm import (
    SlurmConfigError,
    main,
    render_sbatch,
    request_from_args,
    time_limit_seconds,
)
from tests.launcher.workers import REPO_ROOT


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "big_run.yaml"
    path.write_text("run_dir: runs/big\nmodel:\n  name: x\n")
    return path


def render(config: Path, *options: str) -> str:
    request, _ = request_from_args(["--config", str(config), *options], config.parent)
    return render_sbatch(request)


def directives(script: str) -> dict[str, str]:
    found = {}
    for name, value in re.findall(r"^#SBATCH --([\w-]+)(?:=(.*))?$", script, re.MULTILINE):
        found[name] = value
    return found


def test_gpu_job_runs_one_task_per_gpu_with_run_dir_from_config(config: Path) -> None:
    script = render(config, "--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu",
                    "--time", "1-00:00:00", "--account", "lab", "--qos", "high", "--exclusive")
    sbatch = directives(script)
    assert sbatch["nodes"] == "4" and sbatch["ntasks-per-node"] == "8"
    assert sbatch["gpus-per-node"] == "8"
    assert (sbatch["partition"], sbatch["time"], sbatch["account"], sbatch["qos"]) == \
        ("gpu", "1-00:00:00", "lab", "high")
    assert "exclusive" in sbatch and "requeue" in sbatch
    assert sbatch["open-mode"] == "append"
    run_dir = config.parent / "runs" / "big"
    assert sbatch["output"] == f"{run_dir}/slurm/%x-%j.log"
    assert sbatch["job-name"] == "big_run"
    srun_line = next(line for line in script.splitlines() if line.startswith("srun "))
    assert f"{REPO_ROOT}/launcher/run.py --config {config}" in srun_line
    assert f"run_dir={run_dir}" in srun_line and srun_line.endswith(" &")
    assert "--kill-on-bad-exit=1" in srun_line


def test_cpu_only_job_uses_tasks_per_node_and_no_gpu_request(config: Path) -> None:
    sbatch = directives(render(config, "--nodes", "2", "--gpus-per-node", "0",
                               "--tasks-per-node", "3"))
    assert sbatch["ntasks-per-node"] == "3"
    assert "gpus-per-node" not in sbatch


def test_rendezvous_and_threads_exported(config: Path) -> None:
    script = render(config, "--nodes", "1", "--gpus-per-node", "2", "--cpus-per-task", "6")
    assert 'export MASTER_ADDR="$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)"' \
        in script
    assert 'export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK}"' in script
    assert directives(script)["cpus-per-task"] == "6"
    assert "srun --kill-on-bad-exit=1 --label --cpus-per-task=6 " in script
    # The shell formula and dist_env's must give the same port, or ranks would disagree.
    port_expression = re.search(r"export MASTER_PORT=\$\(\( (.*) \)\)", script)[1]
    for job_id in (1, 4242, 123456):
        shell = subprocess.run(["bash", "-c", f"SLURM_JOB_ID={job_id}; "
                                              f"echo $(( {port_expression} ))"],
                               capture_output=True, text=True, check=True)
        assert int(shell.stdout) == slurm_port_for_job(job_id)


def test_threads_split_node_cpus_without_cpus_per_task(config: Path) -> None:
    script = render(config, "--nodes", "1", "--gpus-per-node", "0", "--tasks-per-node", "4")
    omp_line = next(line for line in script.splitlines() if "OMP_NUM_THREADS" in line)
    for cpus, threads in ((16, 4), (2, 1)):
        shell = subprocess.run(["bash", "-c", f"SLURM_CPUS_ON_NODE={cpus}; {omp_line}; "
                                              f"echo $OMP_NUM_THREADS"],
                               capture_output=True, text=True, check=True)
        assert int(shell.stdout) == threads


def test_time_limit_signal_trap_forwards_and_requeues(config: Path) -> None:
    script = render(config, "--nodes", "1", "--gpus-per-node", "1", "--time", "4:00:00",
                    "--signal-seconds", "600", "--max-requeues", "3")
    assert directives(script)["signal"] == "B:USR1@600"
    trap_body = script[script.index("on_time_limit() {"):script.index("trap on_time_limit USR1")]
    marker = config.parent / "runs" / "big" / "PREEMPTED"
    assert 'kill -USR1 "${srun_pid}"' in trap_body
    assert f"-f {marker}" in trap_body and "SLURM_RESTART_COUNT:-0} -lt 3" in trap_body
    assert 'scontrol requeue "${SLURM_JOB_ID}"' in trap_body
    # A marker left by the previous run must be removed before the new run starts.
    assert script.index(f"rm -f {marker}") < script.index("srun ")
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)  # valid shell


def test_env_container_and_overrides_are_shell_quoted(config: Path) -> None:
    script = render(config, "--nodes", "1", "--gpus-per-node", "8", "--env", "NCCL_DEBUG=INFO",
                    "--env", "NOTE=two words", "--container", "nvcr.io/nvidia/pytorch:24.05",
                    "--", "optim.lr=1e-5", "data.name=it's")
    assert "export NCCL_DEBUG=INFO" in script and "export NOTE='two words'" in script
    srun_line = next(line for line in script.splitlines() if line.startswith("srun "))
    assert "--container-image=nvcr.io/nvidia/pytorch:24.05" in srun_line
    assert " python " in srun_line  # the container's interpreter, not this machine's
    assert srun_line.endswith("optim.lr=1e-5 'data.name=it'\"'\"'s' &")
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_run_dir_option_overrides_config(config: Path, tmp_path: Path) -> None:
    script = render(config, "--nodes", "1", "--gpus-per-node", "1", "--run-dir", "elsewhere")
    assert f"run_dir={tmp_path / 'elsewhere'}" in script
    assert directives(script)["output"].startswith(str(tmp_path / "elsewhere"))


@pytest.mark.parametrize("options, message", [
    (["--nodes", "0", "--gpus-per-node", "8"], "--nodes 0"),
    (["--nodes", "1", "--gpus-per-node", "8", "--tasks-per-node", "4"], "one task per GPU"),
    (["--nodes", "1", "--gpus-per-node", "0", "--tasks-per-node", "0"], "--tasks-per-node 0"),
    (["--nodes", "1", "--gpus-per-node", "1", "--time", "5", "--signal-seconds", "300"],
     "--signal-seconds 300 is not shorter than --time 5"),
    (["--nodes", "1", "--gpus-per-node", "1", "--time", "soon"], "--time 'soon'"),
    (["--nodes", "1", "--gpus-per-node", "1", "--env", "1BAD=x"], "--env '1BAD=x'"),
])
def test_bad_options_name_the_option(config: Path, options: list[str], message: str) -> None:
    with pytest.raises(SlurmConfigError, match=re.escape(message)):
        request_from_args(["--config", str(config), *options], config.parent)


def test_config_without_run_dir_names_the_key(tmp_path: Path) -> None:
    config = tmp_path / "no_dir.yaml"
    config.write_text("model: {}\n")
    with pytest.raises(SlurmConfigError, match="no_dir.yaml: top-level key `run_dir`"):
        request_from_args(["--config", str(config), "--nodes", "1", "--gpus-per-node", "1"],
                          tmp_path)


@pytest.mark.parametrize("spec, seconds", [("90", 5400), ("10:30", 630), ("1:00:05", 3605),
                                           ("2-3", 183600), ("1-00:01", 86460),
                                           ("1-00:00:01", 86401)])
def test_time_limit_seconds(spec: str, seconds: int) -> None:
    assert time_limit_seconds(spec) == seconds


def test_cli_writes_and_prints_script(config: Path, capsys: pytest.CaptureFixture,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(config.parent)  # the config's relative run_dir resolves against the cwd
    assert main(["--config", config.name, "--nodes", "1", "--gpus-per-node", "0"]) == 0
    written = config.parent / "runs" / "big" / "slurm" / "big_run.sbatch"
    printed = capsys.readouterr().out
    assert written.read_text() in printed and f"sbatch {written}" in printed


def test_cli_as_script_reports_bad_option(config: Path) -> None:
    result = subprocess.run([sys.executable, str(REPO_ROOT / "launcher" / "slurm.py"),
                             "--config", str(config), "--nodes", "1", "--gpus-per-node", "-1"],
                            capture_output=True, text=True, cwd=config.parent)
    assert result.returncode == 2 and "--gpus-per-node -1" in result.stderr
