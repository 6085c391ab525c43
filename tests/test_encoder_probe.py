"""The frozen encoder's export round trip, the collapse check, and the probe's pieces."""

import pytest
import torch

from models.backbones import build_backbone
from models.probe import accuracy, select_and_fit
from tasks.artifacts import freeze
from tasks.data import ImageSplit
from tasks.encoder import (
    EncoderCollapsed,
    check_not_collapsed,
    embed,
    export_encoder,
    load_encoder,
    random_encoder,
)
from tasks.params import SslParams
from tasks.probe import Features, Labels, evaluate_features, label_subset
from tasks.ssl import build_ssl


def images(n=64, channels=1, size=8):
    pixels = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return ImageSplit(pixels, torch.arange(n) % 4)


@pytest.mark.parametrize("config", [
    {"name": "resnet", "in_channels": 1, "image_size": 8, "width": 8, "depth": [1, 1], "stem_stride": 1},
    {"name": "vit", "in_channels": 3, "image_size": 16, "patch_size": 4, "dim": 32, "depth": 2, "heads": 2, "mlp_ratio": 4, "pool": "cls"},
])
def test_exported_encoder_gives_the_same_embeddings(tmp_path, config):
    torch.manual_seed(0)
    backbone = freeze(build_backbone(**config))
    split = images(channels=config["in_channels"], size=config["image_size"])
    before = embed(backbone, split, batch_size=16)
    export_encoder(backbone, backbone.config, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["encoder.json", "encoder.safetensors"]
    loaded = load_encoder(tmp_path)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert torch.equal(embed(loaded, split, batch_size=64), before)


@pytest.mark.parametrize("objective", ["simclr", "mae", "ijepa"])
def test_the_random_baseline_is_a_fresh_network_of_the_trained_ones_architecture(tmp_path, objective):
    backbone = "vit" if objective in ("mae", "ijepa") else "resnet"
    trained = build_ssl(SslParams(backbone=backbone, objective=objective), channels=1, image_size=16).backbone
    export_encoder(trained, trained.config, tmp_path)
    baseline = random_encoder(tmp_path, seed=1)
    assert type(baseline) is type(trained) and baseline.config == trained.config
    shapes = {name: p.shape for name, p in trained.named_parameters()}
    assert {name: p.shape for name, p in baseline.named_parameters()} == shapes
    assert sum(p.numel() for p in baseline.parameters()) == sum(p.numel() for p in trained.parameters())
    trained_weights = dict(trained.named_parameters())
    assert any(not torch.equal(p, trained_weights[name]) for name, p in baseline.named_parameters())
    again = random_encoder(tmp_path, seed=1)  # seeded: the same baseline every run
    assert all(torch.equal(a, b) for a, b in zip(baseline.parameters(), again.parameters(), strict=True))


class Constant(torch.nn.Module):
    def forward(self, x):
        return torch.ones(len(x), 16)


def test_a_collapsed_encoder_is_caught():
    with pytest.raises(EncoderCollapsed, match="the encoder collapsed"):
        check_not_collapsed(embed(Constant(), images()))
    stats = check_not_collapsed(torch.randn(100, 16))
    assert stats["dead_fraction"] == 0


def clusters(n_per_class=60, classes=4, dim=8, spread=0.3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=generator) * 3
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    return centers[labels] + spread * torch.randn(len(labels), dim, generator=generator), labels


def test_probe_separates_clusters_and_val_picks_the_weight_decay():
    (train_x, train_y), (val_x, val_y) = clusters(seed=1), clusters(seed=1, n_per_class=20)
    result = select_and_fit((train_x, train_y), (val_x, val_y), 4, [1e-4, 1e3])
    assert result.weight_decay == 1e-4  # a huge decay flattens the logits and loses on val
    test_x, test_y = clusters(seed=1, n_per_class=30)
    assert accuracy(result.classifier, result.standardizer(test_x), test_y) > 0.95


def test_label_subset_is_stratified_with_one_per_class_at_least():
    labels = torch.arange(10).repeat_interleave(50)
    subset = label_subset(labels, 0.01, seed=0)
    assert torch.equal(labels[subset].bincount(), torch.ones(10, dtype=torch.long))
    assert len(label_subset(labels, 0.1, seed=0)) == 50


def test_evaluate_features_reports_every_number():
    x, y = clusters(seed=2)
    features, labels = Features(x, x, x), Labels(y, y, y)
    result = evaluate_features(features, labels, 4, [1e-3], [0.1, 1.0], knn_k=5, seed=0)
    assert result["probe_top1"] > 0.95 and result["knn_top1"] > 0.95
    assert set(result["label_efficiency"]) == {0.1, 1.0}
    assert result["confusion"].sum() == len(y) and len(result["per_class"]) == 4
