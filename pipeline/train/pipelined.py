"""Training steps through TorchRec's TrainPipelineSparseDist (`train.pipeline = "sparse_dist"`).

    for loss, seconds in pipelined_steps(trainer, InputClock(reader)): ...   # Trainer.steps under the pipeline

The pipeline's step also copies the next batch to the device and starts its embedding all-to-all while this
batch computes (CUDA streams; on CPU it runs with identical losses but has nothing to overlap). It calls an
"optimizer" around forward and backward: `_PipelineStep` routes that to the trainer's own step, so the dense
step's policy (DenseSync) and the step counter are the same as in the plain loop.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from hyrank.pipeline.data.batch import Batch


class InputClock:
    """The batches of an iterable, timing how long the trainer waits for each: `wait_s` is the wall time spent
    inside `next()` (decode the reader's loader threads have not finished, the per-batch flags' all_reduce), the
    part of a day's time that is input, not compute. Both step loops draw their batches through one."""

    def __init__(self, batches: Iterable[Batch]):
        self._it = iter(batches)
        self.wait_s = 0.0

    def __iter__(self) -> "InputClock":
        return self

    def __next__(self) -> Batch:
        start = time.perf_counter()
        try:
            return next(self._it)
        finally:
            self.wait_s += time.perf_counter() - start


def pipelined_steps(trainer: Any, batches: InputClock) -> Iterator[tuple[torch.Tensor, float]]:
    """Each step's loss and wall time over the batches, through a pipeline made for this day. `trainer`: the
    Trainer (pipeline/train/trainer.py, which imports this module) whose model, optimizer and step it drives."""
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    # A pipeline per day: it rewrites the sharded modules' inputs on attach, and detach() restores the
    # plain forward that evaluation and checkpoints expect.
    pipe = TrainPipelineSparseDist(trainer.model, _PipelineStep(trainer), trainer.env.device)
    try:
        while True:
            start = time.perf_counter()
            try:
                out = pipe.progress(batches)
            except StopIteration:
                return
            trainer.pipelined_modules = len(getattr(pipe, "_pipelined_modules", []))
            yield out.loss, time.perf_counter() - start
    finally:
        pipe.detach()


class _PipelineStep:
    """What TrainPipelineSparseDist calls as its optimizer: the trainer's own step around forward and backward."""

    def __init__(self, trainer: Any):
        self.trainer = trainer

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Called before the forward: also where the dense step's policy is set for the step."""
        self.trainer.optimizer.zero_grad()
        self.trainer._before_forward()

    def step(self, closure=None) -> None:
        self.trainer._after_backward()
