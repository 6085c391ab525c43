"""The SSL objectives beyond the contrastive and distillation ones (MAE, I-JEPA, jigsaw, CPC,
inpainting, the denoising autoencoder, colorization): each against the property that defines it
in its paper, their params checks, and each trained by the real loop and exported as a frozen
encoder."""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from models.augment import TwoViews
from models.backbones import build_backbone
from models.ssl import CPC, overlapping_patches
from models.ssl_losses import cpc_infonce
from models.ssl_masked import MAE, masked_patch_loss, patch_pixels, random_masking
from models.ssl_pretext import (
    Colorization,
    DenoisingAutoencoder,
    Inpainting,
    Jigsaw,
    ab_bins,
    cut_tiles,
    hamming_permutations,
    masked_region_loss,
    random_block_masks,
    shuffle_tiles,
)
from tasks.params import (
    AugmentParams,
    ColorizationParams,
    JigsawParams,
    MAEParams,
    ParamsError,
    ResNetParams,
    SslParams,
    ViTParams,
    validate,
)
from tests.defaults import defaults

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_vit(channels: int = 1):
    return build_backbone("vit", channels, 16, **defaults(ViTParams, patch_size=4, dim=32, depth=2, heads=2))


def tiny_resnet(channels: int = 1):
    return build_backbone("resnet", channels, 16, **defaults(ResNetParams, width=8, depth=(1, 1)))


def augment(channels: int = 1) -> TwoViews:
    return TwoViews(16, channels, **defaults(AugmentParams, crop_scale=(0.4, 1.0), flip=False, blur_prob=0.0))


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    """scikit-learn's 8x8 digits, upsampled to 16x16, in [-1, 1]."""
    images = torch.tensor(load_digits().images[:64], dtype=torch.float32)[:, None] / 16
    return F.interpolate(images, size=16, mode="bilinear") * 2 - 1


# -- MAE -----------------------------------------------------------------------------------


def test_mae_encoder_never_sees_the_masked_patches(digits):
    mae = MAE(tiny_vit(), augment(), **defaults(MAEParams, decoder_dim=16, decoder_depth=1, decoder_heads=2))
    seen = []
    mae.backbone.blocks.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    images = digits[:8]
    torch.manual_seed(0)
    first = mae.reconstruction_loss(images)["loss"]
    torch.manual_seed(0)  # the same mask again
    _, masked = random_masking(8, 16, 4, images.device)
    # new pixels in every masked patch only: fold puts patches back where unfold took them
    pixels = patch_pixels(images, 4)
    pixels = torch.where(masked[..., None], torch.randn_like(pixels), pixels)
    changed = F.fold(pixels.transpose(1, 2), (16, 16), 4, stride=4)
    assert not torch.equal(changed, images)
    torch.manual_seed(0)
    second = mae.reconstruction_loss(changed)["loss"]
    assert seen[0].shape == (8, 1 + 4, 32)  # the cls token and the 4 visible patches of 16
    torch.testing.assert_close(seen[1], seen[0])  # the encoder's input did not change
    assert second != first  # the targets did: the loss is on the masked patches


def test_mae_loss_counts_only_masked_patches():
    predicted, target = torch.randn(2, 6, 5), torch.randn(2, 6, 5)
    masked = torch.tensor([[1, 0, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    loss = masked_patch_loss(predicted, target, masked)
    expected = (predicted - target).pow(2).mean(-1)[masked].mean()
    torch.testing.assert_close(loss, expected)
    elsewhere = torch.where(masked[..., None], predicted, torch.randn_like(predicted))
    torch.testing.assert_close(masked_patch_loss(elsewhere, target, masked), loss)


def test_random_masking_hides_the_complement_of_the_kept_patches():
    keep_index, masked = random_masking(5, 16, 4, torch.device("cpu"))
    assert masked.sum(1).tolist() == [12] * 5
    assert not masked.gather(1, keep_index).any()
    assert len({tuple(row.sort().values.tolist()) for row in keep_index}) > 1  # per image


# -- jigsaw --------------------------------------------------------------------------------


def min_hamming_distance(permutations: torch.Tensor) -> int:
    distances = (permutations[:, None] != permutations[None]).sum(-1)
    return int(distances[~torch.eye(len(permutations), dtype=torch.bool)].min())


def test_jigsaw_permutations_are_far_apart():
    chosen = hamming_permutations(9, 100)
    assert chosen.shape == (100, 9) and len({tuple(p) for p in chosen.tolist()}) == 100
    assert all(sorted(p) == list(range(9)) for p in chosen.tolist())
    assert min_hamming_distance(chosen) == 6  # every pair differs in at least 6 of the 9 tiles
    generator = torch.Generator().manual_seed(0)
    random_sets = [torch.stack([torch.randperm(9, generator=generator) for _ in range(100)]) for _ in range(5)]
    assert max(min_hamming_distance(s) for s in random_sets) < 6
    # 4 tiles: the 4 permutations that move every tile (distance 4), not 4 of the 24 at random
    assert min_hamming_distance(hamming_permutations(4, 4)) == 4
    with pytest.raises(ValueError, match="only 24"):
        hamming_permutations(4, 25)


def test_jigsaw_target_is_the_index_of_the_permutation_applied():
    images = torch.arange(2 * 36, dtype=torch.float32).view(2, 1, 6, 6)
    tiles = cut_tiles(images, grid=3, tile_fraction=1.0)  # 2x2 tiles, no gap: nothing random
    assert tiles.shape == (2, 9, 1, 2, 2)
    permutations = hamming_permutations(9, 10)
    torch.manual_seed(0)
    shuffled, labels = shuffle_tiles(tiles, permutations)
    for image in range(2):
        order = permutations[labels[image]]
        torch.testing.assert_close(shuffled[image], tiles[image, order])
        restored = shuffled[image, order.argsort()]  # the inverse permutation solves the puzzle
        torch.testing.assert_close(restored, tiles[image])

    jigsaw = Jigsaw(tiny_resnet(), augment(), **defaults(JigsawParams, num_permutations=10, hidden_dim=16))
    assert torch.equal(jigsaw.permutations, permutations)
    assert jigsaw.head[-1].out_features == 10  # one class per permutation


# -- CPC -----------------------------------------------------------------------------------


def cpc_infonce_by_loops(predictions, candidates, positives) -> float:
    """InfoNCE written out prediction by prediction: -log(exp(p.z+) / sum over every z of exp(p.z))."""
    total = 0.0
    for prediction, positive in zip(predictions.double(), positives.tolist(), strict=True):
        scores = [float(prediction @ candidate) for candidate in candidates.double()]
        total += -(scores[positive] - math.log(sum(math.exp(score) for score in scores)))
    return total / len(predictions)


def test_cpc_infonce_matches_the_pair_by_pair_definition():
    generator = torch.Generator().manual_seed(0)
    predictions, candidates = torch.randn(7, 5, generator=generator), torch.randn(12, 5, generator=generator)
    positives = torch.randint(0, 12, (7,), generator=generator)
    expected = cpc_infonce_by_loops(predictions, candidates, positives)
    assert cpc_infonce(predictions, candidates, positives).item() == pytest.approx(expected, rel=1e-5)


def test_cpc_context_sees_only_the_rows_above_and_patches_overlap_by_half():
    cpc = CPC(tiny_resnet(), augment(), grid=4, context_dim=8, context_layers=3, prediction_steps=2)
    embeddings = torch.randn(2, tiny_resnet().out_dim, 4, 4)
    changed = embeddings.clone()
    changed[:, :, 2:] = torch.randn_like(changed[:, :, 2:])  # rows 2 and 3 only
    before, after = cpc.head(embeddings), cpc.head(changed)
    torch.testing.assert_close(after[:, :, :2], before[:, :, :2])
    assert not torch.allclose(after[:, :, 2:], before[:, :, 2:])

    image = torch.arange(100, dtype=torch.float32).view(1, 1, 10, 10)
    patches = overlapping_patches(image, grid=4)  # 4-pixel patches, 2 apart
    assert patches.shape == (1, 16, 1, 4, 4)
    torch.testing.assert_close(patches[0, 5, 0], image[0, 0, 2:6, 2:6])  # row 1, column 1


@pytest.mark.parametrize("side, grid", [(28, 7), (16, 5), (16, 6), (16, 8), (32, 8), (16, 3)])
def test_cpc_grid_is_grid_by_grid_patches_for_any_image_size(side, grid):
    patches = overlapping_patches(torch.randn(2, 1, side, side), grid)
    patch = 2 * side // (grid + 1)
    assert patches.shape == (2, grid * grid, 1, patch, patch)


# -- inpainting ----------------------------------------------------------------------------


def test_inpainting_loss_is_only_on_the_hidden_block(digits):
    inpainting = Inpainting(tiny_resnet(), augment(), block_fraction=0.5, decoder_dim=8)
    reconstructions = []

    def keep_grad(module, inputs, output):
        output.retain_grad()
        reconstructions.append(output)

    inpainting.head.register_forward_hook(keep_grad)
    torch.manual_seed(0)
    inpainting.inpainting_loss(digits[:4])["loss"].backward()
    hidden = reconstructions[0].grad.abs().sum(dim=1) > 0  # the pixels the loss reaches
    assert hidden.sum(dim=(1, 2)).tolist() == [64] * 4  # one 8x8 block of the 16x16 image each
    rows, cols = hidden.any(dim=2), hidden.any(dim=1)
    assert (rows.sum(1) == 8).all() and (cols.sum(1) == 8).all()  # a square, nothing outside it

    images, masks = torch.randn(2, 3, 6, 6), torch.zeros(2, 1, 6, 6)
    masks[:, :, 1:3, 2:5] = 1
    guess = torch.randn(2, 3, 6, 6)
    loss = masked_region_loss(guess, images, masks)
    torch.testing.assert_close(loss, (guess - images)[:, :, 1:3, 2:5].pow(2).mean())
    anything_outside = torch.where(masks.bool(), guess, torch.randn_like(guess))
    torch.testing.assert_close(masked_region_loss(anything_outside, images, masks), loss)


def test_inpainting_encoder_never_sees_the_hidden_block(digits):
    inpainting = Inpainting(tiny_resnet(), augment(), block_fraction=0.5, decoder_dim=8)
    seen = []
    inpainting.backbone.stem.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    torch.manual_seed(0)
    inpainting.inpainting_loss(digits[:4])
    torch.manual_seed(0)  # the same block again
    hidden = random_block_masks(4, 16, 8, torch.device("cpu")).bool()
    changed = torch.where(hidden, torch.rand_like(digits[:4]), digits[:4])
    torch.manual_seed(0)
    inpainting.inpainting_loss(changed)
    torch.testing.assert_close(seen[1], seen[0])
    assert (seen[0][hidden.expand_as(seen[0])] == 0).all()


# -- denoising autoencoder -----------------------------------------------------------------


class Outputs(nn.Module):
    """A decoder that ignores the features and outputs a fixed image."""

    def __init__(self, image: torch.Tensor):
        super().__init__()
        self.image = image

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.image


@pytest.mark.parametrize("corruption", ["gaussian", "masking"])
def test_dae_target_is_the_clean_image_which_the_backbone_never_sees(corruption):
    dae = DenoisingAutoencoder(tiny_resnet(), augment(), corruption=corruption, sigma=0.5, mask_fraction=0.25, decoder_dim=8)
    clean = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1  # no pixel exactly 0
    seen = []
    dae.backbone.stem.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    torch.manual_seed(0)
    loss = dae.denoising_loss(clean)["loss"]
    noisy = seen[0]
    torch.manual_seed(0)
    torch.testing.assert_close(dae.corrupt(clean), noisy)  # the one corruption, drawn from the seed
    if corruption == "gaussian":
        assert (noisy - clean).std().item() == pytest.approx(0.5, rel=0.05)
    else:  # exactly a quarter of each image's pixels set to 0, the rest untouched
        hidden = noisy != clean
        assert hidden.sum(dim=(1, 2, 3)).tolist() == [64] * 8 and (noisy[hidden] == 0).all()
    # the loss, by hand: the decoder's output from the noisy image's features, against the clean image
    torch.testing.assert_close(loss, F.mse_loss(dae.head(dae.backbone.feature_map(noisy)), clean))
    dae.head = Outputs(clean)  # a decoder that returns the clean image: nothing left to learn
    torch.manual_seed(0)
    assert dae.denoising_loss(clean)["loss"].item() == 0
    dae.head = Outputs(noisy)  # one that returns what the backbone saw: pays for the noise
    torch.manual_seed(0)
    torch.testing.assert_close(dae.denoising_loss(clean)["loss"], (noisy - clean).pow(2).mean())
    assert (noisy - clean).pow(2).mean() > 0.05


# -- colorization --------------------------------------------------------------------------


def test_colorization_is_refused_on_grayscale_sources_by_name():
    from tasks.ssl import check_fits_the_data

    params = SslParams.model_validate({"objective": "colorization"})
    for source, channels in (("mnist", 1), ("digits", 1), ("fashion_mnist", 1), ("mnist", 3), ("folder", 1)):
        with pytest.raises(ParamsError, match=rf"colorization .*prepare.source: {source}, {channels} channel.*no colour .*cifar10"):
            check_fits_the_data(params, source, channels)
    check_fits_the_data(params, "cifar10", 3)
    check_fits_the_data(params, "folder", 3)
    check_fits_the_data(SslParams.model_validate({"objective": "simclr"}), "mnist", 1)


def test_colorization_targets_are_ab_bins_weighted_towards_rare_colours():
    grey_red_blue = torch.tensor([[[[0.0, 60.0, -60.0]], [[0.0, 50.0, -100.0]]]])  # (1, 2, 1, 3) a, b
    assert ab_bins(grey_red_blue, 10.0).tolist() == [[[11 * 22 + 11, 17 * 22 + 16, 5 * 22 + 1]]]
    colorization = Colorization(tiny_resnet(channels=3), augment(channels=3), **defaults(ColorizationParams, decoder_dim=8))
    colorization.bin_frequency.zero_()
    colorization.bin_frequency[[0, 1]] = torch.tensor([0.9, 0.1])
    weights = colorization.class_weights()
    assert weights[1] > weights[0]  # the rare colour weighs more
    assert (colorization.bin_frequency * weights).sum().item() == pytest.approx(1.0)  # E_p[w] = 1


# -- params --------------------------------------------------------------------------------


@pytest.mark.parametrize("objective", ["mae", "ijepa"])
def test_patch_token_objectives_refuse_the_resnet_by_key(objective):
    with pytest.raises(ParamsError, match=rf"objective: {objective} needs backbone: vit, not resnet .*patch tokens"):
        validate("ssl", {"objective": objective, "backbone": "resnet"})
    assert isinstance(validate("ssl", {"objective": objective, "backbone": "vit"}), SslParams)


# -- trained by the one loop, resumed after a kill, exported -------------------------------

TINY = {  # each new objective at a size that trains in a second
    "mae": {"backbone": "vit", "mae": {"decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 2}},
    "ijepa": {"backbone": "vit", "ijepa": {"predictor_dim": 16, "predictor_depth": 1, "predictor_heads": 2}},
    "jigsaw": {"jigsaw": {"num_permutations": 10, "hidden_dim": 16}},
    "cpc": {"cpc": {"context_dim": 16, "context_layers": 1}},
    "inpainting": {"inpainting": {"decoder_dim": 8}},
    "dae": {"dae": {"decoder_dim": 8}},
    "colorization": {"colorization": {"decoder_dim": 8, "bin_size": 20.0}},
}


@pytest.mark.parametrize("name, colour", [("simclr", True), ("mae", False), ("ijepa", False), ("inpainting", False), ("dae", False), ("colorization", False)])
def test_pixel_and_colour_targets_train_on_crops_and_flips_only(name, colour):
    """Colour jitter and grayscale would change what MAE, I-JEPA, inpainting, the DAE and
    colorization predict (the pixels, the colours): their papers augment by cropping and flipping only."""
    import kornia.augmentation as K

    from tasks.ssl import build_ssl

    params = SslParams.model_validate({"objective": name, "backbone": "resnet" if name in ("simclr", "inpainting", "dae", "colorization") else "vit",
                                       "vit": {"dim": 16, "depth": 1, "heads": 2}, **TINY.get(name, {})})
    steps = build_ssl(params, 3, 16).augment.pipeline
    assert any(isinstance(step, (K.ColorJitter, K.RandomGrayscale)) for step in steps) == colour


class Killed(Exception):
    pass


def ssl_trainer(name: str, checkpoint, channels: int):
    from tasks.ssl import build_ssl
    from tasks.training import Trainer

    params = SslParams.model_validate({
        "objective": name, "resnet": {"width": 8, "depth": [1, 1]}, "vit": {"dim": 16, "depth": 1, "heads": 2},
        "train": {"epochs": 4, "batch_size": 16, "checkpoint_every": 2, "log_every": 2}, **TINY[name],
    })
    torch.manual_seed(0)
    objective = build_ssl(params, channels, 16)
    return Trainer(objective, params.train, steps_per_epoch=1, seed=0, checkpoint=checkpoint, fingerprint=name,
                   device=torch.device("cpu")), params


@pytest.mark.parametrize("name", sorted(TINY))
def test_the_loop_trains_resumes_and_exports_each_objective(name, digits, tmp_path):
    """4 steps of the real Trainer; a run killed after its step-2 checkpoint resumes to the same
    weights; then the ssl stage's files -> the encoder stage's export -> the frozen encoder."""
    import json

    from tasks.data import ImageSplit
    from tasks.encoder import backbone_from_ssl, embed, export_encoder, load_encoder

    channels = 3 if name == "colorization" else 1
    images = digits[:32].expand(-1, channels, -1, -1)
    batches = lambda step: images[(step % 2) * 16 : (step % 2) * 16 + 16]  # noqa: E731
    whole, params = ssl_trainer(name, None, channels)
    uninterrupted = whole.fit(batches).module.state_dict()

    killed, _ = ssl_trainer(name, tmp_path / "state.pt", channels)

    def dies_at_step_3(step):
        if step == 3:
            raise Killed
        return batches(step)

    with pytest.raises(Killed):
        killed.fit(dies_at_step_3)
    resumed, _ = ssl_trainer(name, tmp_path / "state.pt", channels)
    assert resumed.start_step == 2
    result = resumed.fit(batches)
    for key, tensor in uninterrupted.items():
        torch.testing.assert_close(result.module.state_dict()[key], tensor, msg=key)

    ssl_folder, encoder_folder = tmp_path / "ssl", tmp_path / "encoder"
    ssl_folder.mkdir()
    torch.save(result.module.state_dict(), ssl_folder / "objective.pt")
    (ssl_folder / "config.json").write_text(json.dumps({"objective": name, "backbone": result.module.backbone.config}))
    backbone, config = backbone_from_ssl(ssl_folder)
    export_encoder(backbone, config, encoder_folder)
    split = ImageSplit(((images + 1) * 127.5).round().to(torch.uint8), torch.zeros(32, dtype=torch.long))
    expected = embed(result.module.backbone.eval(), split)
    torch.testing.assert_close(embed(load_encoder(encoder_folder), split), expected)
    assert expected.std(0).max() > 0


def test_a_network_that_does_not_fit_the_prepared_images_is_a_params_error():
    from tasks.ssl import build_ssl

    params = SslParams.model_validate({"objective": "ijepa", "backbone": "vit"})
    with pytest.raises(ParamsError, match=r"params/ssl.yaml: ijepa.num_targets 4 leaves no context in a 2x2 patch grid"):
        build_ssl(params, 1, 8)


@pytest.mark.slow
def test_colorization_trains_on_a_colour_folder_source_through_dvc_repro(repo_copy):
    """Three classes of 8x8 RGB images, each a hue with noise, in data/raw/folder/<class>/."""
    import json

    import numpy as np
    from PIL import Image

    from tests.conftest import run

    rng = np.random.default_rng(0)
    for name, hue in (("red", (220, 40, 40)), ("green", (40, 200, 60)), ("blue", (50, 60, 230))):
        folder = repo_copy / "data" / "raw" / "folder" / name
        folder.mkdir(parents=True)
        for index in range(40):
            pixels = np.clip(np.array(hue) * rng.uniform(0.4, 1.0, (8, 8, 1)) + rng.normal(0, 12, (8, 8, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{index}.png")
    overrides = ["prepare.source=folder", "prepare.limit_per_class=null", "ssl.objective=colorization",
                 "ssl.train.epochs=3", "ssl.knn_every_epochs=0"]
    run([sys.executable, "-m", "flows", "profile", "smoke", *(a for o in overrides for a in ("--set", o))], repo_copy)
    run(["dvc", "repro", "ssl"], repo_copy)
    metrics = json.loads((repo_copy / "metrics" / "ssl.json").read_text())
    assert metrics["steps"] > 0 and 0 <= metrics["knn_top1"] <= 1
