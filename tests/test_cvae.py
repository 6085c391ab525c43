"""The conditional VAE (`vae.conditional: true`): its ELBO terms by hand, an encoder and a decoder
that read the label, its rebuild from files, prior samples that show the class asked for, its
prior grid, and its point on the FID chart. Its `dvc repro` through fid is in
test_vae_regularisers.py, beside the other regularisers'."""

from __future__ import annotations

import json
import math

import pytest
import torch
from sklearn.linear_model import LogisticRegression

from flows.fid import nfe_points
from flows.vae import prior_grid
from models.vae import VAE, KLRegulariser, VAEConfig
from tasks.artifacts import freeze
from tasks.params import ParamsError, VaeParams, validate
from tasks.vae import build_vae_training, decode, encode_means, export_vae, load_vae
from tests.defaults import vae_training
from tests.test_vae_regularisers import digits_16x16, train

pytestmark = pytest.mark.usefixtures("one_thread")


def cvae(num_classes: int = 3, **config) -> VAE:
    torch.manual_seed(0)
    return VAE(VAEConfig(**{"image_channels": 1, "latent_channels": 2, "downsample": 2, "width": 8, "codebook_size": 0,
                            "num_classes": num_classes, **config}))


def test_the_kl_term_is_the_closed_form_of_a_diagonal_gaussian_to_the_prior_per_image_element():
    # q = N((0.5, -1), diag(1, 4)): KL = 0.5 (0.25 + 1 - 1 - 0) + 0.5 (1 + 4 - 1 - log 4) = 0.125 + 2 - log 2
    mean = torch.tensor([0.5, -1.0]).view(1, 2, 1, 1)
    logvar = torch.tensor([0.0, math.log(4.0)]).view(1, 2, 1, 1)
    _, penalty, outputs = KLRegulariser(beta=0.1)(cvae(), mean, logvar, image_elements=64)
    kl = 0.125 + 2 - math.log(2)
    assert outputs["kl"].item() == pytest.approx(kl, rel=1e-6)
    assert penalty.item() == pytest.approx(0.1 * kl / 64, rel=1e-6)  # beta * KL per image element


def test_the_loss_is_the_reconstruction_error_plus_beta_kl_of_the_label_conditioned_posterior():
    vae = cvae()
    training = vae_training(vae, regulariser=KLRegulariser(beta=0.5), perceptual_weight=0.0)
    images, labels = torch.rand(4, 1, 8, 8) * 2 - 1, torch.tensor([0, 1, 2, 1])
    torch.manual_seed(1)
    outputs = training((images, labels))

    mean, logvar = vae.encode(images, labels)
    torch.manual_seed(1)  # the same posterior draw
    latents = mean + (0.5 * logvar).exp() * torch.randn_like(mean)
    recon = (vae.decode(latents, labels) - images).abs().mean()  # L1 per element
    kl = (0.5 * (mean.square() + logvar.exp() - 1 - logvar)).sum((1, 2, 3)).mean()
    torch.testing.assert_close(outputs["recon"], recon)
    torch.testing.assert_close(outputs["kl"], kl)
    torch.testing.assert_close(outputs["loss"], recon + 0.5 * kl / 64)


def test_the_decoder_and_the_posterior_depend_on_the_label_and_an_unconditional_vae_ignores_it():
    vae, images, latents = cvae().eval(), torch.rand(1, 1, 8, 8) * 2 - 1, torch.randn(1, 2, 4, 4)
    with torch.no_grad():
        decoded = [vae.decode(latents, torch.tensor([label])) for label in range(3)]
        posteriors = [torch.cat(vae.encode(images, torch.tensor([label]))) for label in range(3)]
    for outputs in (decoded, posteriors):
        assert all((outputs[a] - outputs[b]).abs().max() > 1e-4 for a, b in [(0, 1), (0, 2), (1, 2)])
    with pytest.raises(ValueError, match="with the labels"):
        vae.decode(latents)
    plain = cvae(num_classes=0).eval()
    with torch.no_grad():
        assert torch.equal(plain.decode(latents, torch.tensor([2])), plain.decode(latents))


def test_a_conditional_vae_rebuilds_with_identical_outputs(tmp_path):
    vae = cvae(num_classes=10).eval()
    export_vae(vae, tmp_path)
    assert json.loads((tmp_path / "vae.json").read_text())["num_classes"] == 10
    loaded = load_vae(tmp_path)
    freeze(vae)  # the same channels-last layout: convolutions sum in the same order
    images, labels, latents = torch.rand(6, 1, 8, 8) * 2 - 1, torch.tensor([0, 9, 3, 3, 5, 1]), torch.randn(6, 2, 4, 4)
    assert torch.equal(encode_means(loaded, images, labels), encode_means(vae, images, labels))
    assert torch.equal(decode(loaded, latents, labels), decode(vae, latents, labels))


def test_the_conditional_param_builds_a_cvae_for_kl_and_mmd_and_refuses_vq():
    for regulariser in ("kl", "mmd"):
        params = validate("vae", {"conditional": True, "regulariser": regulariser, "perceptual_weight": 0.0})
        assert build_vae_training(params, [1, 16, 16], 10, steps=10, feature_fn=None).vae.config.num_classes == 10
    assert build_vae_training(VaeParams(perceptual_weight=0.0), [1, 16, 16], 10, 10, None).vae.config.num_classes == 0
    with pytest.raises(ParamsError, match="conditional: true needs regulariser kl or mmd"):
        validate("vae", {"conditional": True, "regulariser": "vq"})


def test_prior_samples_of_a_cvae_trained_on_the_smoke_digits_show_the_requested_digit():
    """beta 1 per image element: the KL pushes the class out of the latent, so the decoder must read
    it from the label (at the default 1e-4 the latent keeps it, and the label barely matters)."""
    images, labels = digits_16x16()
    judge = LogisticRegression(max_iter=1000).fit(images.flatten(1).numpy(), labels.numpy())
    vae = cvae(num_classes=10, latent_channels=4, downsample=4)
    train(vae_training(vae, regulariser=KLRegulariser(beta=1.0), perceptual_weight=0.0), 150)
    torch.manual_seed(1)
    requested = torch.arange(200) % 10
    samples = decode(vae.eval(), torch.randn(200, 4, 4, 4), requested)
    accuracy = (torch.from_numpy(judge.predict(samples.flatten(1).numpy())) == requested).float().mean().item()
    assert accuracy > 0.5, accuracy  # chance: 0.1


def test_the_prior_grid_has_a_row_per_class_and_the_cvae_a_lone_point_on_the_fid_chart():
    cell = 48 + 1  # 8-pixel images upscaled to the grid's 48-pixel cells, 1-pixel padding
    vae = cvae(num_classes=3).eval()
    assert prior_grid(vae, 7, torch.Size([2, 4, 4]), seed=0).shape == (3 * cell + 1, 2 * cell + 1, 1)
    with torch.no_grad():
        vae.decoder[0].weight[:, 2:] = 0  # a decoder blind to the label: each column's draw decodes alike in every row
    image = prior_grid(vae, 7, torch.Size([2, 4, 4]), seed=0)
    grid_rows = [image[row * cell : (row + 1) * cell] for row in range(3)]
    assert (grid_rows[0] == grid_rows[1]).all() and (grid_rows[0] == grid_rows[2]).all()
    assert not (grid_rows[0][:, :cell] == grid_rows[0][:, cell : 2 * cell]).all()  # two columns, two draws
    rows = {"floor_train_vs_test": {"fid": 0.1}, "cvae_prior": {"fid": 3.0, "nfe": 1, "images_per_s": 900.0},
            "gan": {"fid": 0.5, "nfe": 1, "images_per_s": 800.0}, "teacher.steps_4": {"fid": 0.4, "nfe": 4, "images_per_s": 90.0}}
    points = nfe_points(rows, "euler")
    assert [p for p in points if p["generator"] == "cvae_prior"] == [{"generator": "cvae_prior", "nfe": 1, "fid": 3.0, "images_per_s": 900.0}]
    assert "decoded prior" not in {p["generator"] for p in points}  # the conditional VAE's prior is the cvae's point
