"""hyrank pipeline: config, data, training loop, distributed wrappers, checkpoints, export, serving."""

# Runs the torch/torchrec/fbgemm version guard before any pipeline module imports torchrec.
import embeddings  # noqa: F401
