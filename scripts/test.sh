#!/usr/bin/env bash
# The test suite (README command 2): bootstraps .venv if needed, then pytest. Extra args go to pytest.
#   bash scripts/test.sh            # the default suite
#   bash scripts/test.sh -m heavy   # only the heavy cases
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
cd "$root"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "${HYRANK_VENV:-$root/.venv}/bin/python" -m pytest "$@"
