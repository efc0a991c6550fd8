#!/usr/bin/env bash
# Idempotently create ./.venv with hyrank's pinned stack. Sourced by scripts/demo.sh and scripts/test.sh.
#
#   bash scripts/bootstrap.sh          # creates or refreshes .venv, prints its python
#
# Why not a plain `pip install -e .`: torchrec 1.8.0 declares a dependency on the CUDA `fbgemm-gpu`
# wheel (~490 MB). On a CPU machine we install `fbgemm-gpu-cpu` instead and torchrec with --no-deps.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${HYRANK_VENV:-$root/.venv}"
stamp="$venv/.hyrank-stamp"
want="$(cat "$root/requirements/base.txt" "$root/pyproject.toml" "$root/scripts/bootstrap.sh" | sha256sum | cut -c1-16)"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0  # already bootstrapped with these exact pins
fi

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  fbgemm="fbgemm-gpu==1.8.0"
else
  fbgemm="fbgemm-gpu-cpu==1.8.0"
fi

echo "[bootstrap] creating $venv ($fbgemm)" >&2
python3 -m venv "$venv"
py="$venv/bin/python"
pip_q() {  # pip, minus this machine's noise about index mirrors that do not carry a package
  "$py" -m pip install --quiet --disable-pip-version-check "$@" 2> >(grep -v "is ignored: it is neither" >&2)
}
pip_q -r "$root/requirements/base.txt" "$fbgemm"
pip_q --no-deps torchrec==1.8.0
pip_q --no-deps --no-build-isolation -e "$root"
"$py" -c "import hyrank.embeddings.versions as v; v.check_versions()"
echo "$want" > "$stamp"
echo "[bootstrap] ready: $venv" >&2
