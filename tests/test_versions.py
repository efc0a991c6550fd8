"""The import-time version guard turns an fbgemm ABI mismatch into an actionable message."""

import pytest

import hyrank.embeddings.versions as v


def test_installed_triple_is_supported():
    found = v.check_versions()
    assert found["torch"].startswith("2.13") and found["torchrec"].startswith("1.8")


@pytest.mark.parametrize("fake,message", [
    ({"torch": "2.13.0", "torchrec": "1.8.0", "fbgemm_gpu": "1.9.0"}, "Unsupported"),
    ({"torch": "2.12.1", "torchrec": "1.8.0", "fbgemm_gpu": "1.8.0"}, "Unsupported"),
    ({"torch": "2.13.0", "torchrec": None, "fbgemm_gpu": "1.8.0"}, "needs torchrec"),
])
def test_mismatch_fails_with_a_fix(monkeypatch, fake, message):
    monkeypatch.setattr(v, "installed_versions", lambda: fake)
    with pytest.raises(ImportError, match=message) as e:
        v.check_versions()
    assert "scripts/bootstrap.sh" in str(e.value)


def test_guard_runs_before_torchrec_is_imported(tmp_path):
    """A broken triple must fail at `import hyrank` with the guard's message, before torchrec loads."""
    import subprocess
    import sys

    code = (
        "import importlib.metadata as md\n"
        "real = md.version\n"
        "md.version = lambda d: '1.9.0' if d.startswith('fbgemm') else real(d)\n"
        "import sys\n"
        "try:\n"
        "    import hyrank.pipeline.cli\n"
        "except ImportError as e:\n"
        "    print('torchrec' in sys.modules, e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("False Unsupported"), out


def test_torch_only_install_imports_the_torch_parts(monkeypatch):
    """A GPU box with torch alone (no torchrec, no fbgemm) may import models/ and the dedup op; half a stack may not."""
    monkeypatch.setattr(v, "installed_versions", lambda: {"torch": "2.11.0", "torchrec": None, "fbgemm_gpu": None})
    assert v.check_versions(allow_torch_only=True)["torch"] == "2.11.0"
    with pytest.raises(ImportError, match="needs torchrec, fbgemm_gpu"):
        v.check_versions()
    monkeypatch.setattr(v, "installed_versions", lambda: {"torch": "2.11.0", "torchrec": None, "fbgemm_gpu": "1.8.0"})
    with pytest.raises(ImportError, match="needs torchrec"):
        v.check_versions(allow_torch_only=True)


def test_torch_only_install_runs_the_torch_parts():
    """With torchrec and fbgemm absent (blocked in sys.modules, as on the GPU box), the CLI, the towers, the dedup op,
    the comm hooks and the overlap benchmark import; the trainer, which needs torchrec, fails at its import."""
    import subprocess
    import sys

    code = (
        "import importlib.metadata as md, sys\n"
        "real = md.version\n"
        "def version(d):\n"
        "    if d.startswith(('torchrec', 'fbgemm')): raise md.PackageNotFoundError(d)\n"
        "    return real(d)\n"
        "md.version = version\n"
        "sys.modules.update(torchrec=None, fbgemm_gpu=None)\n"
        "import hyrank.pipeline.cli, hyrank.models, hyrank.embeddings.dedup, hyrank.pipeline.distributed.comm_hooks\n"
        "import hyrank.bench.overlap\n"
        "try:\n"
        "    import hyrank.pipeline.train.trainer\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "torchrec" in out, out
