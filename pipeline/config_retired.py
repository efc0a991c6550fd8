"""Config keys that were folded into others: configs, and the configs stored in older checkpoints' meta.json, that
hold one still load, read as today's keys with a warning.

    data = translate_retired({"precision": "bf16", "lr": 0.1}, "train")   # -> {"autocast": "bf16", "lr": 0.1}
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

# dotted key -> {old value: what it reads as, in the same table}. train.precision = "bf16" was the CUDA-only autocast
# of the whole forward; train.autocast is the tower's training forward on any device.
RETIRED: dict[str, dict[Any, dict[str, Any]]] = {
    "train.precision": {"fp32": {}, "bf16": {"autocast": "bf16"}},
}


def translate_retired(data: dict[str, Any], where: str) -> dict[str, Any]:
    """`data` (the table at dotted path `where`) with its retired keys replaced; ValueError naming the key for a
    value the old key never took or a clash with the new key set to something else."""
    out = dict(data)
    for name in [n for n in data if _join(where, n) in RETIRED]:
        key = _join(where, name)
        table, value = RETIRED[key], out.pop(name)
        if value not in table:
            raise ValueError(f"{key} (retired) must be one of {sorted(table)}, got {value!r}")
        clash = sorted(k for k, v in table[value].items() if out.get(k, v) != v)
        if clash:
            raise ValueError(f"{key} (retired) and {_join(where, clash[0])} disagree")
        out.update(table[value])
        if table[value]:
            now = ", ".join(f"{_join(where, k)} = {v!r}" for k, v in table[value].items())
            log.warning("%s = %r is retired: read as %s", key, value, now)
    return out


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key
