#!/usr/bin/env bash
# Install (with test tools), then run the test suite. Exits non-zero if no test ran.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
set +e
python3 -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
