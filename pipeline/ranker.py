"""The ranking model: sparse arch (TorchRec) -> tokens -> dense tower (models/) -> BCE loss.

    model = RankingModel(spec, tower, sparse_device=torch.device("meta"), dedup=cfg.embeddings.dedup)
    reader = DayReader(day, spec, batch_size=512, sequence_feed=model.sequence_feed)   # batches this model reads
    loss, out = model(batch)          # the TorchRec TrainPipeline contract: (loss, output)

Legend: B batch rows, L padded sequence length, N events in a batch, D widths.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torchrec import JaggedTensor

from hyrank.embeddings.collection import SparseArch, SparseOutput
from hyrank.embeddings.dedup import SequenceFeed
from hyrank.models.inputs import SequenceInput, TowerInput
from hyrank.models.layers.fastpath import fast
from hyrank.pipeline.data.batch import Batch
from hyrank.pipeline.data.features import FeatureSpec


class RankingOutput(NamedTuple):
    """A NamedTuple, not a dataclass: TrainPipelineSparseDist FX-traces RankingModel.forward, and FX can return
    named tuples but not dataclasses."""

    logits: torch.Tensor  # (B,)
    labels: torch.Tensor  # (B,)
    group_ids: torch.Tensor  # (B,)
    loss: torch.Tensor  # () detached: TrainPipelineSparseDist.progress() returns only the output


class RankingModel(nn.Module):
    """Everything between a Batch and the loss; DMP shards `sparse`, DDP replicates the rest."""

    def __init__(self, spec: FeatureSpec, tower: nn.Module, *, sparse_device: torch.device | None = None,
                 dedup: bool = False, init_scale: float = 0.0, world_size: int = 1):
        super().__init__()
        # dedup (embeddings.dedup) is the sparse arch's switch; batches follow it through `sequence_feed`.
        # init_scale (embeddings.init_scale) only sets how new tables start: a checkpoint's weights replace them.
        # world_size: what DMP will shard the managed tables over (their id space is cut in as many buckets)
        self.sparse = SparseArch(spec.embedding_layout(init_scale=init_scale), device=sparse_device, dedup=dedup,
                                 num_buckets=world_size)
        self.tokens = Tokenizer(spec)
        self.tower = tower

    @property
    def sequence_feed(self) -> SequenceFeed:
        """The host-side step a BatchConverter/DayReader applies to sequences for this model's lookup."""
        return self.sparse.sequence_feed

    def forward(self, batch: Batch) -> tuple[torch.Tensor, RankingOutput]:
        embedded = self.sparse(batch.pooled, batch.sequence, batch.sequence_index, batch.managed_pooled,
                               batch.managed_sequence)
        logits = self.tower(self.tokens(embedded, batch.dense)).logits
        if batch.weights is None:
            loss = nn.functional.binary_cross_entropy_with_logits(logits, batch.labels)
        else:  # filler rows weigh 0, and a real row weighs 1/B as in a full batch (not 1/num_real)
            loss = nn.functional.binary_cross_entropy_with_logits(logits, batch.labels, weight=batch.weights,
                                                                  reduction="sum") / batch.labels.shape[0]
        return loss, RankingOutput(logits=logits.detach(), labels=batch.labels, group_ids=batch.group_ids,
                                   loss=loss.detach())


class Tokenizer(nn.Module):
    """Groups embedded features into the tower's input: block vectors, dense rest, padded sequences."""

    def __init__(self, spec: FeatureSpec):
        super().__init__()
        starts, pos = {}, 0
        for f in spec.dense_order:
            starts[f.name] = (pos, pos + f.size)
            pos += f.size
        self._dense_slices = starts
        self._blocks = spec.effective_blocks
        ebc = set(spec.embedding_layout().ebc_features)
        self._ebc_blocks = {b for b, members in self._blocks.items() if members and set(members) <= ebc}
        self._unblocked = [f.name for f in spec.unblocked_dense]
        self._sequences = {s.name: (s.columns, s.max_len) for s in spec.sequences}

    def forward(self, emb: SparseOutput, dense_BF: torch.Tensor) -> TowerInput:
        blocks = {b: ebc_block(emb, tuple(members)) if b in self._ebc_blocks
                  else torch.cat([self._feature(emb, dense_BF, n) for n in members], dim=-1)
                  for b, members in self._blocks.items()}
        rest = [self._feature(emb, dense_BF, n) for n in self._unblocked]
        dense = torch.cat(rest, dim=-1) if rest else dense_BF.new_zeros(dense_BF.shape[0], 0)
        sequences = {name: pad_sequence([emb.sequences[c] for c in cols], max_len, dense_BF.shape[0])
                     for name, (cols, max_len) in self._sequences.items()}
        return TowerInput(blocks=blocks, dense=dense, sequences=sequences)

    def _feature(self, emb: SparseOutput, dense_BF: torch.Tensor, name: str) -> torch.Tensor:
        if name in self._dense_slices:
            start, end = self._dense_slices[name]
            return dense_BF[:, start:end]
        return emb.pooled[name]


def ebc_block(emb: SparseOutput, members: tuple[str, ...]) -> torch.Tensor:
    """A block of EBC features: one column slice of the EBC's output (a view, no copy) when they sit side by side
    there in the block's order, else their concatenation."""
    spans = [emb.pooled_columns[m] for m in members]
    if all(a[1] == b[0] for a, b in zip(spans, spans[1:])):
        return emb.pooled_values[:, spans[0][0]:spans[-1][1]]
    return torch.cat([emb.pooled[m] for m in members], dim=-1)


# Opaque to TrainPipelineSparseDist's FX trace (it branches on the EBC output's key order, known only at run time).
torch.fx.wrap("ebc_block")


def pad_sequence(columns: list[JaggedTensor], max_len: int, batch_size: int) -> SequenceInput:
    """Aligned jagged columns side by side, padded to (B, max_len, D); events stay left-aligned. Each column's
    values are written once into their own width slice of the padded buffer (`_PadRows`): no event-wise
    concatenation first, and backward reads each column's rows straight out of the padded gradient."""
    if not fast():
        return pad_sequence_reference(columns, max_len, batch_size)
    lengths = columns[0].lengths()
    _check_lengths(lengths, max_len)
    starts = torch.cumsum(lengths, 0) - lengths
    # event n of row b at position p lands in flat slot b * max_len + p = n + (b * max_len - starts[b])
    shift_B = torch.arange(batch_size, device=lengths.device) * max_len - starts
    slot_N = (torch.arange(columns[0].values().shape[0], device=lengths.device)
              + torch.repeat_interleave(shift_B, lengths))
    padded = _PadRows.apply(slot_N, batch_size * max_len, *(c.values() for c in columns))
    mask = torch.arange(max_len, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)
    return SequenceInput(values_BLD=padded.view(batch_size, max_len, -1), mask_BL=mask)


def pad_sequence_reference(columns: list[JaggedTensor], max_len: int, batch_size: int) -> SequenceInput:
    """The plain path `pad_sequence` is tested against: concatenate the columns event-wise, then scatter."""
    lengths = columns[0].lengths()
    values_ND = torch.cat([c.values() for c in columns], dim=-1)
    rows = torch.repeat_interleave(torch.arange(batch_size, device=values_ND.device), lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    pos = torch.arange(values_ND.shape[0], device=values_ND.device) - torch.repeat_interleave(starts, lengths)
    padded = values_ND.new_zeros(batch_size, max_len, values_ND.shape[-1])
    padded[rows, pos] = values_ND
    mask = torch.arange(max_len, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)
    return SequenceInput(values_BLD=padded, mask_BL=mask)


def _check_lengths(lengths: torch.Tensor, max_len: int) -> None:
    """A row longer than max_len would spill into the next row's slots: the reader truncates to max_len, so this
    is a broken batch. On CUDA and in a traced program (export) an async assert: no host sync per batch."""
    if lengths.is_cuda or torch.compiler.is_compiling():
        torch._assert_async((lengths <= max_len).all(), "a sequence row is longer than max_len")
    elif not bool((lengths <= max_len).all()):
        raise ValueError(f"a sequence row holds {int(lengths.max())} events, more than max_len={max_len}: "
                         "batches come from the reader, which truncates to max_len")


class _PadRows(torch.autograd.Function):
    """(N, D_c) values of each column -> one zero-padded (S, sum D_c) buffer, row n of every column in slot
    slot_N[n]; backward gathers each column's N rows from the padded gradient's width slice."""

    @staticmethod
    def forward(ctx, slot_N: torch.Tensor, num_slots: int, *values_ND: torch.Tensor) -> torch.Tensor:
        widths = [v.shape[-1] for v in values_ND]
        out = values_ND[0].new_zeros(num_slots, sum(widths))
        start = 0
        for v, w in zip(values_ND, widths):
            out[:, start:start + w].index_copy_(0, slot_N, v)
            start += w
        ctx.save_for_backward(slot_N)
        ctx.widths = widths
        return out

    @staticmethod
    def backward(ctx, grad_SD: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (slot_N,) = ctx.saved_tensors
        grads, start = [], 0
        for i, w in enumerate(ctx.widths):
            grads.append(grad_SD[:, start:start + w].index_select(0, slot_N)
                         if ctx.needs_input_grad[2 + i] else None)
            start += w
        return (None, None, *grads)


# Opaque to TrainPipelineSparseDist's FX trace: it reads a length on the host and calls an autograd Function.
torch.fx.wrap("pad_sequence")
