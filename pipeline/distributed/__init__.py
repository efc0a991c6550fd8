"""Process groups, DistributedModelParallel wiring and DDP comm hooks. Models never import this."""
