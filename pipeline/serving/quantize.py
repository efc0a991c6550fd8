"""Quantized tables for serving, stored once in the exported program.

    quantize_tables(scoring, "int8")   # in place: every EmbeddingBagCollection / EmbeddingCollection -> quantized

TorchRec's quantized collections keep their packed rows in fbgemm's inference TBEs, in a plain tensor attribute
(`weights_host`) of a module they do not register: torch.export lifts that tensor into the program's constants,
while the collection's state dict holds views of the same rows as buffers, and the program saves both. The int8
program was as large as the fp32 one (11.1 MB on the default model). Here each TBE is called through QuantLookup,
a registered module whose buffer is those rows, handed to the TBE for the call: the program reads them as a buffer,
saved once with the views that share its storage.

Rows are packed without padding (fbgemm's CPU kernels read rows of any alignment; TorchRec pads each row to 16
bytes for its GPU kernels): an int8 row of dim 16 is 16 bytes and a 4-byte scale and bias, not 32.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingCollection
from torchrec.inference.modules import quantize_embeddings
from torchrec.quant.embedding_modules import EmbeddingCollection as QuantEmbeddingCollection
from torchrec.quant.embedding_modules import quant_prep_customize_row_alignment

QUANTIZED = {"fp16": torch.float16, "int8": torch.qint8}
ROW_ALIGNMENT = 1  # bytes: fbgemm's own default for CPU tables


class QuantLookup(nn.Module):
    """One fbgemm inference TBE, its packed rows a registered buffer (see the module docstring)."""

    def __init__(self, tbe: nn.Module):
        super().__init__()
        if tbe.host_size == 0 or tbe.weights_host.numel() != tbe.host_size:
            raise ValueError(f"{type(tbe).__name__}: expected its rows in host memory (a CPU table), "
                             f"got host_size {tbe.host_size}")
        self._tbe = [tbe]  # in a list: not a submodule (its TorchScript objects cannot be exported as state)
        self.register_buffer("weights", tbe.weights_host)

    def forward(self, indices: torch.Tensor, offsets: torch.Tensor,
                per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        tbe = self._tbe[0]
        held = tbe.weights_host
        tbe.weights_host = self.weights  # under torch.export, the traced buffer: the program reads its own state
        try:
            return tbe.forward(indices=indices, offsets=offsets, per_sample_weights=per_sample_weights)
        finally:
            tbe.weights_host = held


def quantize_tables(module: nn.Module, tables: str) -> None:
    """Quantize every embedding collection in `module` to `tables` (fp16, or int8 row-wise: a scale and bias per
    row), unpadded, each TBE behind a QuantLookup registered on its collection (in place)."""
    collections = [EmbeddingBagCollection, EmbeddingCollection]
    quant_prep_customize_row_alignment(module, collections, ROW_ALIGNMENT)
    quantize_embeddings(module, dtype=QUANTIZED[tables], inplace=True,
                        additional_qconfig_spec_keys=[EmbeddingCollection],
                        additional_mapping={EmbeddingCollection: QuantEmbeddingCollection})
    for collection in list(module.modules()):
        tbes = getattr(collection, "_emb_modules", None)
        if tbes is None:
            continue
        if getattr(collection, "register_tbes", False):
            raise ValueError(f"{type(collection).__name__} registers its TBEs itself: not expected here")
        lookups = [QuantLookup(tbe) for tbe in tbes]
        tbes[:] = lookups  # the collection calls each one's forward in its own forward
        collection.quantized_lookups = nn.ModuleList(lookups)
