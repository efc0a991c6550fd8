"""Every registered tower learns on the generated logs: RankingModel (unsharded TorchRec on CPU) + tower + Adam,
and the training loss of the last epoch falls clearly below the label-entropy baseline (the loss of predicting
the day's CTR for every row)."""

import math

import pytest
import torch

from hyrank.models import MODELS, build_model
from hyrank.pipeline.data.days import discover_days
from hyrank.pipeline.data.reader import DayReader
from hyrank.pipeline.ranker import RankingModel

# Small widths: the whole file must stay well under a minute or two on two shared cores.
SMALL = {
    "dlrm_mlp": {"hidden": [64, 32]},
    "dcnv2": {"num_cross_layers": 2, "hidden": [64, 32]},
    "rankmixer": {"d_model": 36, "num_layers": 1, "ffn_mult": 2, "head_hidden": [64]},
    "longer_rankmixer": {"d_model": 36, "num_layers": 1, "ffn_mult": 2, "seq_dim": 16, "seq_layers": 1,
                         "recent_len": 8, "head_hidden": [64]},
    "transformer": {"d_model": 16, "num_layers": 1, "ffn_mult": 2, "head_hidden": [64]},
    "hyformer": {"d_model": 36, "num_layers": 1, "num_heads": 2, "ffn_mult": 2, "seq_dim": 16, "recent_len": 8,
                 "query_ffn_hidden": 32, "head_hidden": [64]},
    "onetrans": {"d_model": 16, "seq_dim": 16, "num_layers": 2, "ffn_mult": 2, "first_layer": "longer",
                 "recent_len": 8, "head_hidden": [64]},
    "hhft": {"d_model": 16, "num_layers": 1, "head_hidden": [64]},
    "hiformer": {"d_model": 16, "num_layers": 1, "head_hidden": [64]},
}
EPOCHS = 3  # ~46 batches of 128 a day: ~140 Adam steps
MARGIN_NATS = 0.03
_BATCHES: dict = {}


def _first_day(cfg):
    """The first day's batches, read once per data root for all models."""
    key = str(cfg.data.root)
    if key not in _BATCHES:
        _BATCHES[key] = list(DayReader(discover_days(cfg.data.root)[0], cfg.features, batch_size=128))
    return _BATCHES[key]


def _entropy(labels: torch.Tensor) -> float:
    p = labels.float().mean().item()
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_tower_learns_below_label_entropy(name, small_cfg):
    assert set(SMALL) == set(MODELS), "every registered model needs a small learning config here"
    batches = _first_day(small_cfg)
    torch.manual_seed(0)
    tower = build_model(name, SMALL[name], small_cfg.features.input_shape())
    model = RankingModel(small_cfg.features, tower, sparse_device=torch.device("cpu"))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(EPOCHS):
        losses = []
        for batch in batches:
            loss, _ = model(batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    baseline = _entropy(torch.cat([b.labels for b in batches]))
    last_epoch = sum(losses) / len(losses)
    print(f"{name}: last-epoch loss {last_epoch:.4f} vs label entropy {baseline:.4f}")
    assert last_epoch < baseline - MARGIN_NATS
