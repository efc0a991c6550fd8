"""hyrank installs as one namespace: the repository's folders are hyrank.pipeline, hyrank.models, ...; nothing
generic (`models`, `pipeline`) is importable at the top level, even from the checkout's root."""

import subprocess
import sys
import tomllib

import pytest

from conftest import ROOT

TOP = ("pipeline", "models", "embeddings", "jobs", "bench")


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)


@pytest.mark.parametrize("name", ["models", "pipeline"])
def test_generic_top_level_names_do_not_import(name):
    out = _python(f"import {name}")
    assert out.returncode != 0 and f"import hyrank.{name}, not {name}" in out.stderr, out.stderr


def test_the_namespace_imports_without_side_effects():
    out = _python("import sys; n = len(sys.meta_path)\n"
                  "import hyrank.models, hyrank.pipeline, hyrank.embeddings\n"
                  "print(len(sys.meta_path) - n, 'torchrec' in sys.modules)")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "False"], "importing hyrank installed an import hook or loaded torchrec"


def test_every_package_folder_is_installed():
    """pyproject's explicit package list maps every folder that holds an __init__.py."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert {f"hyrank.{top}": top for top in TOP}.items() <= tool["package-dir"].items()
    found = {"hyrank." + ".".join(p.parent.relative_to(ROOT).parts)
             for top in TOP for p in (ROOT / top).rglob("__init__.py")} | {"hyrank"}
    assert found == set(tool["packages"])
