"""A real one-node SLURM cluster (munged + slurmctld + slurmd) owned by the test process.

Everything is private to one instance: its own munged socket, its own free TCP ports, state and
logs in a temporary directory, so two test runs on one machine do not meet. Daemons run in the
foreground as children and are stopped by PID. Needs root (slurmd launches jobs as their user)
and the Debian packages slurm-wlm and munge (.ci/install_slurm.sh).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "squeue", "sinfo", "scancel", "munge", "unmunge",
           "setpriv")


def find_binary(name: str) -> Optional[str]:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")


def unavailable_reason() -> Optional[str]:
    """Why a local cluster cannot start here, or None when it can."""
    missing = [name for name in DAEMONS + CLIENTS if find_binary(name) is None]
    if missing:
        return (f"SLURM/munge not installed (missing {', '.join(missing)}); "
                f"run .ci/install_slurm.sh as root")
    if os.geteuid() != 0:
        return "a local SLURM cluster needs root (slurmd starts jobs as their user)"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "user `munge` does not exist; reinstall the munge package"
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("", 0))
        return int(probe.getsockname()[1])


def _wait_until(check, timeout: float, what: str, log: Optional[Path] = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-2000:] if log is not None and log.exists() else ""
    raise TimeoutError(f"{what} not ready after {timeout:.0f} s\n{tail}")


SLURM_CONF = """\
ClusterName=zhilingtest
SlurmctldHost={host}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# A private munged; cred_expire=5 because the default 120 delays a requeued job by minutes.
AuthInfo=socket={munge_socket},cred_expire=5
MailProg=/bin/true
SchedulerParameters=bf_interval=1,sched_interval=1
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
JobRequeue=1
NodeName={host} CPUs={cpus} RealMemory=2000 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
"""


@dataclass
class LocalSlurm:
    """Handle on a running cluster: the environment clients need, and job helpers."""

    root: Path
    conf: Path
    env: dict[str, str]
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(list(command), env=self.env, capture_output=True, text=True,
                              check=check, timeout=60)

    def job_fields(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (no accounting daemon, so no sacct)."""
        shown = self.run("scontrol", "--oneliner", "show", "job", job_id, check=False).stdout
        return dict(item.split("=", 1) for item in shown.split() if "=" in item)

    def wait_for_job(self, job_id: str, states: set[str], timeout: float) -> dict[str, str]:
        """Poll until the job is in one of `states`; on timeout report its last fields."""
        found: dict[str, str] = {}

        def reached() -> bool:
            found.clear()
            found.update(self.job_fields(job_id))
            return found.get("JobState") in states

        try:
            _wait_until(reached, timeout, f"job {job_id} in {sorted(states)}")
        except TimeoutError as error:
            raise TimeoutError(f"{error}; last seen: {found}\n{self.log_tail()}") from None
        return found

    def log_tail(self) -> str:
        return "\n".join(path.read_text(errors="replace")[-1500:]
                         for path in sorted((self.root / "log").glob("*.log")))


def _start_munged(root: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    munge_dir = root / "munge"
    munge_dir.mkdir()
    munge_dir.chmod(0o755)  # munged insists that clients of every user can reach its socket
    user = pwd.getpwnam("munge")
    os.chown(munge_dir, user.pw_uid, user.pw_gid)
    munge_socket = str(munge_dir / "munge.socket")
    process = subprocess.Popen(
        ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups",
         find_binary("munged"), "--foreground", f"--socket={munge_socket}",
         f"--pid-file={munge_dir}/munged.pid", f"--seed-file={munge_dir}/munged.seed",
         f"--log-file={munge_dir}/munged.log"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def answers() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"munged exited: {process.stderr.read().decode(errors='replace')}")
        credential = subprocess.run([find_binary("munge"), "-n", f"--socket={munge_socket}"],
                                    capture_output=True, check=False)
        return credential.returncode == 0
    _wait_until(answers, 15, "munged")
    return process, munge_socket


def start_cluster() -> LocalSlurm:
    """Start munged, slurmctld and slurmd; return once the node is idle. Cleans up on failure."""
    root = Path(tempfile.mkdtemp(prefix="zhiling-slurm-"))
    root.chmod(0o755)  # the munge user must reach its socket directory inside
    for sub in ("state", "spool", "run", "log"):
        (root / sub).mkdir()
    env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}
    cluster = LocalSlurm(root=root, conf=root / "slurm.conf", env=env)
    try:
        cluster.processes["munged"], munge_socket = _start_munged(root, env)
        host = socket.gethostname().split(".")[0]
        cluster.conf.write_text(SLURM_CONF.format(
            host=host, root=root, munge_socket=munge_socket, cpus=os.cpu_count() or 1,
            ctld_port=_free_port(), slurmd_port=_free_port()))
        for daemon in ("slurmctld", "slurmd"):
            cluster.processes[daemon] = subprocess.Popen(
                [find_binary(daemon), "-D", "-f", str(cluster.conf)], env=env,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def node_idle() -> bool:
            for name, process in cluster.processes.items():
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited ({process.returncode}):\n"
                                       f"{cluster.log_tail()}")
            state = cluster.run("sinfo", "-h", "-o", "%t", check=False).stdout.strip()
            return state == "idle"
        _wait_until(node_idle, 30, "SLURM node", root / "log" / "slurmctld.log")
    except BaseException:
        stop_cluster(cluster)
        raise
    return cluster


def _stop_process(process: subprocess.Popen, grace: float) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=grace)


def stop_cluster(cluster: LocalSlurm) -> None:
    """Cancel jobs, stop the daemons by PID (slurmd first, munged last), remove the state."""
    if "slurmctld" in cluster.processes:
        # Jobs first: their slurmstepd and tasks are not children of slurmd once started, so a
        # job still running when slurmd stops would outlive the cluster.
        cluster.run("scancel", "--full", "--user", "root", check=False)
        try:
            _wait_until(lambda: not cluster.run("squeue", "-h", check=False).stdout.strip(),
                        30, "cancelled jobs to end")
        except TimeoutError:
            pass  # stop the daemons anyway; the error that led here is the one to report
    for name in ("slurmd", "slurmctld", "munged"):
        if name in cluster.processes:
            _stop_process(cluster.processes[name], grace=10)
    shutil.rmtree(cluster.root, ignore_errors=True)
