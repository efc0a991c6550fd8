"""hyrank embeddings: tables from the feature spec, TorchRec collections, sharding plan, dedup lookups.

Importing `hyrank` has checked the torch / torchrec / fbgemm_gpu triple (versions.py) already. With neither torchrec
nor fbgemm installed, the torch-only modules (`hyrank.embeddings.dedup`, `hyrank.models`) still import.
"""

if __name__ != "hyrank.embeddings":  # a checkout's root on sys.path must not make a second, top-level copy
    raise ImportError(f"import hyrank.embeddings, not {__name__}: hyrank installs its packages under one namespace")
