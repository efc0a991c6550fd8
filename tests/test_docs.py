"""The files that the README, docs/ and the code's comments name exist: a renamed or moved module leaves no path
behind that sends a reader nowhere. Only paths under the repository's own folders are checked (`pipeline/...py`,
`docs/results.md`); a run's outputs (`runs/...`, `data/...`) are not files of the repository."""

import os
import re
from pathlib import Path

from conftest import ROOT

FOLDERS = ("pipeline", "models", "embeddings", "jobs", "bench", "tests", "scripts", "docs", "requirements", "hyrank")
PATH = re.compile(r"(?<![\w./-])((?:%s)/[\w./-]*\w\.(?:py|toml|md|sh|yaml|txt|json|png))(?![\w/])" % "|".join(FOLDERS))
NOT_SOURCE = {".git", ".venv", "data", "runs", "__pycache__", "golden", "node_modules"}


def _texts() -> list[Path]:
    found = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in NOT_SOURCE and not d.endswith(".egg-info")]
        found += [Path(folder) / f for f in files if f.endswith((".py", ".md", ".toml", ".sh", ".yaml"))
                  or f in ("Dockerfile", ".torchxconfig", "crontab")]
    return sorted(found)


def test_every_named_repository_path_exists():
    missing = [f"{path.relative_to(ROOT)}:{i}: {m[1]}" for path in _texts()
               for i, line in enumerate(path.read_text().splitlines(), 1)
               for m in PATH.finditer(line) if not (ROOT / m[1]).exists()]
    assert not missing, "paths named but not in the repository:\n" + "\n".join(missing)


def test_the_check_finds_a_stale_path():
    """Not vacuous: the pattern picks up a path as comments write it (built here, or this file would name it)."""
    stale = "pipeline/" + "synth.py"
    assert PATH.findall(f"synthetic logs ({stale}), see `docs/results.md`.") == [stale, "docs/results.md"]
    assert not (ROOT / stale).exists()
