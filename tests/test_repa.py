"""REPA (Yu et al. 2024): the alignment term against the authors' formula on identical inputs, its
minimum, the hidden features each backbone hands it, weight 0 as plain training, and the projector
trained but left out of the exported denoiser. Its run through `dvc repro` is the DiT teacher's in
test_generative_stages.py."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from models.diffusion import DDPM, EDM, DenoiserTraining, RectifiedFlow
from models.repa import RepaAlignment, negative_cosine
from tasks.diffusion import (
    Denoiser,
    build_denoiser_training,
    build_net,
    export_denoiser,
    load_denoiser,
)
from tasks.params import DiffusionParams, validate
from tests.test_generative_stages import TINY_NETS

pytestmark = pytest.mark.usefixtures("one_thread")

OBJECTIVES = {
    "flow": lambda: RectifiedFlow(0.0, 1.0, label_dropout=0.1),
    "ddpm": lambda: DDPM(label_dropout=0.1),
    "edm": lambda: EDM(-1.2, 1.2, 1.0, label_dropout=0.1),
}


def repa_projection_loss_reference(zs, zs_tilde):
    """sihyun-yu/REPA loss.py, SILoss's projection loss: for each encoder and image, its tokens and
    their projections normalised, minus their dot product averaged over the tokens, summed over the
    images and divided by encoders x batch size."""
    proj_loss = 0.0
    bsz = zs[0].shape[0]
    for z, z_tilde in zip(zs, zs_tilde, strict=True):
        for z_j, z_tilde_j in zip(z, z_tilde, strict=True):
            proj_loss += (-(F.normalize(z_j, dim=-1) * F.normalize(z_tilde_j, dim=-1)).sum(dim=-1)).mean()
    return proj_loss / (len(zs) * bsz)


def batch(embedding_dim: int = 0) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(1)
    latents, labels = torch.randn(6, 2, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    return (latents, labels, torch.randn(6, embedding_dim)) if embedding_dim else (latents, labels)


def test_alignment_matches_the_authors_formula_and_is_minus_one_when_aligned():
    torch.manual_seed(0)
    projected, target = torch.randn(8, 5), torch.randn(8, 5)
    ours = negative_cosine(projected, target).mean()
    reference = repa_projection_loss_reference([target[:, None]], [projected[:, None]])  # one token per image
    torch.testing.assert_close(ours, reference)
    torch.testing.assert_close(negative_cosine(3 * target, target), -torch.ones(8))  # the minimum: same direction
    torch.testing.assert_close(negative_cosine(-target, target), torch.ones(8))
    assert negative_cosine(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])).item() == 0


@pytest.mark.parametrize("backbone", list(TINY_NETS))
def test_the_hidden_features_are_the_chosen_blocks_output_pooled_and_the_output_is_unchanged(backbone):
    net = TINY_NETS[backbone]().eval()
    blocks = net.residual_blocks() if backbone == "unet" else list(net.blocks)
    latents, labels = batch()
    t = torch.rand(6)
    for depth, block in enumerate(blocks, 1):
        seen = []
        handle = block.register_forward_hook(lambda module, args, output, seen=seen: seen.append(output))
        output, hidden = net(latents, t, labels, hidden_depth=depth)
        handle.remove()
        pooled = seen[0].mean((2, 3)) if backbone == "unet" else seen[0].mean(1)
        assert torch.equal(hidden, pooled) and hidden.shape == (6, net.hidden_width(depth))
        assert torch.equal(output, net(latents, t, labels))


@pytest.mark.parametrize("formulation", list(OBJECTIVES))
@pytest.mark.parametrize("backbone", list(TINY_NETS))
def test_weight_zero_gives_plain_trainings_loss_and_gradients(backbone, formulation):
    plain = DenoiserTraining(TINY_NETS[backbone](), OBJECTIVES[formulation]())
    net = copy.deepcopy(plain.net)
    aligned = DenoiserTraining(net, OBJECTIVES[formulation](), RepaAlignment(net.hidden_width(1), 3, 16, depth=1, weight=0.0))
    losses = []
    for training, data in ((plain, batch()), (aligned, batch(embedding_dim=3))):
        torch.manual_seed(0)
        loss = training(data)["loss"]
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    for (name, ours), theirs in zip(aligned.net.named_parameters(), plain.net.parameters(), strict=True):
        assert torch.equal(ours.grad, theirs.grad), name
    assert build_denoiser_training(DiffusionParams(backbone=backbone), 2, 3, embedding_dim=3).alignment is None  # 0 is off


@pytest.mark.parametrize("backbone", list(TINY_NETS))
def test_the_loss_adds_the_weighted_alignment_and_training_aligns_the_projected_features(backbone):
    params = validate("diffusion", {"backbone": backbone, "repa": {"weight": 0.5, "depth": 1, "projector_dim": 32},
                                    "unet": {"channels": 8, "attention_heads": 2}, "dit": {"dim": 16, "depth": 2, "heads": 2}})
    torch.manual_seed(0)
    training = build_denoiser_training(params, latent_channels=2, num_classes=3, embedding_dim=5)
    data = batch(embedding_dim=5)
    torch.manual_seed(0)
    outputs = training(data)
    torch.testing.assert_close(outputs["loss"], outputs["diffusion"] + 0.5 * outputs["alignment"])
    optimizer = torch.optim.Adam(training.parameters(), lr=1e-2)
    for _ in range(60):
        torch.manual_seed(0)  # the same t and noise each step: the term's own minimum is reachable
        optimizer.zero_grad()
        training(data)["loss"].backward()
        optimizer.step()
    torch.manual_seed(0)
    assert training(data)["alignment"] < -0.95 < outputs["alignment"]  # -1: the projections along the targets
    with pytest.raises(ValueError, match="needs the SSL embeddings' width"):
        build_denoiser_training(params, latent_channels=2, num_classes=3)


@pytest.mark.parametrize("backbone", list(TINY_NETS))
def test_the_alignment_s_gradient_reaches_the_denoiser_and_the_projector_never_the_encoder_s_features(backbone):
    """The frozen encoder's features are the stage's data (its embeddings of the clean images), a
    target: the alignment term trains the projector and the denoiser's blocks up to its depth."""
    params = validate("diffusion", {"backbone": backbone, "repa": {"weight": 0.5, "depth": 1, "projector_dim": 32},
                                    "unet": {"channels": 8, "attention_heads": 2}, "dit": {"dim": 16, "depth": 2, "heads": 2}})
    training = build_denoiser_training(params, latent_channels=2, num_classes=3, embedding_dim=5)
    latents, labels, features = batch(embedding_dim=5)
    features.requires_grad_()
    torch.manual_seed(0)
    training((latents, labels, features))["alignment"].backward()
    assert features.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in training.alignment.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in training.net.parameters())


def test_the_projector_stays_out_of_the_exported_denoiser_which_samples_as_before(tmp_path):
    params = DiffusionParams(repa={"weight": 0.5}, unet={"channels": 8, "attention_heads": 2})
    training = build_denoiser_training(params, latent_channels=2, num_classes=3, embedding_dim=5)
    torch.manual_seed(0)
    training(batch(embedding_dim=5))["loss"].backward()
    assert all(p.grad is not None for p in training.alignment.parameters())
    denoiser = Denoiser.from_params(training.net.eval(), params, (2, 4, 4))
    export_denoiser(denoiser, tmp_path)
    loaded = load_denoiser(tmp_path)
    assert loaded.net.state_dict().keys() == training.net.state_dict().keys()
    assert not any("projector" in key for key in loaded.net.state_dict())
    labels = torch.tensor([0, 1, 2])
    assert torch.equal(loaded.sample(labels, steps=3, guidance=2.0, seed=7), denoiser.sample(labels, steps=3, guidance=2.0, seed=7))


def test_repa_depth_must_lie_within_the_backbone():
    assert validate("diffusion", {"repa": {"weight": 0.5, "depth": 8}}).repa.depth == 8  # the U-Net's 8 ResBlocks
    for backbone, depth in (("unet", 9), ("dit", 5)):
        with pytest.raises(ValueError, match=f"repa.depth must be at most the {backbone}'s"):
            validate("diffusion", {"backbone": backbone, "repa": {"weight": 0.5, "depth": depth}})
    assert validate("diffusion", {"repa": {"depth": 9}}).repa.weight == 0  # off: any depth


@pytest.mark.parametrize(("backbone", "shape"), [
    ("unet", {"channel_mults": [1], "blocks_per_level": 2}), ("unet", {"channel_mults": [1, 2, 2], "blocks_per_level": 1}),
    ("dit", {"depth": 3}),
])
def test_the_params_count_of_residual_blocks_is_the_built_nets(backbone, shape):
    """DiffusionParams counts the blocks REPA may tap without building the net (params import no
    torch): its limit is what the built net has."""
    params = validate("diffusion", {"backbone": backbone, backbone: shape})
    net = build_net(backbone, {"in_channels": 2, "num_classes": 3, **getattr(params, backbone).model_dump()})
    blocks = len(net.blocks) if backbone == "dit" else len(net.residual_blocks())
    assert validate("diffusion", {"backbone": backbone, backbone: shape, "repa": {"weight": 0.5, "depth": blocks}})
    with pytest.raises(ValueError, match=f"repa.depth must be at most the {backbone}'s {blocks} residual blocks"):
        validate("diffusion", {"backbone": backbone, backbone: shape, "repa": {"weight": 0.5, "depth": blocks + 1}})
