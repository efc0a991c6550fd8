"""Guard the torch / torchrec / fbgemm_gpu triple before anything loads fbgemm's C++ ops.

A mismatched fbgemm wheel fails deep inside `import torchrec` with an `undefined symbol` from a
shared library; this check turns that into a message that says which package to reinstall.
"""

from __future__ import annotations

import importlib.metadata as md

# (torch, torchrec, fbgemm) known to work together; fbgemm may be the CPU or the CUDA wheel.
SUPPORTED = {("2.13", "1.8", "1.8")}
FBGEMM_DISTS = ("fbgemm-gpu-cpu", "fbgemm-gpu", "fbgemm_gpu_cpu", "fbgemm_gpu")
FIX = "Run `bash scripts/bootstrap.sh` (creates .venv with the pinned stack) or see README.md 'Install'."


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def installed_versions() -> dict[str, str | None]:
    """Installed versions of torch, torchrec and whichever fbgemm wheel is present."""
    fbgemm = next((v for d in FBGEMM_DISTS if (v := _version(d))), None)
    return {"torch": _version("torch"), "torchrec": _version("torchrec"), "fbgemm_gpu": fbgemm}


def check_versions(*, allow_torch_only: bool = False) -> dict[str, str | None]:
    """Raise ImportError with an actionable message unless the triple is a supported one.

    `allow_torch_only`: torch present and neither torchrec nor fbgemm installed is accepted too. That is a GPU box
    measuring the torch-only parts (`hyrank.models`, the dedup op, `hyrank bench overlap`); anything there that
    needs torchrec then fails at its own `import torchrec`. Half a stack (one of the two) is still refused.
    """
    found = installed_versions()
    missing = [name for name, v in found.items() if v is None]
    if allow_torch_only and found["torch"] and missing == ["torchrec", "fbgemm_gpu"]:
        return found
    if missing:
        raise ImportError(f"hyrank needs {', '.join(missing)} but it is not installed. {FIX}")
    triple = tuple(_minor(found[k]) for k in ("torch", "torchrec", "fbgemm_gpu"))
    if triple not in SUPPORTED:
        want = ", ".join(f"torch {t}, torchrec {r}, fbgemm-gpu {f}" for t, r, f in sorted(SUPPORTED))
        raise ImportError(
            f"Unsupported torch/torchrec/fbgemm_gpu versions {found}: fbgemm's C++ ops are built against "
            f"one torch release and fail with 'undefined symbol' otherwise. Supported: {want}. {FIX}"
        )
    return found

