"""2-rank gloo tests fork their ranks from the test process: see pipeline/distributed/local.py."""

from hyrank.pipeline.distributed.local import run_local as run_distributed  # noqa: F401
