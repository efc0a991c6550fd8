"""`hyrank bench torchrec` compares two pipelines on one model: hyrank's `dlrm_mlp` with `interaction = "dot"` must
compute exactly what TorchRec's `DLRM` computes, given the same weights and the same pooled embeddings."""

import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.models.dlrm import DLRM as TorchRecDLRM

from hyrank.models import build_model
from hyrank.models.inputs import InputShape, TowerInput


def _linears(module: torch.nn.Module) -> list[torch.nn.Linear]:
    return [m for m in module.modules() if isinstance(m, torch.nn.Linear)]


def test_dot_interaction_equals_torchrecs_dlrm():
    torch.manual_seed(0)
    num_tables, dim, num_dense, batch = 5, 8, 3, 6
    tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=dim, num_embeddings=50, feature_names=[f"c{i}"])
              for i in range(num_tables)]
    ebc = EmbeddingBagCollection(tables=tables)
    ref = TorchRecDLRM(embedding_bag_collection=ebc, dense_in_features=num_dense, dense_arch_layer_sizes=[16, dim],
                       over_arch_layer_sizes=[32, 16, 1])
    ours = build_model("dlrm_mlp", {"interaction": "dot", "bottom": [16, dim], "hidden": [32, 16]},
                       InputShape(blocks={"sparse": num_tables * dim}, dense_dim=num_dense, sequences={}))
    theirs = _linears(ref.dense_arch) + _linears(ref.over_arch)
    mine = _linears(ours.bottom) + _linears(ours.net)
    assert [m.weight.shape for m in mine] == [m.weight.shape for m in theirs]
    with torch.no_grad():
        for a, b in zip(mine, theirs):
            a.weight.copy_(b.weight)
            a.bias.copy_(b.bias)
    lengths = torch.randint(0, 3, (num_tables * batch,))
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=[f"c{i}" for i in range(num_tables)],
                                              values=torch.randint(0, 50, (int(lengths.sum()),)), lengths=lengths)
    dense = torch.randn(batch, num_dense)
    expected = ref(dense, kjt).squeeze(-1)
    pooled = ebc(kjt)  # KeyedTensor in key order: the block hyrank's tokenizer builds from the same features
    got = ours(TowerInput(blocks={"sparse": pooled.values()}, dense=dense, sequences={})).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_dot_interaction_refuses_widths_it_cannot_cut():
    import pytest

    shape = InputShape(blocks={"user": 12, "item": 10}, dense_dim=3, sequences={})
    with pytest.raises(ValueError, match="not multiples of it: {'block item': 10}"):
        build_model("dlrm_mlp", {"interaction": "dot", "bottom": [8, 4]}, shape)
    with pytest.raises(ValueError, match="needs dense features outside every block"):
        build_model("dlrm_mlp", {"interaction": "dot", "bottom": [4]}, InputShape({"user": 8}, 0, {}))
