"""2-rank gloo tests fork their ranks from the test process: see pipeline/distributed/launch.py."""

from hyrank.pipeline.distributed.launch import run_local as run_distributed  # noqa: F401
