"""The VAE's bottleneck regularisers: VQ-VAE's straight-through codebook with its EMA updates and
restarts, InfoVAE's MMD, and the prior-mismatch report every regulariser gets."""

import csv
import json
import sys
from pathlib import Path

import pytest
import torch
from sklearn.datasets import load_digits
from torch.nn import functional as F

from models.vae import (
    VAE,
    KLRegulariser,
    MMDRegulariser,
    VAEConfig,
    VAETraining,
    VectorQuantisation,
    VectorQuantizer,
    code_frequencies,
    imq_kernel,
    mmd,
    perplexity,
    prior_mismatch,
)
from tasks.data import ImageSplit
from tasks.params import ParamsError, VQParams, validate
from tasks.vae import (
    LatentScale,
    build_vae_training,
    export_vae,
    load_vae,
    mismatch_report,
    reconstruction_report,
)
from tests.conftest import run
from tests.defaults import vae_training


def vq_regulariser(quantizer: VectorQuantizer, **overrides) -> VectorQuantisation:
    """VQ-VAE's bottleneck with the params' defaults but `overrides`."""
    vq = VQParams()
    fields = {"commitment": vq.commitment, "decay": vq.decay, "restart_after": vq.restart_after_steps, **overrides}
    return VectorQuantisation(quantizer, **fields)


def quantizer_with(codebook: list[list[float]]) -> VectorQuantizer:
    quantizer = VectorQuantizer(len(codebook), len(codebook[0]))
    quantizer.codebook.copy_(torch.tensor(codebook))
    return quantizer


def test_the_encoder_gets_the_gradient_at_the_quantised_output():
    torch.manual_seed(0)
    vae = VAE(VAEConfig(image_channels=1, latent_channels=4, downsample=2, width=8, codebook_size=16))
    regulariser = vq_regulariser(vae.quantizer, commitment=0.0).eval()
    mean = torch.randn(3, 4, 4, 4, requires_grad=True)
    latents, _, _ = regulariser(vae, mean, torch.zeros_like(mean), 64)
    latents.retain_grad()
    vae.decoder(latents).square().sum().backward()

    codes = vae.quantizer.codes(mean)
    torch.testing.assert_close(latents, vae.quantizer.codebook[codes].movedim(-1, 1))  # the value is the code
    assert latents.grad.abs().max() > 0
    torch.testing.assert_close(mean.grad, latents.grad)  # the gradient passes straight through
    # decode snaps to the same codes, so the pre-quantisation latents decode as their codes do
    torch.testing.assert_close(vae.decode(mean), vae.decoder(latents))


def test_commitment_pulls_the_encoder_output_to_its_code():
    quantizer = quantizer_with([[0.0, 0.0], [0.0, 4.0]])
    vae = VAE(VAEConfig(image_channels=1, latent_channels=2, downsample=1, width=8, codebook_size=0))
    vae.quantizer = quantizer
    mean = torch.tensor([[1.0, 0.0], [0.0, 5.0]]).view(2, 2, 1, 1).requires_grad_()
    _, penalty, outputs = vq_regulariser(quantizer, commitment=0.25).eval()(vae, mean, torch.zeros_like(mean), 1)
    torch.testing.assert_close(outputs["commitment"], torch.tensor(0.5))  # (1 + 1) / 4 elements
    penalty.backward()
    # d/dz of 0.25 * mean (z - code)^2 over 4 elements = 0.125 * (z - code)
    torch.testing.assert_close(mean.grad.flatten(), torch.tensor([0.125, 0.0, 0.0, 0.125]))


def test_ema_update_follows_the_formula_on_a_hand_example():
    quantizer = quantizer_with([[0.0, 0.0], [0.0, 4.0]])
    regulariser = vq_regulariser(quantizer, decay=0.5)  # each code starts with N = 1, m = itself
    vectors = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 5.0]])
    codes = quantizer.nearest(vectors)
    assert codes.tolist() == [0, 0, 1]
    regulariser.update(quantizer.codebook, vectors, codes)
    # N_0 = 0.5 * 1 + 0.5 * 2 = 1.5, m_0 = 0.5 * (0, 0) + 0.5 * (4, 0) = (2, 0), e_0 = (4/3, 0)
    # N_1 = 0.5 * 1 + 0.5 * 1 = 1.0, m_1 = 0.5 * (0, 4) + 0.5 * (0, 5) = (0, 4.5), e_1 = (0, 4.5)
    torch.testing.assert_close(regulariser.cluster_size, torch.tensor([1.5, 1.0]))
    torch.testing.assert_close(quantizer.codebook, torch.tensor([[4 / 3, 0.0], [0.0, 4.5]]))


def test_only_training_calls_move_the_codebook():
    torch.manual_seed(0)
    vae = VAE(VAEConfig(image_channels=1, latent_channels=4, downsample=2, width=8, codebook_size=8))
    regulariser = vq_regulariser(vae.quantizer)
    mean = torch.randn(2, 4, 4, 4)
    before = vae.quantizer.codebook.clone()
    regulariser.eval()(vae, mean, mean, 64)
    torch.testing.assert_close(vae.quantizer.codebook, before)
    regulariser.train()(vae, mean, mean, 64)
    assert not torch.equal(vae.quantizer.codebook, before)


def test_a_code_unused_for_restart_after_steps_restarts_at_a_batch_vector():
    quantizer = quantizer_with([[0.0, 0.0], [1.0, 1.0], [100.0, 100.0]])
    regulariser = vq_regulariser(quantizer, restart_after=2)
    vectors = torch.tensor([[0.1, 0.0], [0.9, 1.0], [1.1, 0.9]])
    regulariser.update(quantizer.codebook, vectors, quantizer.nearest(vectors))
    assert quantizer.codebook[2].tolist() == [100.0, 100.0]  # unused once: kept
    assert regulariser.unused_steps.tolist() == [0, 0, 1]
    regulariser.update(quantizer.codebook, vectors, quantizer.nearest(vectors))
    restarted = quantizer.codebook[2]
    assert any(torch.equal(restarted, vector) for vector in vectors), restarted
    assert regulariser.unused_steps.tolist() == [0, 0, 0]
    assert regulariser.cluster_size[2] == 1.0
    torch.testing.assert_close(regulariser.code_sum[2], restarted)


def test_perplexity_counts_equally_used_codes():
    uniform = code_frequencies(torch.arange(8).repeat(5), 8)
    torch.testing.assert_close(perplexity(uniform), torch.tensor(8.0))
    torch.testing.assert_close(perplexity(code_frequencies(torch.zeros(10, dtype=torch.long), 8)), torch.tensor(1.0))
    two_of_four = code_frequencies(torch.tensor([0, 3, 0, 3]), 4)
    torch.testing.assert_close(perplexity(two_of_four), torch.tensor(2.0))


def test_mmd_is_near_zero_within_a_distribution_and_grows_with_a_shift():
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(500, 8, generator=generator), torch.randn(500, 8, generator=generator)
    same, shifted = mmd(x, y), mmd(x, y + 1.0)
    assert abs(same) < 0.005, same
    assert shifted > 0.05, shifted
    assert mmd(x, y + 2.0) > shifted


def test_mmd_matches_a_pair_by_pair_reference():
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 3, generator=generator), torch.randn(5, 3, generator=generator)

    def kernel(a, b):
        scale = 2.0 * 3
        return scale / (scale + ((a - b) ** 2).sum().item())

    n, m = len(x), len(y)
    within_x = sum(kernel(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    within_y = sum(kernel(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    across = sum(kernel(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    assert mmd(x, y).item() == pytest.approx(within_x + within_y - 2 * across, rel=1e-4)
    assert imq_kernel(x, x).diagonal().tolist() == pytest.approx([1.0] * n)


def test_prior_mismatch_tells_prior_samples_from_shifted_and_scaled_ones():
    generator = torch.Generator().manual_seed(2)
    prior_like = torch.randn(1000, 4, 2, 2, generator=generator)
    matched = prior_mismatch(prior_like, torch.Generator().manual_seed(3))
    off = prior_mismatch(2 * prior_like + 0.5, torch.Generator().manual_seed(3))
    assert abs(matched["prior_mmd"]) < 0.005 and matched["prior_mean_norm"] < 0.3 and matched["prior_cov_error"] < 0.05
    assert off["prior_mmd"] > 0.05
    assert off["prior_mean_norm"] == pytest.approx(0.5 * 4, rel=0.1)  # 0.5 in each of 16 dimensions
    assert off["prior_cov_error"] > 0.15  # the diagonal is 4, not 1


def digits_16x16() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits (the smoke profile's data) at 16x16 in [-1, 1], and their labels."""
    digits = load_digits()
    images = torch.from_numpy(digits.images).float().unsqueeze(1) / 16 * 2 - 1
    return F.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False), torch.from_numpy(digits.target).long()


def train(training: VAETraining, steps: int) -> list[dict[str, float]]:
    images, labels = digits_16x16()
    optimizer = torch.optim.Adam([p for p in training.parameters() if p.requires_grad], lr=3e-3)
    logged = []
    for step in range(steps):
        rows = torch.randint(0, len(images), (32,))
        outputs = training((images[rows], labels[rows]))
        optimizer.zero_grad()
        outputs["loss"].backward()
        optimizer.step()
        training.after_step(step, steps)
        logged.append({k: v.item() for k, v in outputs.items()})
    return logged


def mean_of(logged: list[dict[str, float]], key: str) -> float:
    return sum(entry[key] for entry in logged) / len(logged)


def test_vq_vae_learns_to_reconstruct_and_restarts_spread_it_over_its_codebook():
    def trained(restart_after: int) -> list[dict[str, float]]:
        torch.manual_seed(0)
        vae = VAE(VAEConfig(image_channels=1, latent_channels=4, downsample=4, width=8, codebook_size=32))
        return train(vae_training(vae, regulariser=vq_regulariser(vae.quantizer, restart_after=restart_after)), 120)

    restarted, never_restarted = trained(10), trained(10**9)
    assert mean_of(restarted[-20:], "recon") < 0.6 * mean_of(restarted[:10], "recon")
    # seen: perplexity 27.4 of 32 codes with restarts, 17.8 without
    assert mean_of(restarted[-20:], "perplexity") > 1.2 * mean_of(never_restarted[-20:], "perplexity")


def test_mmd_regulariser_pulls_the_aggregate_posterior_to_the_prior():
    torch.manual_seed(0)
    vae = VAE(VAEConfig(image_channels=1, latent_channels=4, downsample=4, width=8, codebook_size=0))
    logged = train(vae_training(vae, regulariser=MMDRegulariser(weight=1000.0, kl_weight=0.0)), 120)
    assert mean_of(logged[-20:], "recon") < 0.6 * mean_of(logged[:10], "recon")
    assert mean_of(logged[-20:], "mmd") < 0.5 * mean_of(logged[:10], "mmd")


@pytest.mark.parametrize(("regulariser", "kind"), [("kl", KLRegulariser), ("mmd", MMDRegulariser), ("vq", VectorQuantisation)])
def test_the_regulariser_param_picks_the_bottleneck(regulariser, kind):
    params = validate("vae", {"regulariser": regulariser, "vq": {"codebook_size": 64}, "perceptual_weight": 0.0})
    training = build_vae_training(params, [1, 16, 16], num_classes=10, steps=10, feature_fn=None)
    assert type(training.regulariser) is kind
    assert (training.vae.quantizer is not None) == (regulariser == "vq")
    if regulariser == "vq":
        assert training.vae.quantizer.codebook.shape == (64, params.latent_channels)


def test_a_vq_vae_rebuilds_with_its_codebook(tmp_path):
    torch.manual_seed(0)
    vae = VAE(VAEConfig(image_channels=1, latent_channels=3, downsample=2, width=8, codebook_size=10)).eval()
    export_vae(vae, tmp_path)
    loaded = load_vae(tmp_path)
    assert torch.equal(loaded.quantizer.codebook, vae.quantizer.codebook)
    latents = torch.randn(4, 3, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(loaded.decode(latents), vae.eval().decode(latents))


def test_the_stage_reports_codebook_use_for_vq_and_the_prior_mismatch_for_all():
    torch.manual_seed(0)
    test = ImageSplit(torch.randint(0, 256, (30, 1, 8, 8), dtype=torch.uint8), torch.zeros(30, dtype=torch.long))
    for codebook_size in (0, 16):
        vae = VAE(VAEConfig(image_channels=1, latent_channels=4, downsample=2, width=8, codebook_size=codebook_size)).eval()
        report = reconstruction_report(vae, test, test.floats().mean(0))
        assert ("codebook_usage" in report) == bool(codebook_size)
        if codebook_size:
            assert 0 < report["codebook_usage"] <= 1 and 1 <= report["perplexity"] <= report["codebook_usage"] * 16
        mismatch = mismatch_report(vae, test, LatentScale(torch.zeros(4), torch.ones(4)), samples=20, seed=0)
        assert set(mismatch) == {"prior_mmd", "prior_mean_norm", "prior_cov_error"}
        assert mismatch == mismatch_report(vae, test, LatentScale(torch.zeros(4), torch.ones(4)), samples=20, seed=0)


def test_vq_refuses_several_processes():
    with pytest.raises(ParamsError, match="regulariser: vq needs train.processes: 1"):
        validate("vae", {"regulariser": "vq", "train": {"processes": 2}})
    with pytest.raises(ParamsError, match="regulariser"):
        validate("vae", {"regulariser": "vqgan"})


@pytest.mark.slow
def test_each_regulariser_runs_through_dvc_and_diffusion_and_the_ar_prior_train_on_vq_latents(reproduced: Path):
    """`dvc repro fid` with a VQ-VAE, then `dvc exp run -S` of the vae stage with MMD: both
    report the prior mismatch, the VQ-VAE its codebook use; the diffusion stage samples through
    the VQ decoder, and the ar stage (a skip on the smoke run's KL latent) trains a prior over the
    codes that beats the unigram baseline and gets its row on the FID-vs-NFE chart at NFE = codes.
    (The conditional InfoVAE runs through fid in tests/test_edm.py's run.)"""
    assert json.loads((reproduced / "metrics/ar.json").read_text())["skipped"] == 1
    assert json.loads((reproduced / "artifacts/ar/skipped.json").read_text())["reason"].startswith("vae.regulariser is not vq")
    run([sys.executable, "-m", "flows", "profile", "smoke", "--set", "vae.regulariser=vq", "--set", "vae.vq.codebook_size=64"], reproduced)
    run(["dvc", "repro", "fid"], reproduced)
    vq = json.loads((reproduced / "metrics/vae.json").read_text())
    assert 0 < vq["codebook_usage"] <= 1 and 1 <= vq["perplexity"] <= 64, vq
    assert {"prior_mmd", "prior_mean_norm", "prior_cov_error"} <= vq.keys()
    assert json.loads((reproduced / "artifacts/vae/vae.json").read_text())["codebook_size"] == 64
    assert (reproduced / "metrics/diffusion.json").exists() and (reproduced / "plots/diffusion/samples.png").exists()
    ar = json.loads((reproduced / "metrics/ar.json").read_text())
    assert ar["skipped"] == 0 and ar["steps"] > 0 and ar["sampling_images_per_s"] > 0, ar
    assert ar["bits_per_token"] < ar["unigram_bits_per_token"] < ar["uniform_bits_per_token"] == pytest.approx(6.0), ar
    fid = json.loads((reproduced / "metrics/fid.json").read_text())
    assert fid["images_per_s.ar"] > 0 and fid["train_seconds.ar"] == ar["train_seconds"], fid
    with open(reproduced / "plots/fid/fid_vs_nfe.csv") as handle:
        [point] = [p for p in csv.DictReader(handle) if p["generator"] == "ar"]
    assert int(point["nfe"]) == ar["tokens"] and float(point["fid"]) == pytest.approx(fid["fid.ar"], rel=1e-4)

    run(["dvc", "exp", "run", "-S", "params/vae.yaml:regulariser=mmd", "vae"], reproduced)
    infovae = json.loads((reproduced / "metrics/vae.json").read_text())
    assert "codebook_usage" not in infovae and infovae["psnr"] > infovae["psnr_mean_image"], infovae
    assert {"prior_mmd", "prior_mean_norm", "prior_cov_error"} <= infovae.keys()
    assert infovae["prior_mmd"] != vq["prior_mmd"]
