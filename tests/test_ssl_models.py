"""Unit tests of the SSL half of models/: backbones, augmentation, losses, objectives, kNN."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from models.augment import TwoViews
from models.backbones import build_backbone
from models.knn import knn_accuracy, knn_predict
from models.ssl import BYOL, DINO, KeyQueue, MoCoV2, Triplet, rotate_four_ways
from models.ssl_losses import batch_hard_triplet, byol_loss, hardest_negatives, nt_xent
from models.ssl_masked import IJEPA
from models.ssl_registry import build_objective
from tasks.params import (
    AugmentParams,
    BYOLParams,
    DINOParams,
    IJEPAParams,
    MoCoParams,
    ResNetParams,
    SimCLRParams,
    TripletParams,
    ViTParams,
)
from tests.defaults import defaults

BACKBONE_PARAMS = {"resnet": ResNetParams, "vit": ViTParams}
OBJECTIVE_PARAMS = {"simclr": SimCLRParams, "moco": MoCoParams, "byol": BYOLParams, "dino": DINOParams, "triplet": TripletParams}


def tiny_resnet():
    return build_backbone("resnet", 1, 16, **defaults(ResNetParams, width=8, depth=(1, 1)))


def digits_augment() -> TwoViews:
    return TwoViews(16, 1, **defaults(AugmentParams, crop_scale=(0.4, 1.0), flip=False, blur_prob=0.0))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    """scikit-learn's 8x8 digits, upsampled to 16x16, in [-1, 1]."""
    images = torch.tensor(load_digits().images, dtype=torch.float32)[:, None] / 16
    return F.interpolate(images, size=16, mode="bilinear") * 2 - 1


# -- backbones -----------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize(
    ("name", "image_size", "cfg"),
    [
        ("resnet", 8, {"width": 8, "depth": (2, 2, 2, 2)}),
        ("resnet", 20, {"width": 8, "depth": (1, 1, 1)}),
        ("resnet", 32, {"width": 8, "depth": (1, 1)}),
        ("resnet", 28, {"width": 8, "depth": (1, 1, 1), "stem_stride": 2}),
        ("vit", 8, {"patch_size": 4, "dim": 32, "depth": 2, "heads": 4}),
        ("vit", 28, {"patch_size": 7, "dim": 32, "depth": 1, "heads": 2}),
        ("vit", 64, {"patch_size": 8, "dim": 32, "depth": 1, "heads": 2}),
    ],
)
def test_backbone_gives_one_feature_vector_per_image(name, image_size, cfg, channels):
    backbone = build_backbone(name, channels, image_size, **defaults(BACKBONE_PARAMS[name], **cfg))
    features = backbone(torch.randn(3, channels, image_size, image_size))
    assert features.shape == (3, backbone.out_dim)


@pytest.mark.parametrize("name", ["resnet", "vit"])
def test_backbone_is_rebuilt_from_its_json_config(name):
    torch.manual_seed(0)
    original = build_backbone(name, 3, 16, **defaults(BACKBONE_PARAMS[name], depth=(1, 2) if name == "resnet" else 2)).eval()
    rebuilt = build_backbone(**json.loads(json.dumps(original.config))).eval()
    rebuilt.load_state_dict(original.state_dict())
    images = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(rebuilt(images), original(images))


def test_unknown_backbone_names_the_choices():
    with pytest.raises(ValueError, match="resnet"):
        build_backbone("vgg", 3, 32)


# -- augmentation --------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
def test_two_views_are_reproducible_per_seed_and_differ_between_samples(channels):
    augment = TwoViews(16, channels, **defaults(AugmentParams, crop_scale=(0.2, 1.0), flip=True, blur_prob=0.5))
    same_image = torch.rand(1, channels, 16, 16).expand(8, -1, -1, -1) * 2 - 1
    torch.manual_seed(3)
    view1, view2 = augment(same_image)
    torch.manual_seed(3)
    again1, again2 = augment(same_image)
    torch.testing.assert_close(view1, again1)
    torch.testing.assert_close(view2, again2)
    assert view1.shape == same_image.shape
    assert view1.min() >= -1 and view1.max() <= 1
    assert not torch.allclose(view1, view2)
    per_sample = view1.flatten(1)
    assert all(not torch.allclose(per_sample[0], other) for other in per_sample[1:])


# -- losses --------------------------------------------------------------------------------


def nt_xent_by_loops(z1: np.ndarray, z2: np.ndarray, temperature: float) -> float:
    """NT-Xent written out pair by pair, as in the SimCLR paper's Algorithm 1."""
    z = np.concatenate([z1, z2]).astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    n = len(z1)
    total = 0.0
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        denominator = sum(math.exp(z[i] @ z[k] / temperature) for k in range(2 * n) if k != i)
        total += -math.log(math.exp(z[i] @ z[positive] / temperature) / denominator)
    return total / (2 * n)


def test_nt_xent_matches_the_pairwise_definition():
    generator = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 5, generator=generator), torch.randn(6, 5, generator=generator)
    expected = nt_xent_by_loops(z1.numpy(), z2.numpy(), temperature=0.3)
    assert nt_xent(z1, z2, temperature=0.3).item() == pytest.approx(expected, rel=1e-5)


def test_byol_loss_is_zero_for_aligned_and_four_for_opposite_vectors():
    vectors = torch.randn(4, 8)
    assert byol_loss(3 * vectors, vectors).item() == pytest.approx(0.0, abs=1e-6)
    assert byol_loss(-vectors, vectors).item() == pytest.approx(4.0)


def on_the_circle(degrees: list[float], lengths: list[float] | None = None) -> torch.Tensor:
    """2-D embeddings at the given angles (and lengths: the loss normalises them away)."""
    radians = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    lengths = torch.tensor(lengths or [1.0] * len(degrees), dtype=torch.float64)
    return torch.stack([radians.cos(), radians.sin()], dim=1) * lengths[:, None]


# three images, two views each; view 1 of image i is row i of z1, view 2 row i of z2. Keys are the
# six views in the loss's order: view 1 of images 0, 1, 2, then view 2 of images 0, 1, 2
VIEW1_DEGREES, VIEW2_DEGREES = [0, 20, 180], [10, 90, 200]
# by hand, each anchor's nearest view of another image: image 0's views (0 and 10 degrees) are
# nearer each other than to anything else, so each picks 20; image 1's view 1 (20) is nearer image
# 0's view 2 (10) than its own other view (90) is, and that one (90) picks 10 (80 away) over 0 and
# 180 (90 away); image 2's views (180 and 200) both pick 90
HARDEST = [1, 3 + 0, 3 + 1, 1, 3 + 0, 3 + 1]  # keys: 20, 10, 90, 20, 10, 90 degrees


def test_triplet_hardest_negative_is_the_nearest_view_of_another_image():
    z1 = on_the_circle(VIEW1_DEGREES, lengths=[5.0, 0.1, 2.0])
    z2 = on_the_circle(VIEW2_DEGREES, lengths=[0.3, 7.0, 1.0])
    keys = F.normalize(torch.cat([z1, z2]), dim=1)
    own, positives = torch.arange(6), torch.tensor([3, 4, 5, 0, 1, 2])
    assert hardest_negatives(keys, keys, own, positives).tolist() == HARDEST
    # the same by brute force: the smallest Euclidean distance to a key that is neither itself nor its positive
    distances = torch.cdist(keys, keys)
    distances[own, own] = distances[own, positives] = float("inf")
    assert distances.argmin(dim=1).tolist() == HARDEST
    # with its positive left in, image 0's views would pick each other: the exclusion matters
    assert hardest_negatives(keys, keys, own, own)[:1].tolist() == [3]


@pytest.mark.parametrize("margin", [0.2, 1.0])
def test_triplet_loss_is_torchs_triplet_margin_loss_on_the_mined_triplets(margin):
    z1 = on_the_circle(VIEW1_DEGREES, lengths=[5.0, 0.1, 2.0])
    z2 = on_the_circle(VIEW2_DEGREES, lengths=[0.3, 7.0, 1.0])
    keys = F.normalize(torch.cat([z1, z2]), dim=1)
    positives = keys[[3, 4, 5, 0, 1, 2]]
    reference = torch.nn.TripletMarginLoss(margin=margin, p=2, eps=0)(keys, positives, keys[HARDEST])
    torch.testing.assert_close(batch_hard_triplet(z1, z2, margin, soft_margin=False), reference)
    soft = F.softplus((keys - positives).norm(dim=1) - (keys - keys[HARDEST]).norm(dim=1)).mean()
    torch.testing.assert_close(batch_hard_triplet(z1, z2, margin, soft_margin=True), soft)

    # a random batch: brute-force mining in float64, then torch's loss on what it mined
    generator = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(16, 8, generator=generator), torch.randn(16, 8, generator=generator)
    keys = F.normalize(torch.cat([z1, z2]).double(), dim=1)
    distances = torch.cdist(keys, keys)
    own, positive_index = torch.arange(32), torch.arange(32).roll(16)
    distances[own, own] = distances[own, positive_index] = float("inf")
    mined = distances.argmin(dim=1)
    reference = torch.nn.TripletMarginLoss(margin=margin, p=2, eps=0)(keys, keys[positive_index], keys[mined])
    assert batch_hard_triplet(z1, z2, margin, soft_margin=False).item() == pytest.approx(reference.item(), rel=1e-5)


def test_triplet_loss_is_zero_once_every_positive_beats_every_negative_by_the_margin():
    # image i's views straddle the axis e_i, 10 degrees apart; every view of another image is 85
    # degrees or more from them: the gap in distance exceeds the margin 0.2 but not 1.2
    base = torch.eye(4, dtype=torch.float64)
    tilt = torch.roll(base, 1, dims=1) * math.tan(math.radians(5))
    z1 = (base + tilt).requires_grad_()
    z2 = base - tilt
    positive_distance = 2 * math.sin(math.radians(5))
    negative_distance = math.sqrt(2 - math.sin(math.radians(10)))  # the nearest other views: cosine sin(5) cos(5)
    assert 1.17 < negative_distance - positive_distance < 1.18
    loss = batch_hard_triplet(z1, z2, margin=0.2, soft_margin=False)
    assert loss.item() == 0
    loss.backward()
    assert (z1.grad == 0).all()  # nothing left to learn
    assert batch_hard_triplet(z1, z2, margin=1.2, soft_margin=False).item() == pytest.approx(1.2 - (negative_distance - positive_distance))
    assert batch_hard_triplet(z1, z2, margin=0.2, soft_margin=True).item() > 0  # the soft margin never stops


def test_triplet_gradients_reach_the_backbone(digits):
    torch.manual_seed(0)
    triplet = Triplet(tiny_resnet(), digits_augment(), **defaults(TripletParams, proj_hidden_dim=16, proj_dim=8))
    outputs = triplet(digits[:16])
    assert outputs["loss"] > 0
    outputs["loss"].backward()
    # the first layer, below every other; and each block's last norm (zero-initialised, so the
    # layers before it within the block get their gradient from the second step on)
    assert triplet.backbone.stem[0].weight.grad.abs().sum() > 0
    blocks = [module for module in triplet.backbone.modules() if hasattr(module, "bn2")]
    assert blocks and all(block.bn2.weight.grad.abs().sum() > 0 for block in blocks)


# -- objectives ----------------------------------------------------------------------------


def test_key_queue_is_first_in_first_out():
    queue = KeyQueue(size=5, dim=7)
    keys = torch.eye(7)  # key i is the unit vector e_i, so each slot shows which key it holds
    queue.push(keys[:3])
    queue.push(keys[3:6])  # 3 and 4 fill the ring, 5 overwrites the oldest key, 0
    held = queue.keys.argmax(dim=1).tolist()
    assert held == [5, 1, 2, 3, 4]
    assert queue.pointer.item() == 1  # key 1 is the oldest now


def test_moco_pushes_both_views_keys_while_training_only(digits):
    moco = MoCoV2(tiny_resnet(), digits_augment(), **defaults(MoCoParams, proj_hidden_dim=16, proj_dim=8, queue_size=64))
    moco(digits[:10])
    assert moco.queue.pointer.item() == 20
    moco.eval()
    moco(digits[:10])
    assert moco.queue.pointer.item() == 20


def cosine_momentum_by_formula(step: int, total_steps: int, base: float) -> float:
    # BYOL, section 3.2: tau = 1 - (1 - tau_base) * (cos(pi k / K) + 1) / 2
    return 1 - (1 - base) * (math.cos(math.pi * step / total_steps) + 1) / 2


@pytest.mark.parametrize(
    "make",
    [
        lambda: BYOL(tiny_resnet(), digits_augment(), 16, 8, 16, momentum_base=0.9),
        lambda: DINO(tiny_resnet(), digits_augment(), **defaults(DINOParams, out_dim=32, hidden_dim=16, bottleneck_dim=8, momentum_base=0.9)),
        lambda: IJEPA(build_backbone("vit", 1, 16, **defaults(ViTParams, patch_size=4, dim=16, depth=1, heads=2)), digits_augment(),
                      **defaults(IJEPAParams, predictor_dim=16, predictor_depth=1, predictor_heads=2, momentum_base=0.9)),
    ],
    ids=["byol", "dino", "ijepa"],
)
def test_target_is_an_ema_of_the_online_network(make, digits):
    torch.manual_seed(0)
    objective = make()
    optimizer = torch.optim.SGD(objective.parameters(), lr=0.5)
    objective(digits[:16])["loss"].backward()
    optimizer.step()
    assert all(param.grad is None for param in objective.target.parameters())
    online = [p.detach().clone() for p in [*objective.backbone.parameters(), *objective.head.parameters()]]
    before = [p.detach().clone() for p in objective.target.parameters()]
    assert any(not torch.equal(o, b) for o, b in zip(online, before, strict=True))

    objective.after_step(step=3, total_steps=10)

    momentum = cosine_momentum_by_formula(3, 10, base=0.9)
    for target, old, new in zip(objective.target.parameters(), before, online, strict=True):
        assert not target.requires_grad
        torch.testing.assert_close(target, momentum * old + (1 - momentum) * new)


def test_dino_centre_is_an_ema_of_the_teacher_outputs_and_its_temperature_warms_up(digits):
    dino = DINO(tiny_resnet(), digits_augment(), **defaults(
        DINOParams, out_dim=32, hidden_dim=16, bottleneck_dim=8,
        teacher_temperature=0.07, warmup_teacher_temperature=0.03, teacher_warmup_fraction=0.5,
        center_momentum=0.8,
    ))
    dino.center.fill_(0.25)
    torch.manual_seed(1)
    dino(digits[:16])
    torch.manual_seed(1)  # the same views again, to recompute the teacher's outputs
    with torch.no_grad():
        teacher = dino.target(torch.cat(dino.augment(digits[:16])))
    torch.testing.assert_close(dino.center, 0.8 * 0.25 + 0.2 * teacher.mean(dim=0, keepdim=True))

    assert dino.teacher_temperature.item() == pytest.approx(0.03)
    dino.after_step(step=1, total_steps=10)  # 2 of the 5 warm-up steps done
    assert dino.teacher_temperature.item() == pytest.approx(0.03 + 0.4 * 0.04)
    dino.after_step(step=7, total_steps=10)
    assert dino.teacher_temperature.item() == pytest.approx(0.07)


def test_rotation_labels_count_the_quarter_turns():
    image = torch.zeros(1, 1, 4, 4)
    image[0, 0, 0, 1] = 1  # one lit pixel: no rotation maps it onto itself
    rotated, labels = rotate_four_ways(image)
    assert labels.tolist() == [0, 1, 2, 3]
    lit = [tuple(divmod(int(r.flatten().argmax()), 4)) for r in rotated]
    # counter-clockwise quarter turns move (row 0, col 1) to the left edge, bottom, right edge
    assert lit == [(0, 1), (2, 0), (3, 2), (1, 3)]


def test_unknown_objective_names_the_choices():
    with pytest.raises(ValueError, match="simclr"):
        build_objective("swav", tiny_resnet(), digits_augment())


TINY_HPARAMS = {
    "simclr": {"proj_hidden_dim": 64, "proj_dim": 32},
    "moco": {"proj_hidden_dim": 64, "proj_dim": 32, "queue_size": 128, "momentum_base": 0.9},
    "byol": {"proj_hidden_dim": 64, "proj_dim": 32, "pred_hidden_dim": 64, "momentum_base": 0.9},
    # a fixed teacher temperature: its warm-up raises the loss while it lasts
    "dino": {"out_dim": 128, "hidden_dim": 64, "bottleneck_dim": 32, "momentum_base": 0.9,
             "teacher_temperature": 0.04, "teacher_warmup_fraction": 0.0},
    "rotation": {},
    "triplet": {"proj_hidden_dim": 64, "proj_dim": 32},
}


@pytest.mark.parametrize("name", sorted(TINY_HPARAMS))
def test_loss_falls_on_digits(name, digits):
    torch.manual_seed(0)
    hparams = defaults(OBJECTIVE_PARAMS[name], **TINY_HPARAMS[name]) if name in OBJECTIVE_PARAMS else {}
    objective = build_objective(name, tiny_resnet(), digits_augment(), **hparams)
    optimizer = torch.optim.AdamW(objective.parameters(), lr=3e-3)
    steps = 30
    batch_size = len(digits) // steps
    order = torch.randperm(len(digits))
    losses = []
    for step in range(steps):
        outputs = objective(digits[order[step * batch_size : (step + 1) * batch_size]])
        optimizer.zero_grad()
        outputs["loss"].backward()
        optimizer.step()
        if hasattr(objective, "after_step"):
            objective.after_step(step, steps)
        assert all(value.ndim == 0 for value in outputs.values())
        losses.append(outputs["loss"].item())
    # steps 5-9 as the start: MoCo's queue holds random keys for its first steps
    early, late = np.mean(losses[5:10]), np.mean(losses[-5:])
    assert late < 0.95 * early, f"{name}: loss went from {early:.3f} to {late:.3f}"
    assert outputs["feature_std"] > 0.01


# -- kNN -----------------------------------------------------------------------------------


def test_knn_is_perfect_on_well_separated_clusters():
    generator = torch.Generator().manual_seed(0)
    centres = torch.eye(8)[:4] * 10
    labels = torch.arange(4).repeat_interleave(30)
    features = centres[labels] + 0.5 * torch.randn(len(labels), 8, generator=generator)
    train, test = torch.arange(0, 120, 2), torch.arange(1, 120, 2)
    assert knn_accuracy(features[train], labels[train], features[test], labels[test], k=20) == 1.0
    assert knn_accuracy(features[train], labels[train], features[test], labels[test], k=500) == 1.0
    in_chunks = knn_predict(features[train], labels[train], features[test], k=5, chunk_size=7)
    assert torch.equal(in_chunks, labels[test])
