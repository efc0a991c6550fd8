"""hyrank embeddings: tables from the feature spec, TorchRec collections, sharding plan, dedup lookups.

Importing this package checks the torch / torchrec / fbgemm_gpu triple first (embeddings/versions.py), so a
mismatched fbgemm wheel fails with a message saying what to reinstall, not with an `undefined symbol`. With
neither torchrec nor fbgemm installed, the torch-only modules (`embeddings.dedup`, `models/`) still import.
"""

from embeddings.versions import check_versions

check_versions(allow_torch_only=True)
