#!/usr/bin/env bash
# Install Zhiling and everything it needs, torch first and pinned.
#   bash scripts/install.sh          # the package (training, demo)
#   bash scripts/install.sh test     # plus the test tools and the local SLURM cluster used by tests
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="${PIP:-python -m pip}"
# torch first, pinned: an unpinned torch (or a package asking for a newer one) pulls a CUDA build.
$PIP install --quiet "torch==2.13.0"
if [ "${1:-}" = "test" ]; then
  $PIP install --quiet -e ".[test]"
  if [ -x .ci/install_slurm.sh ] || [ -f .ci/install_slurm.sh ]; then
    bash .ci/install_slurm.sh
  fi
else
  $PIP install --quiet -e .
fi
