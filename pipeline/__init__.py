"""hyrank pipeline: config, data, training loop, distributed wrappers, checkpoints, export, serving."""
