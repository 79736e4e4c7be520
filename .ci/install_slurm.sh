#!/usr/bin/env bash
# Install what tests/launcher needs for a real one-node SLURM cluster: slurm-wlm (slurmctld,
# slurmd, sbatch, srun, scontrol) and munge (its authentication daemon).
# Idempotent: does nothing when the binaries are already there. Needs root (or sudo) and apt.
set -euo pipefail

required_binaries=(slurmctld slurmd sbatch srun scontrol munged munge)

all_present() {
    local binary
    for binary in "${required_binaries[@]}"; do
        # munged and slurm daemons live in /usr/sbin, which a non-root PATH may lack.
        command -v "$binary" >/dev/null 2>&1 || [[ -x "/usr/sbin/$binary" ]] || return 1
    done
}

if all_present; then
    echo "install_slurm: slurm-wlm and munge already installed"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_slurm: apt-get not found; install slurm-wlm and munge with this system's package manager" >&2
    exit 1
fi

as_root=()
if [[ "$(id -u)" -ne 0 ]]; then
    command -v sudo >/dev/null 2>&1 || { echo "install_slurm: needs root or sudo" >&2; exit 1; }
    as_root=(sudo)
fi

export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update -q
"${as_root[@]}" apt-get install -y -q --no-install-recommends slurm-wlm munge

all_present || { echo "install_slurm: packages installed but binaries missing" >&2; exit 1; }
echo "install_slurm: done"
