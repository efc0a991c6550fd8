"""Export and serving on object storage (a real S3-protocol server started by the tests: tests/s3.py): `hyrank
stream` runs the demo's 4 days with the logs, the checkpoints and --export-to on S3, `hyrank serve --artifact
s3://...` scores requests and hot-reloads the next published version (a delta: its base downloaded and verified
too, scoring bit for bit as the full export of its checkpoint), and an upload cut short is never published."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from hyrank.bench.serve_load import ServerProcess, http_json, request_rows
from hyrank.pipeline.data.days import DayRange
from hyrank.pipeline.data.synth import generate_logs
from hyrank.pipeline.serving import publish as publish_module
from hyrank.pipeline.serving.artifact import Artifact, resolve
from hyrank.pipeline.serving.export import export_checkpoint
from hyrank.pipeline.serving.predict import predict
from hyrank.pipeline.storage import local_copy, location

from conftest import DEFAULT_CONFIG, TINY, small_synth

pytestmark = pytest.mark.dist


def _stream(root: str, out_dir, checkpoints: str, export_to: str, *extra: str) -> subprocess.CompletedProcess:
    sets = [a for item in [*TINY, "train.allreduce_sync_steps=0"] for a in ("--set", item)]
    argv = [sys.executable, "-m", "hyrank.pipeline.cli", "stream", "--config", str(DEFAULT_CONFIG), "--quiet",
            "--nproc-per-node", "2", "--set", f'data.root="{root}"', "--set", f'out_dir="{out_dir}"',
            "--set", f'checkpoint.dir="{checkpoints}"', "--export-to", export_to, "--quality-margin", "1",
            *sets, *extra]
    done = subprocess.run(argv, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _wait_for_version(port: int, version: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status, body = http_json(port, "GET", "/readyz")
        if status == 200 and body["version"] == version:
            return
        time.sleep(0.2)
    raise AssertionError(f"the server did not swap in {version}: {body}")


def test_s3_stream_exports_and_serve_hot_reloads_from_s3_and_a_partial_upload_is_never_published(s3, tmp_path):
    data = tmp_path / "data"
    generate_logs(small_synth(num_days=4, rows_per_day=1500), data)
    for day in ("2026-11-01", "2026-11-02", "2026-11-03"):
        s3.upload(data / f"day={day}", f"logs/day={day}")
    root, exports, checkpoints = f"{s3.url}/logs", f"{s3.url}/exports", f"{s3.url}/run/checkpoints"
    _stream(root, tmp_path / "run", checkpoints, exports)
    first = resolve(exports)
    assert first.name.endswith("step-000000036") and s3.keys("exports/history.jsonl")

    rows = request_rows(data, Artifact.load(exports).features, 16)
    with ServerProcess(exports, tmp_path / "server.log", "--reload-poll-s", "0.3") as server:
        server.wait_ready()
        status, body = http_json(server.port, "POST", "/score", json.dumps({"rows": rows}).encode())
        assert status == 200 and body["version"] == first.name, body
        np.testing.assert_allclose(body["probabilities"], Artifact.load(exports).score_rows(rows), rtol=1e-5)

        s3.upload(data / "day=2026-11-04", "logs/day=2026-11-04")  # the fourth day lands; the stream goes on
        _stream(root, tmp_path / "run", checkpoints, exports, "--export-delta", "1")  # published as a delta
        second = resolve(exports)
        assert second != first and second.name.endswith("step-000000048")
        delta = Artifact.load(exports)
        assert delta.manifest["delta"]["base"] == first.name and set(delta.manifest["files"]) == {"delta.pt"}
        _wait_for_version(server.port, second.name)  # hot reload: the server follows `latest` on S3
        status, body = http_json(server.port, "POST", "/score", json.dumps({"rows": rows}).encode())
        assert status == 200 and body["version"] == second.name
        # the same checkpoint exported in full: the delta on its base (both fetched from S3) scores bit for bit so
        full = Artifact.load(export_checkpoint(delta.manifest["checkpoint"], tmp_path / "full").path)
        assert full.version == second.name and "delta" not in full.manifest
        table = full.table_of(rows)
        assert torch.equal(delta.valid_logits(table), full.valid_logits(table))
        np.testing.assert_array_equal(np.float32(body["probabilities"]), full.score_rows(rows))

        # an upload cut short (the connection drops after the first file): files without a manifest, never named
        # by `latest`, never served
        with local_copy(second) as version:
            staging = tmp_path / "staging"
            staging.mkdir()
            for f in version.iterdir():
                (staging / f.name).write_bytes(f.read_bytes())
        uploaded = []

        def cut_short(local, dest):
            if uploaded:
                raise ConnectionError("connection reset while uploading")
            uploaded.append(dest)
            location(dest).write_bytes(local.read_bytes())

        manifest = json.loads((staging / "manifest.json").read_text())  # a second file, so that one gets uploaded
        manifest["files"]["extra.bin"] = "0" * 64
        (staging / "extra.bin").write_bytes(b"x")
        (staging / "manifest.json").write_text(json.dumps(manifest))
        publish_module.upload, original = cut_short, publish_module.upload
        try:
            with pytest.raises(ConnectionError):
                publish_module.publish(location(exports), staging, "partial")
        finally:
            publish_module.upload = original
        assert s3.keys("exports/versions/partial/") == [location(uploaded[0]).key_path.split("/", 1)[1]]  # a part
        assert resolve(exports) == second  # and `latest` never named it
        time.sleep(1.0)
        assert http_json(server.port, "GET", "/readyz")[1]["version"] == second.name
        assert server.stop() == 0, server.log.read_text()[-3000:]

    # batch scoring reads the artifact and the logs from S3 and writes its Parquet there
    result = predict(Artifact.load(exports), root, DayRange.parse("2026-11-04"), f"{s3.url}/scores/day4.parquet")
    assert result.rows == 1500 and s3.keys("scores/") == ["scores/day4.parquet"]
    s3.client.download_file(s3.name, "scores/day4.parquet", str(tmp_path / "day4.parquet"))
    assert pq.read_table(tmp_path / "day4.parquet").num_rows == 1500
