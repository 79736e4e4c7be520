"""Write (and optionally submit) the sbatch script for a training run on a SLURM cluster.

    python launcher/slurm.py --config configs/sft/X.yaml --nodes 4 --gpus-per-node 8 --submit \\
        [--partition P --time 1-00:00:00 --account A --qos Q --exclusive --env K=V \\
         --container IMAGE --run-dir DIR] [-- key.sub=value ...]

The script goes to `<run_dir>/slurm/<job>.sbatch` and is printed; `--submit` hands it to sbatch and
prints the job id, the log path and the tensorboard command.

Process layout: `srun` starts one task per GPU, each running `python launcher/run.py`, and
`launcher/dist_env.py` reads SLURM_PROCID/SLURM_LOCALID/SLURM_STEP_NUM_TASKS. This is the default
over "one deepspeed launcher per node" because then SLURM itself owns every training process:
  * signals reach every rank: srun forwards SIGUSR1 to all tasks on all nodes, whereas the
    deepspeed launcher is one more parent that would have to relay it to its children;
  * a rank that dies takes the step down at once (--kill-on-bad-exit) instead of leaving its
    peers blocked in a collective until the timeout;
  * no ssh/pdsh, no hostfile, no per-node --node_rank bookkeeping; the cluster's cgroups, CPU and
    GPU binding and accounting apply per task; containers (pyxis) wrap each task the same way.

Time limits and preemption: the job asks SLURM for SIGUSR1 to the batch shell `--signal-seconds`
before the limit. The batch shell traps it and forwards it to the tasks through srun; the trainer
saves a checkpoint, writes `<run_dir>/PREEMPTED` and exits 0; the batch shell then runs
`scontrol requeue`, and the requeued job (same job id, SLURM_RESTART_COUNT + 1) resumes from the
latest checkpoint in the run dir. `--open-mode=append` keeps the logs of every restart in one file.
A run that ends without the marker (finished or crashed) is never requeued.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import yaml

if __package__ in (None, ""):
    # Run as `python launcher/slurm.py`: make the repository root importable like `-m` would.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launcher.dist_env import SLURM_PORT_BASE, SLURM_PORT_SPAN  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ENTRY = REPO_ROOT / "launcher" / "run.py"
PREEMPT_MARKER = "PREEMPTED"
LOG_SUBDIR = "slurm"

_TIME_FORMATS = (
    # SLURM's --time spellings, each mapped to the fields it names.
    (re.compile(r"^(?P<m>\d+)$")),
    (re.compile(r"^(?P<m>\d+):(?P<s>\d+)$")),
    (re.compile(r"^(?P<h>\d+):(?P<m>\d+):(?P<s>\d+)$")),
    (re.compile(r"^(?P<d>\d+)-(?P<h>\d+)$")),
    (re.compile(r"^(?P<d>\d+)-(?P<h>\d+):(?P<m>\d+)$")),
    (re.compile(r"^(?P<d>\d+)-(?P<h>\d+):(?P<m>\d+):(?P<s>\d+)$")),
)


class SlurmConfigError(ValueError):
    """A command-line option or config key is unusable. The message names it."""


@dataclass
class SbatchRequest:
    """Everything the sbatch script depends on; built from the command line."""

    config: Path
    run_dir: Path
    nodes: int
    gpus_per_node: int
    tasks_per_node: int
    job_name: str
    workdir: Path
    """Directory the job runs in (relative paths in the config resolve against it)."""
    python: str
    entry: Path
    """The script each task runs: launcher/run.py unless a test substitutes its own."""
    cpus_per_task: Optional[int] = None
    partition: Optional[str] = None
    time: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    exclusive: bool = False
    env: dict[str, str] = field(default_factory=dict)
    container: Optional[str] = None
    signal_seconds: int = 300
    """How long before the time limit the run is asked to checkpoint and requeue."""
    max_requeues: int = 20
    """Stop requeueing after this many restarts, so a run that never progresses ends."""
    overrides: list[str] = field(default_factory=list)

    @property
    def log_pattern(self) -> Path:
        return self.run_dir / LOG_SUBDIR / "%x-%j.log"

    @property
    def script_path(self) -> Path:
        return self.run_dir / LOG_SUBDIR / f"{self.job_name}.sbatch"


# ---------------------------------------------------------------------------------------------
# Validation helpers


def time_limit_seconds(spec: str) -> int:
    """Seconds in a SLURM --time value (`90`, `1:30:00`, `2-00:00`, ...)."""
    for pattern in _TIME_FORMATS:
        match = pattern.match(spec)
        if match:
            parts = {key: int(value) for key, value in match.groupdict().items() if value}
            return (parts.get("d", 0) * 86400 + parts.get("h", 0) * 3600
                    + parts.get("m", 0) * 60 + parts.get("s", 0))
    raise SlurmConfigError(f"--time {spec!r}: not a SLURM time (minutes, MM:SS, HH:MM:SS, "
                           f"D-HH, D-HH:MM or D-HH:MM:SS)")


def read_run_dir(config: Path) -> Path:
    """The run directory named by the config's top-level `run_dir` key."""
    try:
        loaded = yaml.safe_load(config.read_text(encoding="utf-8"))
    except OSError as error:
        raise SlurmConfigError(f"--config {config}: cannot read ({error.strerror})") from None
    except yaml.YAMLError as error:
        raise SlurmConfigError(f"--config {config}: invalid YAML: {error}") from None
    if not isinstance(loaded, dict) or not loaded.get("run_dir"):
        raise SlurmConfigError(f"{config}: top-level key `run_dir` is missing; add it to the "
                               f"config or pass --run-dir")
    return Path(str(loaded["run_dir"]))


def parse_env_assignments(assignments: Sequence[str]) -> dict[str, str]:
    parsed = {}
    for assignment in assignments:
        name, sep, value = assignment.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise SlurmConfigError(f"--env {assignment!r}: expected NAME=VALUE with a shell "
                                   f"variable name")
        parsed[name] = value
    return parsed


def resolve_tasks_per_node(gpus_per_node: int, tasks_per_node: Optional[int]) -> int:
    """One task per GPU; CPU-only nodes (0 GPUs) take --tasks-per-node (default 1)."""
    if gpus_per_node < 0:
        raise SlurmConfigError(f"--gpus-per-node {gpus_per_node}: must be 0 or more")
    if gpus_per_node == 0:
        tasks = 1 if tasks_per_node is None else tasks_per_node
        if tasks < 1:
            raise SlurmConfigError(f"--tasks-per-node {tasks}: must be at least 1")
        return tasks
    if tasks_per_node not in (None, gpus_per_node):
        raise SlurmConfigError(f"--tasks-per-node {tasks_per_node} with --gpus-per-node "
                               f"{gpus_per_node}: the launcher runs exactly one task per GPU; "
                               f"drop --tasks-per-node")
    return gpus_per_node


def validate_request(request: SbatchRequest) -> None:
    if request.nodes < 1:
        raise SlurmConfigError(f"--nodes {request.nodes}: must be at least 1")
    if request.cpus_per_task is not None and request.cpus_per_task < 1:
        raise SlurmConfigError(f"--cpus-per-task {request.cpus_per_task}: must be at least 1")
    if request.signal_seconds < 1:
        raise SlurmConfigError(f"--signal-seconds {request.signal_seconds}: must be positive")
    if request.time is not None:
        limit = time_limit_seconds(request.time)
        if request.signal_seconds >= limit:
            raise SlurmConfigError(f"--signal-seconds {request.signal_seconds} is not shorter "
                                   f"than --time {request.time} ({limit} s); the checkpoint "
                                   f"warning would come before the run starts")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", request.job_name):
        raise SlurmConfigError(f"--job-name {request.job_name!r}: use letters, digits, '_.-'")


# ---------------------------------------------------------------------------------------------
# Rendering


def _sbatch_directives(request: SbatchRequest) -> list[str]:
    options: list[tuple[str, Optional[object]]] = [
        ("job-name", request.job_name),
        ("nodes", request.nodes),
        ("ntasks-per-node", request.tasks_per_node),
        ("gpus-per-node", request.gpus_per_node or None),
        ("cpus-per-task", request.cpus_per_task),
        ("partition", request.partition),
        ("time", request.time),
        ("account", request.account),
        ("qos", request.qos),
        ("chdir", request.workdir),
        ("output", request.log_pattern),
        # Append: a requeued job writes to the same file, so both runs' logs stay.
        ("open-mode", "append"),
        # B: only the batch shell gets the warning; it forwards it once, to every task.
        ("signal", f"B:USR1@{request.signal_seconds}"),
    ]
    lines = [f"#SBATCH --{name}={value}" for name, value in options if value is not None]
    lines.append("#SBATCH --requeue")
    if request.exclusive:
        lines.append("#SBATCH --exclusive")
    return lines


def _srun_command(request: SbatchRequest) -> str:
    srun = ["srun", "--kill-on-bad-exit=1", "--label"]
    if request.cpus_per_task is not None:
        # SLURM 22.05+ srun no longer inherits the job's --cpus-per-task; say it again.
        srun.append(f"--cpus-per-task={request.cpus_per_task}")
    if request.container:
        mounts = ",".join(sorted({f"{path}:{path}" for path in
                                  (request.workdir, request.run_dir, REPO_ROOT)}))
        srun += [f"--container-image={request.container}", f"--container-mounts={mounts}",
                 f"--container-workdir={request.workdir}"]
    train = [request.python, str(request.entry), "--config", str(request.config),
             f"run_dir={request.run_dir}", *request.overrides]
    return " ".join(shlex.quote(part) for part in srun + train)


def _omp_threads_line(request: SbatchRequest) -> str:
    if request.cpus_per_task is not None:
        return 'export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK}"'
    # No --cpus-per-task: share the node's CPUs evenly between its tasks.
    return ("export OMP_NUM_THREADS=$(( ${SLURM_CPUS_ON_NODE:-1} / "
            f"{request.tasks_per_node} > 0 ? ${{SLURM_CPUS_ON_NODE:-1}} / "
            f"{request.tasks_per_node} : 1 ))")


def render_sbatch(request: SbatchRequest) -> str:
    """The batch script: directives, rendezvous variables, the srun step and the requeue trap."""
    quoted = shlex.quote
    exports = "\n".join(f"export {name}={quoted(value)}" for name, value in request.env.items())
    marker = quoted(str(request.run_dir / PREEMPT_MARKER))
    return f"""#!/bin/bash
{chr(10).join(_sbatch_directives(request))}
set -uo pipefail

echo "[sbatch] job ${{SLURM_JOB_ID}} restart ${{SLURM_RESTART_COUNT:-0}}" \
     "on ${{SLURM_JOB_NODELIST}} at $(date -Is)"

# Rendezvous for torch.distributed: rank 0 runs on the first node of the allocation; the port
# comes from the job id, so a requeued job (same id) reuses it (launcher/dist_env.py agrees).
export MASTER_ADDR="$(scontrol show hostnames "${{SLURM_JOB_NODELIST}}" | head -n 1)"
export MASTER_PORT=$(( {SLURM_PORT_BASE} + SLURM_JOB_ID % {SLURM_PORT_SPAN} ))
{_omp_threads_line(request)}
{exports}

# The trainer writes the marker after its checkpoint on SIGUSR1; a stale one must not requeue.
rm -f {marker}

{_srun_command(request)} &
srun_pid=$!

on_time_limit() {{
    echo "[sbatch] SIGUSR1: asking every task to checkpoint and stop"
    kill -USR1 "${{srun_pid}}"
    wait "${{srun_pid}}"
    if [[ -f {marker} && ${{SLURM_RESTART_COUNT:-0}} -lt {request.max_requeues} ]]; then
        echo "[sbatch] checkpoint written; requeueing job ${{SLURM_JOB_ID}}"
        scontrol requeue "${{SLURM_JOB_ID}}"
    fi
    exit 0
}}
trap on_time_limit USR1

# bash runs a trap only between commands; waiting on a background srun lets it run at once.
wait "${{srun_pid}}"
exit $?
"""


# ---------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Write the sbatch script for a training run; --submit also submits it. "
                    "Arguments after `--` are passed to launcher/run.py as config overrides.")
    parser.add_argument("--config", type=Path, required=True, help="run config YAML")
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, required=True,
                        help="GPUs per node, one task each; 0 for CPU-only nodes")
    parser.add_argument("--tasks-per-node", type=int, help="tasks per node when 0 GPUs")
    parser.add_argument("--cpus-per-task", type=int, help="CPU cores per task (OMP threads)")
    parser.add_argument("--partition")
    parser.add_argument("--time", help="SLURM time limit, e.g. 1-00:00:00")
    parser.add_argument("--account")
    parser.add_argument("--qos")
    parser.add_argument("--exclusive", action="store_true")
    parser.add_argument("--env", action="append", default=[], metavar="K=V",
                        help="export K=V in the job (repeatable)")
    parser.add_argument("--container", help="container image for every task (pyxis/enroot)")
    parser.add_argument("--run-dir", type=Path, help="override the config's run_dir")
    parser.add_argument("--job-name", help="default: the config file's stem")
    parser.add_argument("--signal-seconds", type=int, default=300,
                        help="seconds before the time limit to checkpoint and requeue")
    parser.add_argument("--max-requeues", type=int, default=20)
    parser.add_argument("--python", help="interpreter on the compute nodes (default: this one, "
                                         "or `python` inside a container)")
    parser.add_argument("--entry", type=Path, default=DEFAULT_ENTRY,
                        help="script each task runs (default launcher/run.py)")
    parser.add_argument("--submit", action="store_true", help="submit with sbatch")
    return parser


def request_from_args(argv: Sequence[str], cwd: Path) -> tuple[SbatchRequest, bool]:
    """Parse the command line (overrides after `--`) into a validated request."""
    argv = list(argv)
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    args = build_parser().parse_args(own)
    config = (cwd / args.config).resolve()
    run_dir = args.run_dir if args.run_dir is not None else read_run_dir(config)
    request = SbatchRequest(
        config=config,
        run_dir=(cwd / run_dir).resolve(),
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        tasks_per_node=resolve_tasks_per_node(args.gpus_per_node, args.tasks_per_node),
        job_name=args.job_name or config.stem,
        workdir=cwd.resolve(),
        python=args.python or ("python" if args.container else sys.executable),
        entry=(cwd / args.entry).resolve(),
        cpus_per_task=args.cpus_per_task,
        partition=args.partition,
        time=args.time,
        account=args.account,
        qos=args.qos,
        exclusive=args.exclusive,
        env=parse_env_assignments(args.env),
        container=args.container,
        signal_seconds=args.signal_seconds,
        max_requeues=args.max_requeues,
        overrides=overrides,
    )
    validate_request(request)
    return request, args.submit


def write_sbatch(request: SbatchRequest) -> Path:
    """Write the script; SLURM does not create the log directory, so make it here."""
    request.script_path.parent.mkdir(parents=True, exist_ok=True)
    request.script_path.write_text(render_sbatch(request), encoding="utf-8")
    return request.script_path


def submit(script: Path, env: Optional[dict[str, str]] = None) -> str:
    """Submit with sbatch and return the job id."""
    result = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True,
                            text=True, env=env, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"sbatch {script} failed ({result.returncode}): "
                           f"{result.stderr.strip()}")
    # --parsable prints `jobid` or `jobid;cluster`.
    return result.stdout.strip().split(";")[0]


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        request, do_submit = request_from_args(sys.argv[1:] if argv is None else argv,
                                               Path.cwd())
    except SlurmConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    script = write_sbatch(request)
    print(script.read_text(encoding="utf-8"))
    print(f"# sbatch script: {script}")
    if not do_submit:
        print(f"# submit with: sbatch {script}")
        return 0
    job_id = submit(script)
    log = str(request.log_pattern).replace("%x", request.job_name).replace("%j", job_id)
    print(f"submitted job {job_id}")
    print(f"log:         {log}")
    print(f"follow:      tail -f {log}")
    print(f"tensorboard: tensorboard --logdir {request.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
