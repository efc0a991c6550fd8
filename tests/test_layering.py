"""The layers stay honest: each package imports only those below it (models/ none of ours, embeddings/ models,
pipeline/ both, jobs/ and bench/ anything; inside pipeline/, data, distributed, train and serving have their own
limits: FORBIDDEN), communication lives in pipeline/distributed/ (COMMUNICATE), no import circle anywhere, no file
over 500 lines.

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
           "pipeline/serving/export.py": ("pipeline.train",),
           # a day's readers agree before every batch: through the collectives object, the one owner of them
           "pipeline/data/reader.py": ("pipeline.distributed.collectives",)}
# Who may call torch.distributed: the pipeline's communication layer, and the benchmarks whose measured subject
# is torch.distributed or TorchRec's own loop (the baselines). DCP (torch.distributed.checkpoint) is a storage
# format whose collectives are its own: the checkpointer and export read and write it.
COMMUNICATE = ("pipeline/distributed/", "bench/overlap.py", "bench/async_bench.py", "bench/vs_torchrec.py")
DCP = ("pipeline/train/checkpoint.py", "pipeline/serving/export.py")
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


def _distributed_uses(path: Path, *, dcp_allowed: bool) -> list[str]:
    """Each import of torch.distributed, and each `torch.distributed.X` in the code, with its line."""
    tree = ast.parse(path.read_text(), filename=str(path))
    allowed = ("torch.distributed.checkpoint",) if dcp_allowed else ()
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] if node.module != "torch" else [f"torch.{a.name}" for a in node.names]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "torch" \
                and node.attr == "distributed":
            names = ["torch.distributed"]
        found += [f"{path.name}:{node.lineno}: {n}" for n in names
                  if (n == "torch.distributed" or n.startswith("torch.distributed.")) and not n.startswith(allowed)]
    return found


def test_only_the_communication_layer_calls_torch_distributed():
    bad = []
    for p in _sources():
        rel = str(p.relative_to(ROOT))
        if not rel.startswith(COMMUNICATE):
            bad += _distributed_uses(p, dcp_allowed=rel in DCP)
    assert not bad, "torch.distributed outside pipeline/distributed/ (use env.comm, a Collectives):\n" + "\n".join(bad)


@pytest.mark.parametrize("code", ["import torch.distributed as dist\ndist.all_reduce(x)\n",
                                  "from torch import distributed\n",
                                  "import torch\ntorch.distributed.barrier()\n",
                                  "from torch.distributed import all_reduce\n"])
def test_the_communication_check_finds_a_collective(tmp_path, code):
    """The check above is not vacuous: a collective planted in a data module is found; DCP is not one."""
    planted = tmp_path / "reader.py"
    planted.write_text(code)
    assert _distributed_uses(planted, dcp_allowed=False)
    planted.write_text("import torch.distributed.checkpoint as dcp\n")
    assert not _distributed_uses(planted, dcp_allowed=True)


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


def _long_files(paths: list[Path]) -> list[str]:
    return [f"{p.name}: {n}" for p in paths if (n := len(p.read_text().splitlines())) > MAX_LINES]


def test_no_source_file_over_500_lines():
    long = _long_files(_sources())
    assert not long, f"files over {MAX_LINES} lines (split them along a seam):\n" + "\n".join(long)


def test_the_length_check_finds_a_long_file(tmp_path):
    (tmp_path / "long.py").write_text("x = 1\n" * (MAX_LINES + 1))
    (tmp_path / "short.py").write_text("x = 1\n" * MAX_LINES)
    assert _long_files(sorted(tmp_path.glob("*.py"))) == [f"long.py: {MAX_LINES + 1}"]


def test_importing_models_loads_no_torchrec():
    code = (
        "import sys, pkgutil, importlib, hyrank.models as models\n"
        "for m in pkgutil.walk_packages(models.__path__, 'hyrank.models.'): importlib.import_module(m.name)\n"
        "print(','.join(sorted(n for n in sys.modules if n.startswith(('torchrec', 'fbgemm_gpu', 'hyrank.pipeline')))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"models/ pulled in: {out.stdout.strip()}"
