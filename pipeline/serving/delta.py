"""Delta artifacts: what changed in an exported program's tensors since a published version, and applying it.

    delta = make_delta(state_of(base_program), state_of(new_program))   # export --delta-from BASE
    torch.save(delta, folder / DELTA)
    apply_delta(state_of(base_program), load_delta(folder / DELTA))      # the loaded base now scores as the new model

A delta holds, for a program whose graph is its base's (the same model, features and table precision):
  rows    each embedding table's rows whose bits changed: which (a bit per row) and their values (a day of training
          moves the rows of the ids it saw; rows of ids not seen, and of free slots (zero in an artifact), stay);
  remap   each managed table's slots whose id changed (an id admitted, evicted or moved): which (a bit per slot) and
          their new mixed ids; the sorted arrays TorchRec looks ids up in are rebuilt from the slots exactly as
          export builds them (ManagedRemap.set_slots: a stable sort), so the remap is bit for bit a full export's;
  whole   every other tensor that changed, whole: the dense weights (the tower) and small buffers.
Every comparison is of bits (-0.0 is not 0.0, a NaN equals itself), so the base with its delta applied holds
exactly the new program's tensors. A delta's manifest names its base version and the sha256 of the base's manifest
(which holds the sha256 of each of the base's files): pipeline/serving/artifact.py loads the base (recursively,
itself maybe a delta), checks it, and applies the delta to it.

Imports torch and embeddings.managed only: the serving process loads deltas.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from hyrank.embeddings.managed import by_slot

DELTA = "delta.pt"
SORTED, MAPPING = "_mch_sorted_raw_ids", "_mch_remapped_ids_mapping"
_TABLE_MARKERS = ("embedding_bags.", "embeddings.")


class DeltaMismatch(ValueError):
    """The new program's tensors are not its base's (another model, features or table precision): no delta."""


class DeltaBaseError(ValueError):
    """A delta's base is missing, damaged or not the version it was made on: the delta cannot be loaded."""


def state_of(program: torch.export.ExportedProgram) -> dict[str, torch.Tensor]:
    """Every tensor an exported program holds, by name: parameters, buffers and lifted constants (the same
    objects: writing into them changes the program)."""
    constants = {k: v for k, v in program.constants.items() if isinstance(v, torch.Tensor)}
    return {**program.state_dict, **constants}


def _remap_prefixes(state: dict[str, torch.Tensor]) -> list[str]:
    return [k[: -len(SORTED)] for k in state if k.endswith(SORTED)]


def _is_table(key: str, value: torch.Tensor) -> bool:
    return value.dim() == 2 and key.endswith(".weight") and any(m in key for m in _TABLE_MARKERS)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """`t`'s bytes, a row per first-dimension entry (compared as bits, not values)."""
    t = t.detach().contiguous()
    return t.view(torch.uint8).reshape(t.shape[0], -1) if t.dim() else t.reshape(1).view(torch.uint8)


@torch.no_grad()
def make_delta(base: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> dict:
    """What turns `base` (a program's tensors) into `new` (see the module docstring); DeltaMismatch if their names,
    shapes or types differ."""
    if set(base) != set(new):
        raise DeltaMismatch(f"the programs hold other tensors: only in the base {sorted(set(base) - set(new))[:5]}, "
                            f"only in the new one {sorted(set(new) - set(base))[:5]}")
    for key, value in new.items():
        if value.shape != base[key].shape or value.dtype != base[key].dtype:
            raise DeltaMismatch(f"{key}: {tuple(base[key].shape)} {base[key].dtype} in the base, "
                                f"{tuple(value.shape)} {value.dtype} now")
    delta: dict = {"rows": {}, "remap": {}, "whole": {}}
    done = set()
    for prefix in _remap_prefixes(new):
        old_slots = by_slot(base[prefix + SORTED], base[prefix + MAPPING])
        new_slots = by_slot(new[prefix + SORTED], new[prefix + MAPPING])
        changed = old_slots != new_slots
        delta["remap"][prefix] = {"changed": _pack(changed), "ids": new_slots[changed].clone()}
        done |= {prefix + SORTED, prefix + MAPPING}
    for key, value in new.items():
        if key in done:
            continue
        if _is_table(key, value):
            changed = (_bits(value) != _bits(base[key])).any(dim=1)
            delta["rows"][key] = {"changed": _pack(changed), "values": value.detach()[changed].clone()}
        elif not torch.equal(_bits(value), _bits(base[key])):
            delta["whole"][key] = value.detach().clone()
    return delta


@torch.no_grad()
def apply_delta(state: dict[str, torch.Tensor], delta: dict) -> None:
    """Write `delta` into a program's tensors (state_of), in place; DeltaMismatch if it names tensors they lack."""
    unknown = [k for part in ("rows", "whole") for k in delta[part] if k not in state] + \
        [p for p in delta["remap"] if p + SORTED not in state]
    if unknown:
        raise DeltaMismatch(f"the delta names tensors its base does not hold: {unknown[:5]}")
    for key, change in delta["rows"].items():
        state[key][_unpack(change["changed"], state[key].shape[0])] = change["values"].to(state[key].dtype)
    for prefix, change in delta["remap"].items():
        ids, mapping = state[prefix + SORTED], state[prefix + MAPPING]
        slots = by_slot(ids, mapping)
        slots[_unpack(change["changed"], slots.numel())] = change["ids"]
        order = torch.argsort(slots, stable=True)  # as ManagedRemap.set_slots builds them (an unsharded remap)
        ids.copy_(slots[order])
        mapping.copy_(order)
    for key, value in delta["whole"].items():
        state[key].copy_(value)


def load_delta(path: Path) -> dict:
    """A delta file (tensors only: torch.load's weights_only, no code)."""
    return torch.load(path, weights_only=True)


def describe(delta: dict) -> dict[str, int]:
    """How much a delta carries: rows, remapped slots, whole tensors."""
    return {"rows": sum(int(c["values"].shape[0]) for c in delta["rows"].values()),
            "remapped_slots": sum(int(c["ids"].numel()) for c in delta["remap"].values()),
            "whole_tensors": len(delta["whole"])}


def _pack(mask: torch.Tensor) -> torch.Tensor:
    """(N,) bool -> N/8 bytes, a bit each: a day changes most rows of a hot table, and a bit is 1/64 of an index."""
    return torch.from_numpy(np.packbits(mask.numpy()))


def _unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    return torch.from_numpy(np.unpackbits(packed.numpy(), count=n).astype(bool))
