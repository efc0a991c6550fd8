#!/usr/bin/env bash
# The main job on the built-in default data (README command 1):
#   synthetic logs -> train on 2 ranks (torchrun, gloo on CPU / nccl on GPU) -> metrics on a held-out day.
#
#   bash scripts/demo.sh                         # everything, from a fresh clone
#   bash scripts/demo.sh --set train.lr=0.002    # extra args go to `hyrank train`
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
hyrank="${HYRANK_VENV:-$root/.venv}/bin/hyrank"
data="${HYRANK_DATA:-$root/data/synth}"
cd "$root"

# Regenerated every run (~10 s, deterministic): data left by an older generator would silently differ.
"$hyrank" gen-logs --out "$data" --days 4 --seed 0 --quiet
"$hyrank" train --config jobs/configs/default.toml --set "data.root=\"$data\"" \
  --days 2026-11-01..2026-11-03 --eval-day 2026-11-04 --nproc-per-node 2 "$@"
