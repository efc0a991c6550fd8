"""The layers stay honest: each package imports only those below it (models/ none of ours, embeddings/ models,
pipeline/ both, jobs/ and bench/ anything; inside pipeline/, data, distributed, train and serving have their own
limits: FORBIDDEN), no import circle anywhere, no file over 500 lines.

Imports are read from the source (every `import`, also inside functions, and modules named to importlib as string
literals, as `hyrank bench` names its benchmarks), so a lazy import cannot slip a layer violation past the test.
"""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGES = ("models", "embeddings", "pipeline", "bench", "jobs")
# layer (a package or sub-package) -> module prefixes its source may not import
FORBIDDEN = {
    "models": ("torch.distributed", "torchrec", "fbgemm_gpu", "pipeline", "embeddings", "jobs", "bench"),
    "embeddings": ("pipeline", "jobs", "bench"),
    "pipeline/data": ("pipeline.train", "pipeline.distributed", "pipeline.cli", "pipeline.serving", "jobs", "bench"),
    "pipeline/distributed": ("pipeline.train", "pipeline.data", "pipeline.cli", "pipeline.serving", "jobs", "bench"),
    "pipeline/train": ("pipeline.cli", "pipeline.serving", "jobs", "bench"),
    # a serving process loads artifacts and scores requests without the training code or the training world
    "pipeline/serving": ("pipeline.train", "pipeline.distributed", "pipeline.stream", "pipeline.cli", "jobs", "bench"),
    "pipeline": ("bench", "jobs"),
}
# the one front door may name what is above the pipeline: `hyrank bench` dispatches to bench/
ALLOWED = {"pipeline/cli/tools.py": ("bench",),
           # export runs beside training (it reads checkpoints), never in a serving process
           "pipeline/serving/export.py": ("pipeline.train",)}
MAX_LINES = 500
_MODULE_NAME = re.compile(r"^(hyrank\.)?(%s)(\.\w+)+$" % "|".join(PACKAGES))


def _sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if ".venv" not in p.parts)


def _module_of(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, at any depth of its code, plus project modules it names to importlib."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    uses_importlib = "import_module" in path.read_text()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # `from pkg import module`
        elif uses_importlib and isinstance(node, ast.Constant) and isinstance(node.value, str):
            if _MODULE_NAME.match(node.value):
                found.add(node.value)
    # the packages install as hyrank.<package>: compare by their names in the repository
    return {name.removeprefix("hyrank.") for name in found}


def _project_graph() -> dict[str, set[str]]:
    modules = {_module_of(p): p for p in _sources()}
    graph = {}
    for name, path in modules.items():
        graph[name] = {m for m in _imports(path) if m in modules and m != name}
    return graph


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_sources_do_not_import_upward(layer):
    bad = [f"{p.relative_to(ROOT)}: {name}" for p in sorted((ROOT / layer).rglob("*.py"))
           for name in sorted(_imports(p)) if name.startswith(FORBIDDEN[layer])
           and not name.startswith(ALLOWED.get(str(p.relative_to(ROOT)), ()))]
    assert not bad, "layering violated:\n" + "\n".join(bad)


def test_no_import_circle():
    graph = _project_graph()
    index, low, on_stack, stack, circles = {}, {}, set(), [], []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    # a package importing its own sub-module is not a circle of files
    circles = [c for c in circles if not all(m.startswith(c[0] + ".") or m == c[0] for m in c)]
    assert not circles, f"import circles: {circles}"


def test_the_circle_check_finds_a_circle(tmp_path, monkeypatch):
    """The check above is not vacuous: two modules importing each other are reported."""
    graph = {"pipeline.a": {"pipeline.b"}, "pipeline.b": {"pipeline.a"}}
    monkeypatch.setattr(sys.modules[__name__], "_project_graph", lambda: graph)
    with pytest.raises(AssertionError, match="import circles"):
        test_no_import_circle()


def test_no_source_file_over_500_lines():
    long = [f"{p.relative_to(ROOT)}: {n}" for p in _sources() if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not long, f"files over {MAX_LINES} lines (split them along a seam):\n" + "\n".join(long)


def test_importing_models_loads_no_torchrec():
    code = (
        "import sys, pkgutil, importlib, hyrank.models as models\n"
        "for m in pkgutil.walk_packages(models.__path__, 'hyrank.models.'): importlib.import_module(m.name)\n"
        "print(','.join(sorted(n for n in sys.modules if n.startswith(('torchrec', 'fbgemm_gpu', 'hyrank.pipeline')))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"models/ pulled in: {out.stdout.strip()}"
