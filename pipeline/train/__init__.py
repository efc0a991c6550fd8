"""The training run: the trainer (the only day loop), checkpoints of its Stateful parts, the LR schedule."""
