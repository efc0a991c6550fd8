"""The scoring server and batch prediction: what a client sees, against the artifact scoring the same rows.

One tiny artifact per module (bench/serve_load.py make_artifact: synthetic logs, one day trained on one forked gloo
rank, export). Servers run as real `hyrank serve` subprocesses on 127.0.0.1 (bench.serve_load.ServerProcess).
"""

import asyncio
import datetime as dt
import http.client
import json
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hyrank.bench.serve_load import (ServerProcess, drive, http_json, http_text, make_artifact, publish_copy,
                                     request_rows)
from conftest import ROOT
from hyrank.pipeline.cli import build_parser, main

SERVING_MODULES = ("hyrank.pipeline.serving.server", "hyrank.pipeline.serving.batching",
                   "hyrank.pipeline.serving.worker", "hyrank.pipeline.serving.bodies", "hyrank.pipeline.serving.rows",
                   "hyrank.pipeline.serving.predict", "hyrank.pipeline.cli.serving")


def test_the_serving_process_never_imports_training():
    code = (f"import sys, {', '.join(SERVING_MODULES)}\n"
            "bad = sorted(m for m in sys.modules if m.startswith('hyrank.pipeline.train'))\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True)


def test_cli_defaults_are_the_server_defaults(tmp_path):
    from hyrank.pipeline.serving.server import ServeOptions

    args = build_parser().parse_args(["serve", "--artifact", str(tmp_path), "--port", "1"])
    d = ServeOptions(tmp_path)
    assert (args.host, args.max_batch_rows, args.max_wait_ms, args.max_request_rows, args.max_body_bytes,
            args.reload_poll_s, args.reload_nice, args.model_threads, args.drain_timeout_s) == (
        d.host, d.max_batch_rows, d.max_wait_ms, d.max_request_rows, d.max_body_bytes, d.reload_poll_s,
        d.reload_nice, d.model_threads, d.drain_timeout_s)


# -- with an artifact ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    return make_artifact(tmp_path_factory.mktemp("made"))


@pytest.fixture(scope="module")
def artifact(made):
    from hyrank.pipeline.serving.artifact import Artifact

    return Artifact.load(made.root)


@pytest.fixture(scope="module")
def rows(made, artifact):
    return request_rows(made.data, artifact.features, 120)


MAX_BODY_BYTES = 2_000_000  # the module server's: over the 1.2 MB of the over-long list request below


@pytest.fixture(scope="module")
def server(made, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    with ServerProcess(made.root, log, "--reload-poll-s", "0", "--max-request-rows", "64", "--max-body-bytes",
                       str(MAX_BODY_BYTES)) as s:
        s.wait_ready()
        yield s
        assert s.stop() == 0, log.read_text()


def _post(server, payload) -> tuple[int, dict]:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return http_json(server.port, "POST", "/score", body)


def _samples(text: str) -> dict[str, float]:
    """The samples of a Prometheus text exposition: 'name{labels}' -> value."""
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def _with(row: dict, **changes) -> dict:
    out = {k: v for k, v in row.items() if changes.get(k, 0) is not None}
    out.update({k: v for k, v in changes.items() if v is not None})
    return out


BAD_REQUESTS = {  # name -> (payload from the good rows, a text the 400's problems must hold)
    "malformed_json": (lambda r: b'{"rows": [', "body: not JSON"),
    "not_an_object": (lambda r: [r[0]], "body: expected a JSON object"),
    "no_rows": (lambda r: {"row": r[:1]}, "body: missing field 'rows'"),
    "unknown_top_level_field": (lambda r: {"rows": r[:1], "debug": True}, "body: unknown field 'debug'"),
    "empty_rows": (lambda r: {"rows": []}, "rows: expected a non-empty array"),
    "too_many_rows": (lambda r: {"rows": r[:65]}, "rows: 65 rows, more than the 64"),
    "row_not_an_object": (lambda r: {"rows": [r[0], 7]}, "row 1: expected an object"),
    "missing_field": (lambda r: {"rows": [r[0], _with(r[1], hour=None)]}, "row 1: missing field 'hour'"),
    "unknown_field": (lambda r: {"rows": [_with(r[0], colour=3)]}, "row 0: unknown field 'colour'"),
    "ill_typed": (lambda r: {"rows": [r[0], r[1], _with(r[2], user_id="three")]}, "row 2: field 'user_id'"),
    "negative_id": (lambda r: {"rows": [r[0], _with(r[1], item_id=-5)]}, "row 1: field 'item_id': negative_id"),
    "over_long_sequence": (lambda r: {"rows": [_with(r[0], long_item_ids=[1] * 200_000,
                                                     long_item_cats=[1] * 200_000)]},
                           "row 0: field 'long_item_ids': list_too_long"),
    "nan_dense": (lambda r: {"rows": [_with(r[0], item_ctr_prior=float("nan"))]},
                  "row 0: field 'item_ctr_prior': not_finite"),
    "null_id": (lambda r: {"rows": [r[0], {**r[1], "user_id": None}]}, "row 1: field 'user_id': null"),
    # the types training refuses for a column (pipeline/data/schema.py), refused for a value: an id is an integer
    # or a string, never a float (not even an integral one: a float64 id column is refused whatever its values)
    "float_id": (lambda r: {"rows": [_with(r[0], user_id=3.99)]},
                 "row 0: field 'user_id': 3.99 has type double, but the feature spec reads it as a sparse column"),
    "integral_float_id": (lambda r: {"rows": [r[0], _with(r[1], item_id=3.0)]},
                          "row 1: field 'item_id': 3.0 has type double, but the feature spec reads it as a sparse"),
    "bool_id": (lambda r: {"rows": [_with(r[0], user_id=True)]},
                "row 0: field 'user_id': true has type bool, but the feature spec reads it as a sparse column"),
    "float_in_an_id_list": (lambda r: {"rows": [_with(r[0], long_item_ids=[1.5] + r[0]["long_item_ids"][1:])]},
                            "row 0: field 'long_item_ids': [1.5, "),
    "string_id_for_an_integer_id": (lambda r: {"rows": [_with(r[0], user_id="3")]},
                                    "row 0: field 'user_id': \"3\" is not a int64"),
    "integer_id_for_a_string_id": (lambda r: {"rows": [_with(r[0], user_city=3)]},
                                   "row 0: field 'user_city': 3 is not a string"),
    "bool_dense": (lambda r: {"rows": [_with(r[0], item_ctr_prior=False)]},
                   "row 0: field 'item_ctr_prior': false has type bool, but the feature spec reads it as a dense"),
    "string_dense": (lambda r: {"rows": [_with(r[0], item_ctr_prior="0.5")]},
                     "row 0: field 'item_ctr_prior': \"0.5\" has type string, but the feature spec reads it as a"),
}


@pytest.mark.dist
@pytest.mark.parametrize("kind", sorted(BAD_REQUESTS))
def test_a_bad_request_gets_a_400_naming_row_and_field_and_the_server_goes_on(server, rows, kind):
    make, expected = BAD_REQUESTS[kind]
    status, body = _post(server, make(rows))
    assert status == 400, body
    assert body["error"] == "bad request" and any(expected in p for p in body["problems"]), body
    status, body = _post(server, {"rows": rows[:3]})
    assert status == 200 and len(body["probabilities"]) == 3, body


def _send_until_answered(port: int, head: bytes, chunks) -> tuple[int, int]:
    """Send a request's head, then body chunks as long as the server has not answered (as a client that reads
    while it writes, like curl); (the answer's status, body bytes sent)."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(head)
        sent = 0
        for chunk in chunks:
            if select.select([sock], [], [], 0)[0]:
                break  # answered: the rest of the body is never sent
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break  # the server closed the connection after its answer
            sent += len(chunk)
        answer = b""
        while b"\r\n" not in answer and (data := sock.recv(65536)):
            answer += data
    return int(answer.split(b" ", 2)[1]), sent


@pytest.mark.dist
def test_a_body_over_max_body_bytes_gets_a_413_before_it_is_read(server, rows):
    """From Content-Length (the server answers before a byte of a 300 MB body is sent) and while reading a
    chunked body (the server stops reading soon after the limit, long before the 64 MB the client has to send)."""
    before = _samples(http_text(server.port, "/metrics"))
    head = b"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    status, sent = _send_until_answered(server.port, head + b"Content-Length: 300000000\r\n\r\n",
                                        [b"[" * 65536 for _ in range(4578)])
    assert status == 413 and sent < 300_000_000
    status, sent = _send_until_answered(server.port, head + f"Content-Length: {MAX_BODY_BYTES + 1}\r\n\r\n".encode(),
                                        [b" " * (MAX_BODY_BYTES + 1)])
    assert status == 413
    chunk = b"10000\r\n" + b" " * 65536 + b"\r\n"  # 64 KiB chunks of a chunked body, never ended
    status, sent = _send_until_answered(server.port, head + b"Transfer-Encoding: chunked\r\n\r\n",
                                        [chunk] * 1024 + [b"0\r\n\r\n"])
    assert status == 413 and MAX_BODY_BYTES < sent < 1024 * 65536, sent
    status, body = _post(server, {"rows": rows[:3]})
    assert status == 200 and len(body["probabilities"]) == 3, body
    after = _samples(http_text(server.port, "/metrics"))
    for sample in ('hyrank_requests_total{code="413"}', 'hyrank_request_errors_total{reason="too_large"}'):
        assert after.get(sample, 0) == before.get(sample, 0) + 3, sample


@pytest.mark.dist
def test_json_nested_too_deeply_is_a_400_counted_in_the_metrics(server, rows):
    """json.loads raises RecursionError, not JSONDecodeError, on deep nesting: it was a 500 the metrics missed."""
    before = _samples(http_text(server.port, "/metrics"))
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/score", body=b"[" * 100_000 + b"]" * 100_000)
    response = conn.getresponse()
    status, text = response.status, response.read().decode()
    conn.close()
    assert status == 400, text
    assert json.loads(text)["problems"] == ["body: not JSON (nested too deeply)"]
    after = _samples(http_text(server.port, "/metrics"))
    for sample in ('hyrank_requests_total{code="400"}', 'hyrank_request_errors_total{reason="bad_request"}'):
        assert after[sample] == before.get(sample, 0) + 1, sample
    assert 'hyrank_requests_total{code="500"}' not in after
    assert _post(server, {"rows": rows[:2]})[0] == 200


@pytest.mark.dist
def test_a_request_value_is_refused_with_the_words_training_refuses_its_column_type(artifact, rows):
    """One rule for logs and requests: a float user_id in a request gets the refusal check_schema gives a log
    file whose user_id column is float64 (it was truncated to an int and scored)."""
    from hyrank.pipeline.data.validate import check_schema
    from hyrank.pipeline.serving.artifact import BadRows

    table = artifact.table_of(rows[:2])
    logs = table.set_column(table.schema.get_field_index("user_id"), "user_id",
                            table.column("user_id").cast(pa.float64()))
    with pytest.raises(ValueError) as e:
        check_schema(artifact.spec, logs.schema, "part-0.parquet")
    training = str(e.value).removeprefix("part-0.parquet: column 'user_id' ")
    assert training.startswith("has type double, but the feature spec reads it as a sparse column"), training
    for value in (3.99, 3.0):
        with pytest.raises(BadRows) as e:
            artifact.table_of([rows[0], _with(rows[1], user_id=value)])
        assert e.value.problems == [f"row 1: field 'user_id': {value} {training}"]


@pytest.mark.dist
def test_integers_for_float_fields_are_floats_as_in_training(artifact, rows):
    """A dense column of integers is one training reads (schema.DENSE): JSON that writes 1.0 as 1 scores the same."""
    dense = [f.name for f in artifact.spec.dense if f.name in artifact.features]
    as_ints = [_with(r, **{k: (round(r[k]) if isinstance(r[k], float) else [round(x) for x in r[k]]) for k in dense})
               for r in rows[:8]]
    as_floats = [_with(r, **{k: (float(r[k]) if not isinstance(r[k], list) else [float(x) for x in r[k]])
                             for k in dense}) for r in as_ints]
    assert any(isinstance(r[k], int) for r in as_ints for k in dense)
    np.testing.assert_array_equal(artifact.score_rows(as_ints), artifact.score_rows(as_floats))


@pytest.mark.dist
def test_the_server_scores_what_the_artifact_scores(server, artifact, rows):
    """The same-logits link: concurrent requests of 1, 2, 7 and 50 rows (micro-batched together or not) get the
    probabilities Artifact.score_rows gives the same rows."""
    expected = artifact.score_rows(rows[:100])
    spans = [(0, 1), (1, 3), (3, 10), (10, 60), (60, 61), (61, 100)]
    answers = {}

    def ask(span):
        answers[span] = _post(server, {"rows": rows[span[0]:span[1]]})

    threads = [threading.Thread(target=ask, args=(s,)) for s in spans]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (lo, hi), (status, body) in answers.items():
        assert status == 200, body
        assert body["version"] == artifact.version
        np.testing.assert_allclose(body["probabilities"], expected[lo:hi], rtol=0, atol=1e-6)


@pytest.mark.dist
def test_health_readiness_and_metrics(server, artifact, rows):
    assert http_json(server.port, "GET", "/healthz") == (200, {"status": "alive"})
    status, ready = http_json(server.port, "GET", "/readyz")
    assert status == 200 and ready["version"] == artifact.version and ready["features"] == artifact.features
    assert _post(server, {"rows": rows[:4]})[0] == 200
    assert _post(server, b"not json")[0] == 400
    text = http_text(server.port, "/metrics")
    samples = _samples(text)
    assert samples['hyrank_requests_total{code="200"}'] >= 1 and samples['hyrank_requests_total{code="400"}'] >= 1
    assert samples['hyrank_request_errors_total{reason="bad_request"}'] >= 1
    assert samples["hyrank_request_duration_seconds_count"] >= 2
    assert samples['hyrank_request_duration_seconds_bucket{le="+Inf"}'] == samples[
        "hyrank_request_duration_seconds_count"]
    assert samples["hyrank_batch_rows_count"] >= 1 and samples["hyrank_rows_scored_total"] >= 4
    assert samples[f'hyrank_model_info{{version="{artifact.version}"}}'] == 1
    assert samples["hyrank_model_loaded"] == 1
    assert "# TYPE hyrank_request_duration_seconds histogram" in text


@pytest.mark.dist
def test_metrics_are_openmetrics_when_the_scraper_asks_for_it(server, rows):
    """prometheus_client's content negotiation: a Prometheus server asks for OpenMetrics (typed families, # EOF)."""
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    assert _post(server, {"rows": rows[:2]})[0] == 200
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("GET", "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    response = conn.getresponse()
    content_type, text = response.getheader("Content-Type"), response.read().decode()
    conn.close()
    assert content_type.startswith("application/openmetrics-text"), content_type
    families = {f.name: f for f in text_string_to_metric_families(text)}
    kinds = {name: families[name].type for name in (
        "hyrank_requests", "hyrank_request_errors", "hyrank_request_duration_seconds", "hyrank_batch_rows",
        "hyrank_batch_requests", "hyrank_rows_scored", "hyrank_queued_rows", "hyrank_model_loaded",
        "hyrank_model_info", "hyrank_model_reloads")}
    assert kinds == {"hyrank_requests": "counter", "hyrank_request_errors": "counter",
                     "hyrank_request_duration_seconds": "histogram", "hyrank_batch_rows": "histogram",
                     "hyrank_batch_requests": "histogram", "hyrank_rows_scored": "counter",
                     "hyrank_queued_rows": "gauge", "hyrank_model_loaded": "gauge", "hyrank_model_info": "gauge",
                     "hyrank_model_reloads": "counter"}
    ok = [s for s in families["hyrank_requests"].samples if s.name == "hyrank_requests_total"
          and s.labels == {"code": "200"}]
    assert ok and ok[0].value >= 1


@pytest.mark.dist
def test_two_servers_in_one_process_count_their_own_requests(made, rows):
    """Each server's metrics live in its own registry: two apps in one process neither clash (prometheus_client's
    default registry refuses a second metric of a name) nor count each other's requests."""
    import uvicorn

    from hyrank.bench.serve_load import free_port
    from hyrank.pipeline.serving.server import ServeOptions, make_app

    servers = []
    for _ in range(2):
        port = free_port()
        config = uvicorn.Config(make_app(ServeOptions(made.root, port=port, reload_poll_s=0)), host="127.0.0.1",
                                port=port, lifespan="on", log_config=None, access_log=False)
        servers.append((uvicorn.Server(config), port))
    threads = [threading.Thread(target=s.run, daemon=True) for s, _ in servers]
    for t in threads:
        t.start()
    try:
        for _, port in servers:
            deadline = time.monotonic() + 60
            while not (servers[0][0].started and servers[1][0].started) or \
                    http_json(port, "GET", "/readyz")[0] != 200:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        for _ in range(3):
            assert http_json(servers[0][1], "POST", "/score", json.dumps({"rows": rows[:2]}).encode())[0] == 200
        assert http_json(servers[1][1], "POST", "/score", b"{}")[0] == 400
        first, second = (_samples(http_text(port, "/metrics")) for _, port in servers)
    finally:
        for s, _ in servers:
            s.should_exit = True
        for t in threads:
            t.join(30)
    assert first['hyrank_requests_total{code="200"}'] == 3 and 'hyrank_requests_total{code="400"}' not in first
    assert second['hyrank_requests_total{code="400"}'] == 1 and 'hyrank_requests_total{code="200"}' not in second
    assert first["hyrank_rows_scored_total"] == 6 and second["hyrank_rows_scored_total"] == 0


@pytest.mark.dist
def test_one_batch_scores_good_requests_and_refuses_bad_ones_alone(artifact, rows):
    """Requests queued together become one batch (one model call); the bad one gets its own problems, the others
    their slices, equal to scoring them alone."""
    from hyrank.pipeline.serving.batching import MicroBatcher
    from hyrank.pipeline.serving.worker import LocalModel

    batches = []
    requests = [rows[:5], [rows[5], _with(rows[6], user_id=-1)], rows[7:8], rows[8:20]]
    model = LocalModel(artifact)

    async def go():
        batcher = MicroBatcher(lambda: model, max_batch_rows=512, max_wait_ms=300,
                               on_batch=lambda n, r: batches.append((n, r)))
        await batcher.start()
        outcomes = await asyncio.gather(*(batcher.submit(model.rows.table_of(r), model.rows) for r in requests))
        await batcher.close()
        return outcomes

    outcomes = asyncio.run(go())
    assert batches == [(4, 20)]
    assert outcomes[1].problems == ["row 1: field 'user_id': negative_id"] and outcomes[1].probabilities is None
    for i in (0, 2, 3):
        assert not outcomes[i].problems and outcomes[i].version == artifact.version
        np.testing.assert_allclose(outcomes[i].probabilities, artifact.score_rows(requests[i] * 2)[:len(requests[i])],
                                   rtol=0, atol=1e-6)


@pytest.mark.dist
def test_a_batch_reaching_a_model_a_reload_just_retired_is_scored_by_the_new_one(artifact, rows):
    """The model thread reads the model, the reload swaps and closes it, then the batch reaches it: the batch goes
    to the new one instead of failing (16 requests of a 32-client bench failed so before)."""
    from hyrank.pipeline.serving.batching import MicroBatcher
    from hyrank.pipeline.serving.worker import LocalModel, ModelRetired

    new = LocalModel(artifact)

    class Retired:
        rows, version = new.rows, "old"

        def score(self, tables):
            serving[0] = new  # the swap happened meanwhile
            raise ModelRetired("old was replaced")

    serving = [Retired()]

    async def go():
        batcher = MicroBatcher(lambda: serving[0], max_wait_ms=0)
        await batcher.start()
        outcome = await batcher.submit(new.rows.table_of(rows[:3]), new.rows)
        await batcher.close()
        return outcome

    outcome = asyncio.run(go())
    assert outcome.version == artifact.version and not outcome.error and len(outcome.probabilities) == 3


@pytest.mark.dist
def test_a_model_process_warms_its_program_up_on_rows_made_from_the_schema(artifact):
    """The warm-up's failure is only logged (a model serves all the same): it failed so, unnoticed, on a NameError."""
    from hyrank.pipeline.serving.worker import warm_up

    warm_up(artifact, sizes=(3, 16))


@pytest.mark.dist
def test_unready_until_published_then_a_hot_reload_under_load_fails_nothing(made, rows, tmp_path):
    from hyrank.pipeline.serving.artifact import resolve

    root = tmp_path / "root"
    root.mkdir()
    bodies = [json.dumps({"rows": rows[i:i + 8]}).encode() for i in range(0, 64, 8)]
    with ServerProcess(root, tmp_path / "server.log", "--reload-poll-s", "0.2") as server:
        server.wait_ready(path="/healthz")
        assert http_json(server.port, "GET", "/readyz")[0] == 503
        assert http_json(server.port, "POST", "/score", bodies[0])[0] == 503
        version = resolve(made.root)
        shutil.copytree(version, root / "versions" / version.name)
        (root / "latest").write_text(version.name + "\n")
        server.wait_ready()
        publisher = threading.Timer(1.0, publish_copy, args=(root, "v2"))
        publisher.start()
        records = drive(server.port, bodies, clients=4, seconds=1.0, until_version="v2", max_seconds=240)
        publisher.join()
        metrics = http_text(server.port, "/metrics")
        assert server.stop() == 0
    assert [r for r in records if r[2] != 200] == [], "requests failed during the reload"
    versions = {r[3] for r in records}
    assert versions == {version.name, "v2"}, versions
    first_new_done = min(r[0] + r[1] for r in records if r[3] == "v2")
    late_old = [r for r in records if r[0] > first_new_done and r[3] != "v2"]
    assert not late_old, f"{len(late_old)} requests sent after the swap were scored by the old version"
    assert 'hyrank_model_reloads_total{result="ok"} 2' in metrics and 'hyrank_model_info{version="v2"} 1' in metrics


@pytest.mark.dist
def test_a_damaged_version_fails_its_load_in_the_model_process_and_the_old_one_keeps_serving(made, rows, tmp_path):
    """The child says why it could not load (the sha256 check), the parent logs it and counts a failed reload, and
    the serving model process goes on; a repaired version is then loaded."""
    from hyrank.pipeline.serving.artifact import resolve
    from hyrank.pipeline.serving.server import Metrics, ModelSlot

    root = tmp_path / "root"
    version = resolve(made.root)
    shutil.copytree(version, root / "versions" / version.name)
    (root / "latest").write_text(version.name + "\n")
    metrics = Metrics()
    slot = ModelSlot(root, metrics)
    try:
        assert slot.refresh() and slot.model.version == version.name
        serving = slot.model
        publish_copy(root, "v2")
        with open(root / "versions" / "v2" / "model.pt2", "r+b") as f:
            f.seek(1000)
            f.write(b"damaged")
        assert not slot.refresh() and slot.model is serving and serving.alive
        assert metrics.registry.get_sample_value("hyrank_model_reloads_total", {"result": "failed"}) == 1
        assert not slot.refresh()  # not retried until it changes
        outcome = serving.score([serving.rows.table_of(rows[:3])])[0]
        assert outcome.version == version.name and len(outcome.probabilities) == 3
        shutil.copy(version / "model.pt2", root / "versions" / "v2" / "model.pt2")
        os.utime(root / "versions" / "v2" / "manifest.json")  # a re-export: the manifest is written again
        assert slot.refresh() and slot.model.version == "v2" and not serving.alive
    finally:
        slot.close()


@pytest.mark.dist
def test_a_latest_naming_no_version_is_logged_once_and_counted_as_a_failed_reload(made, tmp_path, caplog):
    """Every poll finds the dangling pointer; one line says so per pointer, and it counts once. It must be seen on
    two polls in a row: one poll can fall inside a hand-made publish that writes `latest` before its folder (export
    itself writes the folder first and never removes a published one)."""
    from hyrank.pipeline.serving.artifact import resolve
    from hyrank.pipeline.serving.server import Metrics, ModelSlot

    root = tmp_path / "root"
    version = resolve(made.root)
    shutil.copytree(version, root / "versions" / version.name)
    metrics = Metrics()
    slot = ModelSlot(root, metrics)

    def failed() -> float:
        return metrics.registry.get_sample_value("hyrank_model_reloads_total", {"result": "failed"})

    def poll(pointer: str, times: int) -> list[str]:
        (root / "latest").write_text(pointer + "\n")
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="hyrank.pipeline.serving.server"):
            for _ in range(times):
                slot.refresh()
        return [r.getMessage() for r in caplog.records]

    assert poll("gone", 1) == [] and failed() == 0
    assert poll("gone", 4) == [f"{root / 'latest'} names 'gone', which is not a published version under {root}; "
                               "still serving nothing"]
    assert failed() == 1 and slot.model is None
    try:
        assert poll(version.name, 1) == [] and slot.model.version == version.name
        assert poll("../../etc", 3) == [f"{root / 'latest'} names '../../etc', which is not a published version "
                                        f"under {root}; still serving {version.name}"]
        assert failed() == 2 and slot.model.version == version.name
    finally:
        slot.close()


@pytest.mark.dist
def test_sigterm_drains_the_requests_in_flight_and_exits_0(made, rows, tmp_path):
    """Requests held in the batch queue (a 1.5 s batching wait) when SIGTERM arrives all get their answer."""
    with ServerProcess(made.root, tmp_path / "server.log", "--max-wait-ms", "1500", "--max-batch-rows",
                       "100000", "--reload-poll-s", "0") as server:
        server.wait_ready()
        answers = []
        sent = time.monotonic()
        threads = [threading.Thread(target=lambda i=i: answers.append(
            (_post(server, {"rows": rows[i:i + 3]}), time.monotonic()))) for i in range(6)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        server.process.terminate()
        term = time.monotonic()
        for t in threads:
            t.join(30)
        assert server.process.wait(30) == 0, (tmp_path / "server.log").read_text()
    assert term - sent < 1.4 and len(answers) == 6
    assert all(status == 200 and len(body["probabilities"]) == 3 for (status, body), _ in answers), answers
    assert all(done > term for _, done in answers), "an answer came before the signal: nothing was in flight"
    assert "stopped by SIGTERM" in (tmp_path / "server.log").read_text()


@pytest.mark.dist
def test_predict_keeps_order_and_keys_scores_like_the_artifact_and_marks_bad_rows(made, artifact, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(made.data, data)
    days = sorted(p for p in data.iterdir() if p.name.startswith("day="))
    damaged = sorted(days[1].glob("*.parquet"))[0]
    table = pq.read_table(damaged)
    user_id = table.column("user_id").to_numpy().copy()
    user_id[5] = -1
    pq.write_table(table.set_column(table.schema.get_field_index("user_id"), "user_id", pa.array(user_id)), damaged)
    out = tmp_path / "scores.parquet"
    assert main(["predict", "--artifact", str(made.root), "--data", str(data), "--days", "2026-11-01..2026-11-02",
                 "--out", str(out)]) == 0
    assert "1 bad row(s) marked" in capsys.readouterr().out
    scores = pq.read_table(out)
    assert scores.column_names == ["query_id", "day", "file", "row", "probability", "problem"]
    start = 0
    for day in days:
        for path in sorted(day.glob("*.parquet")):
            source = pq.read_table(path)
            n = source.num_rows
            got = scores.slice(start, n)
            start += n
            name = str(path.relative_to(data))
            assert got.column("file").to_pylist() == [name] * n
            assert got.column("day").to_pylist() == [day.name.split("=")[1]] * n
            assert got.column("row").to_pylist() == list(range(n))
            assert got.column("query_id").to_pylist() == source.column("query_id").to_pylist()
            good = np.ones(n, dtype=bool)
            if path == damaged:
                good[5] = False
                assert got.column("problem")[5].as_py() == "field 'user_id': negative_id"
                assert got.column("probability")[5].as_py() is None
            assert got.column("problem").null_count == good.sum()
            expected = artifact.score_table(source.select(artifact.features).filter(pa.array(good)))
            probs = got.column("probability").to_numpy(zero_copy_only=False)[good]
            np.testing.assert_allclose(probs, expected, rtol=0, atol=1e-6)
    assert start == scores.num_rows
    assert dt.date.fromisoformat(scores.column("day")[0].as_py()) == dt.date(2026, 11, 1)


# -- Arrow bodies --------------------------------------------------------------------------------------------------

ARROW = "application/vnd.apache.arrow.stream"


def _arrow(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _ask(server, body: bytes, *, arrow_in: bool, arrow_out: bool) -> tuple[int, dict, object]:
    """(status, headers, answer: a dict from JSON, or the Arrow table) of one POST /score."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        headers = {"content-type": ARROW if arrow_in else "application/json"}
        if arrow_out:
            headers["accept"] = ARROW
        conn.request("POST", "/score", body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
        out = dict(response.getheaders())
        if response.getheader("content-type") == ARROW:
            return response.status, out, pa.ipc.open_stream(data).read_all()
        return response.status, out, json.loads(data)
    finally:
        conn.close()


def _bits(answer) -> np.ndarray:
    """The probabilities of an answer as float32 bit patterns (JSON numbers are float32 values written exactly)."""
    if isinstance(answer, pa.Table):
        assert answer.schema == pa.schema([pa.field("probability", pa.float32())]), answer.schema
        return answer.column("probability").to_numpy().view(np.uint32)
    return np.asarray(answer["probabilities"], dtype=np.float32).view(np.uint32)


def _request_table(artifact, rows) -> pa.Table:
    return artifact.table_of(rows).select(artifact.features)


@pytest.mark.dist
def test_arrow_and_json_requests_of_the_same_rows_score_bit_for_bit_the_same(server, artifact, rows):
    """Each body in, each answer out, on one server: the same float32 bits; the version in the header. An Arrow
    table in other types training accepts (int32 ids, large lists, dictionary strings, float64 dense values, a
    variable list for the fixed-size one) scores the same as well, as such a log file trains the same."""
    some = rows[:40]
    json_body, arrow_body = json.dumps({"rows": some}).encode(), _arrow(_request_table(artifact, some))
    answers = [_ask(server, body, arrow_in=arrow_in, arrow_out=arrow_out)
               for body, arrow_in in ((json_body, False), (arrow_body, True)) for arrow_out in (False, True)]
    for status, headers, answer in answers:
        assert status == 200 and headers["x-hyrank-version"] == artifact.version, answer
        np.testing.assert_array_equal(_bits(answer), _bits(answers[0][2]))
    assert answers[0][2]["version"] == artifact.version
    np.testing.assert_allclose(_bits(answers[0][2]).view(np.float32), artifact.score_rows(some), rtol=0, atol=1e-6)
    table = _request_table(artifact, some)
    other = {}
    for f in table.schema:
        column, t = table.column(f.name), f.type
        if pa.types.is_integer(t):
            other[f.name] = column.cast(pa.int32())
        elif pa.types.is_string(t):
            other[f.name] = column.dictionary_encode()
        elif pa.types.is_floating(t):
            other[f.name] = column.cast(pa.float64())
        elif pa.types.is_fixed_size_list(t):
            other[f.name] = column.cast(pa.list_(pa.float64()))
        else:
            other[f.name] = column.cast(pa.large_list(t.value_type))
    status, _, answer = _ask(server, _arrow(pa.table(other)), arrow_in=True, arrow_out=True)
    assert status == 200, answer
    np.testing.assert_array_equal(_bits(answer), _bits(answers[0][2]))


def _replace(table: pa.Table, name: str, column) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, column)


BAD_ARROW = {  # name -> (the body from a table of good rows, a text the 400's problems must hold)
    "garbage": (lambda t: b"\x00garbage" * 100, "body: not an Arrow IPC stream"),
    "json_sent_as_arrow": (lambda t: b'{"rows": []}', "body: not an Arrow IPC stream"),
    "truncated": (lambda t: _arrow(t)[:-100], "body: not an Arrow IPC stream"),
    "no_rows": (lambda t: _arrow(t.slice(0, 0)), "rows: expected at least one row, got none"),
    "too_many_rows": (lambda t: _arrow(pa.concat_tables([t] * 17)), "rows: 68 rows, more than the 64"),
    "missing_column": (lambda t: _arrow(t.drop_columns(["hour"])), "missing column 'hour'"),
    "extra_column": (lambda t: _arrow(t.append_column("colour", pa.array([1] * 4))), "unknown column 'colour'"),
    "label_column": (lambda t: _arrow(t.append_column("click", pa.array([1] * 4))), "unknown column 'click'"),
    "repeated_column": (lambda t: _arrow(t.append_column("hour", t.column("hour"))), "column 'hour': given 2 times"),
    # the words check_schema gives a log file whose column has that type
    "float_id": (lambda t: _arrow(_replace(t, "user_id", t.column("user_id").cast(pa.float64()))),
                 "column 'user_id': has type double, but the feature spec reads it as a sparse column"),
    "bool_dense": (lambda t: _arrow(_replace(t, "item_ctr_prior", pa.array([True] * 4))),
                   "column 'item_ctr_prior': has type bool, but the feature spec reads it as a dense column"),
    "float_sequence": (lambda t: _arrow(_replace(t, "long_item_ids", t.column("long_item_ids").cast(
        pa.list_(pa.float64())))), "column 'long_item_ids': has type list<item: double>, but the feature spec"),
    "string_id_for_an_integer_id": (lambda t: _arrow(_replace(t, "user_id", t.column("user_id").cast(pa.string()))),
                                    "column 'user_id': has type string, which does not convert to the int64"),
    "wrong_dense_size": (lambda t: _arrow(_replace(t, "item_content", pa.array([[0.5] * 3] * 4, pa.list_(
        pa.float32(), 3)))), "column 'item_content': has type fixed_size_list<item: float>[3], but"),
    # values: validation's reasons, row by row, as for JSON rows
    "negative_id": (lambda t: _arrow(_replace(t, "item_id", pa.array([1, -5, 2, 3]))),
                    "row 1: field 'item_id': negative_id"),
    "null_id": (lambda t: _arrow(_replace(t, "user_id", pa.array([1, 2, None, 3]))), "row 2: field 'user_id': null"),
}


@pytest.mark.dist
@pytest.mark.parametrize("kind", sorted(BAD_ARROW))
def test_a_bad_arrow_body_gets_a_400_naming_the_column_and_the_server_goes_on(server, artifact, rows, kind):
    make, expected = BAD_ARROW[kind]
    status, _, body = _ask(server, make(_request_table(artifact, rows[:4])), arrow_in=True, arrow_out=True)
    assert status == 400, body
    assert body["error"] == "bad request" and any(expected in p for p in body["problems"]), body
    status, _, answer = _ask(server, _arrow(_request_table(artifact, rows[:3])), arrow_in=True, arrow_out=True)
    assert status == 200 and answer.num_rows == 3, answer


@pytest.mark.dist
def test_an_arrow_body_over_max_body_bytes_gets_a_413(server, artifact, rows):
    table = _request_table(artifact, rows[:64])
    while len(body := _arrow(table)) <= MAX_BODY_BYTES:
        table = pa.concat_tables([table, table])
    head = (f"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {ARROW}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    status, sent = _send_until_answered(server.port, head, [body[i:i + 65536] for i in range(0, len(body), 65536)])
    assert status == 413 and sent < len(body)
    status, _, answer = _ask(server, _arrow(_request_table(artifact, rows[:3])), arrow_in=True, arrow_out=True)
    assert status == 200 and answer.num_rows == 3, answer


def _model_process(server_pid: int) -> int:
    """The server's one child process (started by its loader thread: children are listed per thread)."""
    tasks = os.listdir(f"/proc/{server_pid}/task")
    children = [c for t in tasks for c in open(f"/proc/{server_pid}/task/{t}/children").read().split()]
    assert len(children) == 1, children
    return int(children[0])


@pytest.mark.dist
def test_a_model_process_that_dies_is_started_again(made, rows, tmp_path):
    """Its requests get 503s (retry later) until the new process serves; nothing hangs."""
    body = json.dumps({"rows": rows[:4]}).encode()
    with ServerProcess(made.root, tmp_path / "server.log", "--reload-poll-s", "0") as server:
        server.wait_ready()
        assert http_json(server.port, "POST", "/score", body)[0] == 200
        first = _model_process(server.process.pid)
        os.kill(first, signal.SIGKILL)
        deadline, statuses = time.monotonic() + 120, []
        while time.monotonic() < deadline:
            statuses.append(http_json(server.port, "POST", "/score", body)[0])
            if statuses[-1] == 200:
                break
            time.sleep(0.2)
        assert statuses[-1] == 200 and set(statuses) <= {200, 503}, statuses
        assert _model_process(server.process.pid) != first
        metrics = http_text(server.port, "/metrics")
        assert server.stop() == 0
    assert 'hyrank_model_reloads_total{result="failed"} 1' in metrics, metrics
    assert "starting it again" in (tmp_path / "server.log").read_text()
