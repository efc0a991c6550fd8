"""Request and answer bodies of the scoring server: JSON or an Arrow IPC stream in, JSON or Arrow out.

    table = decode_request(body, arrow=is_arrow(content_type), rows=model.rows, max_rows=1024)   # BadRows: a 400
    response = answer(outcome, arrow="application/vnd.apache.arrow.stream" in accept)

A request is JSON {"rows": [{feature: value, ...}, ...]}, or an Arrow IPC stream (content-type
application/vnd.apache.arrow.stream) of a table whose columns are the features: both become one table of the
training types (pipeline/serving/rows.py), held to the same rules. The answer is JSON {"probabilities": [...],
"version": ...}, or, when the request's Accept names the Arrow type, an Arrow IPC stream of one float32 column
`probability`; either way the version is in the header x-hyrank-version. The same float32 numbers both ways.
The server (pipeline/serving/server.py) and `hyrank bench serve` (its in-process path) call these.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
from fastapi.responses import Response

from hyrank.pipeline.serving.rows import BadRows, RowSchema
from hyrank.pipeline.serving.worker import Outcome

ARROW_STREAM = "application/vnd.apache.arrow.stream"  # Arrow's IPC stream format (IANA-registered media type)
ANSWER_SCHEMA = pa.schema([pa.field("probability", pa.float32())])
VERSION_HEADER = "x-hyrank-version"


class NoModel(RuntimeError):
    """No model is loaded yet: no schema to decode a request with (HTTP 503)."""


def decode_request(body: bytes, *, arrow: bool, rows: RowSchema | None, max_rows: int) -> pa.Table:
    """A request body as a table of the training types (pipeline/serving/rows.py): an Arrow IPC stream when
    `arrow`, else JSON {"rows": [...]}. BadRows (a 400) names what is wrong: a body that does not parse, a shape,
    a row, field or column; NoModel (a 503) once it parses, while no model (`rows`) is loaded."""
    if arrow:
        try:  # full validation: offsets and lengths of a stream from the network are not trusted
            table = pa.ipc.open_stream(body).read_all()
            table.validate(full=True)
        except (pa.ArrowException, OSError, ValueError, EOFError) as e:
            raise BadRows([f"body: not an Arrow IPC stream ({e})"]) from None
        if rows is None:
            raise NoModel()
        return rows.from_arrow(table, max_rows=max_rows)
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRows([f"body: not JSON ({e})"]) from None
    except RecursionError:  # '[' * 100000: json's parser recurses once per level and gives up at Python's limit
        raise BadRows(["body: not JSON (nested too deeply)"]) from None
    problems = request_problems(payload, max_rows)
    if problems:
        raise BadRows(problems)
    if rows is None:
        raise NoModel()
    return rows.table_of(payload["rows"], max_rows=max_rows)


def is_arrow(content_type: str | None) -> bool:
    """A request body in Arrow's IPC stream format (its media type, parameters aside)."""
    return (content_type or "").split(";", 1)[0].strip().lower() == ARROW_STREAM


def answer(outcome: Outcome, *, arrow: bool) -> Response:
    """A 200 with the probabilities: an Arrow IPC stream of one float32 column `probability` when the client
    accepts one, else JSON; the version that scored them in the header x-hyrank-version (and in the JSON)."""
    headers = {VERSION_HEADER: outcome.version}
    if arrow:
        return Response(arrow_answer(outcome.probabilities), media_type=ARROW_STREAM, headers=headers)
    return Response(json_answer(outcome.probabilities, outcome.version), media_type="application/json",
                    headers=headers)


def arrow_answer(probabilities: np.ndarray) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, ANSWER_SCHEMA) as writer:
        writer.write_batch(pa.record_batch([pa.array(probabilities, type=pa.float32())], schema=ANSWER_SCHEMA))
    return sink.getvalue().to_pybytes()


def json_answer(probabilities: np.ndarray, version: str) -> bytes:
    # float32 -> Python float is exact, and json writes the shortest text that reads back as that float: a client
    # that takes the numbers as float32 has the bits the Arrow answer holds
    return json.dumps({"probabilities": probabilities.tolist(), "version": version},
                      separators=(",", ":")).encode()


def request_problems(payload: Any, max_rows: int) -> list[str]:
    """What is wrong with a request body's shape (not with its rows: the batcher checks those against the model)."""
    if not isinstance(payload, dict):
        return [f'body: expected a JSON object {{"rows": [...]}}, got {_json_type(payload)}']
    problems = [f"body: unknown field {k!r} (a request is {{\"rows\": [...]}})" for k in payload if k != "rows"]
    rows = payload.get("rows")
    if "rows" not in payload:
        problems.append("body: missing field 'rows'")
    elif not isinstance(rows, list) or not rows:
        problems.append(f"rows: expected a non-empty array of objects, got {_json_type(rows)}")
    elif len(rows) > max_rows:
        problems.append(f"rows: {len(rows)} rows, more than the {max_rows} one request may hold")
    return problems


def _json_type(value: Any) -> str:
    if isinstance(value, list) and not value:
        return "an empty array"
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)
