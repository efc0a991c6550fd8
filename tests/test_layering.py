"""The layers stay honest: models/ is pure single-device PyTorch; embeddings/ never reaches up into pipeline/."""

import ast
import subprocess
import sys

import pytest

from conftest import ROOT

# layer -> module prefixes its source may not import
FORBIDDEN = {
    "models": ("torch.distributed", "torchrec", "fbgemm_gpu", "pipeline", "embeddings", "jobs"),
    "embeddings": ("pipeline", "jobs"),
}


def _imports(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_sources_do_not_import_upward(layer):
    bad = [f"{p.relative_to(ROOT)}: {name}" for p in sorted((ROOT / layer).rglob("*.py"))
           for name in _imports(p) if name.startswith(FORBIDDEN[layer])]
    assert not bad, "layering violated:\n" + "\n".join(bad)


def test_importing_models_loads_no_torchrec():
    code = (
        "import sys, pkgutil, importlib, models\n"
        "for m in pkgutil.walk_packages(models.__path__, 'models.'): importlib.import_module(m.name)\n"
        "print(','.join(sorted(n for n in sys.modules if n.startswith(('torchrec', 'fbgemm_gpu', 'pipeline')))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"models/ pulled in: {out.stdout.strip()}"
