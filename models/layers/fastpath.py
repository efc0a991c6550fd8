"""One switch for the fast paths of the towers (batched projections) and of what feeds them (the padding of
sequences), so the plain reference of each stays runnable in the whole model: tests compare a tower's outputs and
gradients both ways, and `hyrank bench model --compare` times the two side by side in one run.

    with reference_paths():
        logits = model(x).logits      # every fast path runs its plain reference
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

_fast = True


def fast() -> bool:
    return _fast


@contextlib.contextmanager
def reference_paths() -> Iterator[None]:
    global _fast
    before, _fast = _fast, False
    try:
        yield
    finally:
        _fast = before
