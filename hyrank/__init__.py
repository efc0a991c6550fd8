"""hyrank: an industrial training pipeline for CTR ranking models.

The repository keeps its packages at its root (pipeline/, models/, embeddings/, jobs/, bench/); they install under
this one namespace (pyproject.toml's package-dir), so nothing generic like `models` or `pipeline` lands at the top
level of a user's environment:

    import hyrank.models, hyrank.pipeline
    python -m hyrank --help          # the same as the `hyrank` command

Importing it checks the torch / torchrec / fbgemm_gpu triple (embeddings/versions.py) and nothing else: a
mismatched fbgemm wheel fails here, with the fix, instead of with an `undefined symbol` deep inside torchrec.
"""

from hyrank.embeddings.versions import check_versions as _check_versions

__version__ = "0.1.0"

# torch alone (a GPU box measuring models/) is accepted: what needs torchrec then fails at its own import
_check_versions(allow_torch_only=True)
