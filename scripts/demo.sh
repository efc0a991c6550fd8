#!/usr/bin/env bash
# The main job on the built-in default data (README command 1): the daily retraining flow, then serving.
#   synthetic logs of 4 days (100k rows each) -> `hyrank stream` on 2 ranks (torchrun, gloo on CPU / nccl on GPU): each day is first
#   scored by the model of the days before it (progressive AUC, printed beside the day's oracle AUC), then trained
#   on -> report/days.csv + days.png, status.json, checkpoints -> `hyrank export` of the streamed model (parity
#   gated) -> `hyrank serve` on 127.0.0.1 -> two rows of the last day scored over HTTP -> the server stopped.
#
#   bash scripts/demo.sh                         # everything, from a fresh clone
#   bash scripts/demo.sh --set train.lr=0.002    # extra args go to `hyrank stream`
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
bin="${HYRANK_VENV:-$root/.venv}/bin"
data="${HYRANK_DATA:-$root/data/synth}"
cd "$root"

# Regenerated every run (~10 s, deterministic): data left by an older generator would silently differ. The run
# folder starts fresh too: the stream warm-starts from a run's own checkpoints, which would make this a no-op.
"$bin/hyrank" gen-logs --out "$data" --days 4 --rows-per-day 100000 --seed 0 --quiet
rm -rf runs/default exports/default
"$bin/hyrank" stream --config jobs/configs/default.toml --set "data.root=\"$data\"" --nproc-per-node 2 "$@"

"$bin/hyrank" export --checkpoint "runs/default/checkpoints/$(cat runs/default/checkpoints/latest)" \
  --out exports/default
port="$("$bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
"$bin/hyrank" serve --artifact exports/default --port "$port" &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
"$bin/python" - "$port" "$data" <<'PY'
import json, sys, time, urllib.error, urllib.request
import pyarrow.parquet as pq
port, data = sys.argv[1], sys.argv[2]
base = f"http://127.0.0.1:{port}"
for _ in range(600):  # the server is ready once the model is loaded
    try:
        features = json.load(urllib.request.urlopen(f"{base}/readyz"))["features"]
        break
    except (urllib.error.URLError, ConnectionError, KeyError):
        time.sleep(0.1)
rows = pq.read_table(f"{data}/day=2026-11-04/part-00000.parquet", columns=features).slice(0, 2).to_pylist()
request = urllib.request.Request(f"{base}/score", data=json.dumps({"rows": rows}).encode(),
                                 headers={"content-type": "application/json"})
print("POST /score (2 rows of 2026-11-04):", json.load(urllib.request.urlopen(request)))
PY
kill -TERM "$server"
wait "$server"
echo "server stopped (SIGTERM: in-flight requests drained, exit 0)"
