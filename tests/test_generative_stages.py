"""The generative stages' task modules: artifacts that rebuild their models from files alone,
latent scaling, sampling, both distillation methods on a tiny teacher, and FID scoring.
The real stage runs are checked in test_pipeline.py (one `dvc repro` of the smoke profile); a DiT
teacher's with REPA here, rerunning that run's diffusion and later stages."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from models.diffusion import DDPM, RectifiedFlow
from models.dit import DiT, DiTConfig
from models.fid import FeatureExtractor
from models.unet import UNet, UNetConfig
from models.vae import VAE, VAEConfig
from tasks.artifacts import freeze
from tasks.diffusion import (
    Denoiser,
    balanced_labels,
    build_denoiser_training,
    check_latent_grid,
    class_grid,
    export_denoiser,
    load_denoiser,
)
from tasks.distill import progressive_students, reflow_student
from tasks.errors import StageError
from tasks.fid import FidScorer, inception_weights
from tasks.params import (
    DiffusionParams,
    DistillParams,
    DiTParams,
    FidParams,
    ParamsError,
    ProgressiveParams,
    ReflowParams,
    TrainParams,
    UNetParams,
    VaeParams,
    validate,
)
from tasks.students import export_students, load_students
from tasks.training import TrainingContext
from tasks.vae import (
    LatentDecoder,
    Latents,
    LatentScale,
    build_vae_training,
    encode_means,
    export_vae,
    image_quality,
    load_latents,
    load_vae,
)
from tests.conftest import run
from tests.defaults import defaults

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_unet(in_channels: int = 2, num_classes: int = 3) -> UNet:
    torch.manual_seed(0)
    config = UNetConfig(in_channels, num_classes, **defaults(UNetParams, channels=8, channel_mults=(1, 2), attention_heads=2))
    return UNet(config)


def tiny_dit(in_channels: int = 2, num_classes: int = 3) -> DiT:
    """A small DiT whose zero-initialised layers (adaLN-Zero's modulations, the output) are drawn at
    random: a net at init outputs zero whatever it is given, which would hide a wrong reload."""
    torch.manual_seed(0)
    net = DiT(DiTConfig(in_channels, num_classes, **defaults(DiTParams, dim=16, depth=2, heads=2)))
    for linear in [block.modulation[1] for block in net.blocks] + [net.final_modulation[1], net.output]:
        nn.init.normal_(linear.weight, std=0.1)
    return net


TINY_NETS = {"unet": tiny_unet, "dit": tiny_dit}


# -- VAE -------------------------------------------------------------------------------------


def test_vae_training_follows_the_params_and_refuses_a_grid_that_does_not_divide():
    params = VaeParams(downsample=4, perceptual_weight=0.0, adversarial={"enabled": True, "warmup_fraction": 0.25})
    training = build_vae_training(params, [1, 16, 16], num_classes=10, steps=100, feature_fn=nn.Identity())
    assert training.discriminator is not None and training.adv_warmup_steps == 25
    assert training.feature_fn is None  # perceptual_weight 0 switches the feature loss off
    assert build_vae_training(VaeParams(perceptual_weight=0.5), [1, 16, 16], 10, 100, nn.Identity()).feature_fn is not None
    with pytest.raises(StageError, match="downsample 4 does not divide the 6x6 images"):
        build_vae_training(params, [1, 6, 6], num_classes=10, steps=100, feature_fn=None)


def test_exported_vae_rebuilds_frozen_with_identical_outputs(tmp_path):
    torch.manual_seed(0)
    vae = VAE(VAEConfig(image_channels=1, latent_channels=3, downsample=2, width=8, codebook_size=0)).eval()
    images = torch.rand(5, 1, 8, 8) * 2 - 1
    export_vae(vae, tmp_path)
    loaded = load_vae(tmp_path)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    freeze(vae)  # the same channels-last layout: convolutions sum in the same order
    assert torch.equal(encode_means(loaded, images), encode_means(vae, images))
    latents = torch.randn(5, 3, 4, 4)
    with torch.no_grad():
        assert torch.equal(loaded.decode(latents), vae.decode(latents))


def test_latents_are_saved_with_a_scale_that_gives_unit_variance_per_channel(tmp_path):
    torch.manual_seed(0)
    channel_means, channel_stds = torch.tensor([3.0, -1.0, 0.0]), torch.tensor([0.1, 2.0, 5.0])
    raw = channel_means[:, None, None] + channel_stds[:, None, None] * torch.randn(500, 3, 4, 4)
    latents = Latents(raw, torch.arange(500) % 10, LatentScale.fit(raw), num_classes=10)
    latents.save(tmp_path)
    loaded = load_latents(tmp_path)
    scaled = loaded.scaled()
    torch.testing.assert_close(scaled.mean((0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(scaled.std((0, 2, 3)), torch.ones(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(loaded.latent_scale.denormalize(scaled), raw, atol=1e-4, rtol=0)
    assert torch.equal(loaded.labels, latents.labels) and loaded.num_classes == 10


def test_image_quality_rises_as_the_error_falls():
    torch.manual_seed(0)
    images = torch.rand(16, 1, 8, 8) * 2 - 1
    noisy, noisier = ((images + level * torch.randn_like(images)).clamp(-1, 1) for level in (0.05, 0.3))
    good, bad = image_quality(noisy, images), image_quality(noisier, images)
    assert good["psnr"] > bad["psnr"] + 5 and good["ssim"] > bad["ssim"]


# -- denoisers and sampling ------------------------------------------------------------------


def test_the_formulation_param_picks_the_objective():
    flow = build_denoiser_training(DiffusionParams(flow={"time_std": 1.5}), latent_channels=4, num_classes=10)
    assert isinstance(flow.objective, RectifiedFlow) and flow.objective.time_std == 1.5
    ddpm = build_denoiser_training(DiffusionParams(formulation="ddpm", label_dropout=0.2), 4, 10)
    assert isinstance(ddpm.objective, DDPM) and ddpm.objective.label_dropout == 0.2
    assert ddpm.net.config.num_classes == 10 and ddpm.net.null_label == 10
    assert isinstance(ddpm.net, UNet)


def test_the_backbone_param_picks_the_network():
    dit = build_denoiser_training(DiffusionParams(backbone="dit", dit={"depth": 2}), latent_channels=4, num_classes=10)
    assert isinstance(dit.net, DiT) and dit.net.null_label == 10
    assert dit.net.config == DiTConfig(4, 10, **defaults(DiTParams, depth=2))
    with pytest.raises(ParamsError, match="heads"):
        validate("diffusion", {"backbone": "dit", "dit": {"dim": 96, "heads": 5}})
    check_latent_grid(DiffusionParams(backbone="dit"), (4, 4, 4))
    check_latent_grid(DiffusionParams(dit={"patch_size": 3}), (4, 4, 4))  # the U-Net takes any grid
    with pytest.raises(ParamsError, match="dit.patch_size 3 does not divide the 4x4 latent grid"):
        check_latent_grid(DiffusionParams(backbone="dit", dit={"patch_size": 3}), (4, 4, 4))


EDM_SETTINGS = {"sigma_data": 1.0, "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0, "churn": None}


@pytest.mark.parametrize(
    ("formulation", "sampler"),
    [("flow", "euler"), ("flow", "heun"), ("ddpm", "ddim"), ("ddpm", "ancestral"), ("edm", "heun"), ("edm", "sde")],
)
@pytest.mark.parametrize("backbone", list(TINY_NETS))
def test_exported_denoiser_samples_identically(tmp_path, formulation, sampler, backbone):
    edm = EDM_SETTINGS if formulation == "edm" else {}
    denoiser = Denoiser(TINY_NETS[backbone]().eval(), formulation, sampler, (2, 4, 4), {"time_mean": 0.0, "time_std": 1.0}, edm)
    labels = balanced_labels(12, 3)
    before = denoiser.sample(labels, steps=3, guidance=2.0, seed=7)
    export_denoiser(denoiser, tmp_path, "teacher")
    loaded = load_denoiser(tmp_path, name="teacher")
    assert (loaded.formulation, loaded.sampler, loaded.latent_shape) == (formulation, sampler, (2, 4, 4))
    assert type(loaded.net) is type(denoiser.net) and loaded.net.config == denoiser.net.config
    assert torch.equal(loaded.sample(labels, steps=3, guidance=2.0, seed=7), before)
    if sampler not in ("ancestral", "sde"):  # deterministic samplers: the batching does not change a sample
        torch.testing.assert_close(loaded.sample(labels, 3, 2.0, seed=7, batch_size=5), before)


def test_a_denoiser_file_names_its_backbone_and_one_without_it_holds_a_unet(tmp_path):
    export_denoiser(Denoiser(tiny_dit(), "flow", "euler", (2, 4, 4), {"time_mean": 0.0, "time_std": 1.0}), tmp_path)
    config = json.loads((tmp_path / "denoiser.json").read_text())
    assert config["backbone"] == "dit" and "unet" not in config
    export_denoiser(Denoiser(tiny_unet(), "flow", "euler", (2, 4, 4), {"time_mean": 0.0, "time_std": 1.0}), tmp_path)
    config = json.loads((tmp_path / "denoiser.json").read_text())
    assert config["backbone"] == "unet"
    del config["backbone"]  # as the files written before the DiT are
    (tmp_path / "denoiser.json").write_text(json.dumps(config))
    assert isinstance(load_denoiser(tmp_path).net, UNet)
    (tmp_path / "denoiser.json").write_text(json.dumps({**config, "backbone": "dit"}))
    with pytest.raises(StageError, match="backbone 'dit' without its config"):
        load_denoiser(tmp_path)


def test_balanced_labels_and_class_grid_have_a_row_per_class():
    assert torch.equal(balanced_labels(25, 10).bincount(), torch.tensor([3] * 5 + [2] * 5))
    torch.manual_seed(0)
    vae = VAE(VAEConfig(image_channels=1, latent_channels=2, downsample=2, width=8, codebook_size=0)).eval()
    decoder = LatentDecoder(vae, LatentScale(torch.zeros(2), torch.ones(2)))
    denoiser = Denoiser(tiny_unet(), "flow", "euler", (2, 4, 4))
    image, images_per_s = class_grid(denoiser, decoder, per_class=4, steps=2, guidance=1.0, seed=0)
    cell = 48 + 1  # 8-pixel images upscaled to the grid's 48-pixel cells, 1-pixel padding
    assert image.shape == (3 * cell + 1, 4 * cell + 1, 1) and images_per_s > 0


# -- distillation ----------------------------------------------------------------------------


def distill_params(**changes) -> DistillParams:
    train = TrainParams(epochs=1, batch_size=8, lr=1e-3, log_every=1)
    return DistillParams(
        guidance=1.5, student_steps=[1, 2],
        progressive=ProgressiveParams(teacher_steps=4, train=train),
        reflow=ReflowParams(pairs=16, teacher_steps=2, train=train),
        **changes,
    )


@pytest.mark.parametrize("backbone", list(TINY_NETS))
def test_progressive_rounds_halve_the_steps_and_each_student_starts_from_its_teacher(in_tmp, backbone):
    teacher = Denoiser(TINY_NETS[backbone]().requires_grad_(False), "ddpm", "ddim", (2, 4, 4))
    latents, labels = torch.randn(16, 2, 4, 4), balanced_labels(16, 3)
    students, results = progressive_students(teacher, distill_params(), latents, labels, TrainingContext("distill"))
    assert [s.steps for s in students] == [2, 1] and len(results) == 2  # rounds 4 -> 2 -> 1
    assert all(s.denoiser.sampler == "ddim" and s.guidance == 1.5 for s in students)
    two_step, one_step = (s.denoiser.net for s in students)
    assert two_step is not one_step and two_step is not teacher.net
    for net in (two_step, one_step):
        assert not any(p.requires_grad for p in net.parameters())
        moved = [not torch.equal(a, b) for a, b in zip(net.parameters(), teacher.net.parameters(), strict=True)]
        assert any(moved)

    export_students(students, "progressive", 1.5, in_tmp / "out")
    loaded, target_guidance = load_students(in_tmp / "out")
    assert target_guidance == 1.5 and [s.steps for s in loaded] == [1, 2]
    for before, after in zip(sorted(students, key=lambda s: s.steps), loaded, strict=True):
        assert torch.equal(
            after.denoiser.sample(labels, after.steps, after.guidance, seed=3),
            before.denoiser.sample(labels, before.steps, before.guidance, seed=3),
        )


def test_reflow_trains_one_student_that_samples_unguided_at_every_step_count(in_tmp):
    teacher = Denoiser(tiny_unet().requires_grad_(False), "flow", "heun", (2, 4, 4), {"time_mean": 0.0, "time_std": 1.0})
    students, results = reflow_student(teacher, distill_params(), training=TrainingContext("distill"), batch_size=8)
    assert [s.steps for s in students] == [1, 2] and len(results) == 1 and results[0].steps == 2
    assert all(s.denoiser.sampler == "euler" and s.guidance == 1.0 for s in students)
    assert students[0].denoiser.net is students[1].denoiser.net is not teacher.net
    export_students(students, "reflow", 1.5, in_tmp / "out")
    assert sorted(p.name for p in (in_tmp / "out").iterdir()) == ["student.json", "student.safetensors", "students.json"]
    loaded, _ = load_students(in_tmp / "out")
    assert loaded[0].denoiser is loaded[1].denoiser  # one file, loaded once


@pytest.mark.parametrize("backbone", list(TINY_NETS))
def test_reflow_from_an_edm_teacher_trains_a_rectified_flow_student(in_tmp, backbone):
    teacher = Denoiser(TINY_NETS[backbone]().requires_grad_(False), "edm", "heun", (2, 4, 4), edm=EDM_SETTINGS)
    students, _ = reflow_student(teacher, distill_params(), training=TrainingContext("distill"), batch_size=8)
    student = students[0].denoiser
    assert (student.formulation, student.sampler, student.edm) == ("flow", "euler", {})
    assert student.flow_time == {"time_mean": 0.0, "time_std": 1.0}
    export_students(students, "reflow", 1.5, in_tmp / "out")
    loaded, _ = load_students(in_tmp / "out")
    labels = balanced_labels(6, 3)
    assert torch.equal(loaded[0].denoiser.sample(labels, 2, 1.0, seed=1), student.sample(labels, 2, 1.0, seed=1))


@pytest.mark.parametrize("steps", [[3], [4], [0]])
def test_student_steps_must_be_rounds_of_the_progressive_halving(steps):
    with pytest.raises(ParamsError, match="student_steps must be powers of two below progressive.teacher_steps"):
        validate("distill", {"student_steps": steps, "progressive": {"teacher_steps": 4}})


def test_generative_params_refuse_bad_combinations():
    with pytest.raises(ParamsError, match="progressive.teacher_steps must be a power of two"):
        validate("distill", {"progressive": {"teacher_steps": 48}})
    with pytest.raises(ParamsError, match="attention_heads must divide"):
        validate("diffusion", {"unet": {"channels": 30, "channel_mults": [1], "attention_heads": 4}})
    with pytest.raises(ParamsError, match="guidance_scales must be >= 1"):
        validate("diffusion", {"guidance_scales": [0.5]})
    with pytest.raises(ParamsError, match="key 'flow.sampler' = 'ddim'"):
        validate("diffusion", {"flow": {"sampler": "ddim"}})
    with pytest.raises(ParamsError, match="teacher_steps and inversion_steps must be >= 1"):
        validate("fid", {"teacher_steps": [0, 4]})


# -- FID -------------------------------------------------------------------------------------


def scorer(real: torch.Tensor, **kwargs) -> FidScorer:
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(128, 6))
    return FidScorer(FeatureExtractor(encoder, (1, 8, 8)), real, kid_subset_size=50, kid_subsets=5, **kwargs)


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save all extracted features")
def test_fid_scorer_keeps_the_real_set_and_scores_each_set_alone():
    torch.manual_seed(0)
    real = torch.rand(200, 1, 8, 8) * 2 - 1
    score = scorer(real, batch_size=64)
    same, noisy = score(real), score((real + 0.5 * torch.randn_like(real)).clamp(-1, 1))
    assert abs(same["fid"]) < 1e-4 and noisy["fid"] > 100 * max(same["fid"], 1e-6)
    assert noisy["kid"] > same["kid"]
    assert score(real) == same  # the fake set was reset, the real one kept
    few = score(real[:10])  # KID's subset size shrinks to the smaller set
    assert set(few) == {"fid", "kid"}


def test_inception_fid_is_skipped_with_a_reason_and_never_downloaded(tmp_path):
    assert inception_weights(FidParams(inception=False)) is None
    with pytest.warns(UserWarning, match="Inception-v3 FID skipped"):
        assert inception_weights(FidParams(inception_weights=str(tmp_path / "missing.pth"))) is None


@pytest.mark.slow
def test_dvc_repro_of_a_dit_teacher_with_repa_and_a_guidance_classifier_distils_and_scores_them(reproduced: Path):
    """`diffusion.backbone=dit` with REPA (`diffusion.repa.weight=0.5`) and the noise-aware classifier
    (`diffusion.classifier.epochs=5`) on the smoke profile, then `dvc repro fid`: the DiT teacher
    trains aligned to the SSL encoder's embeddings, its progressive students (DiTs too, without a
    projector) distil from it, and fid scores them all, and classifier guidance against CFG (one
    rerun of diffusion, distill and fid for both methods: CI time)."""
    from tests.test_guidance import assert_classifier_guidance_scored

    run([sys.executable, "-m", "flows", "profile", "smoke", "--set", "diffusion.backbone=dit",
         "--set", "diffusion.repa.weight=0.5", "--set", "diffusion.classifier.epochs=5"], reproduced)
    run(["dvc", "repro", "fid"], reproduced)
    assert_classifier_guidance_scored(reproduced)
    artifacts = reproduced / "artifacts"
    denoiser = json.loads((artifacts / "diffusion" / "denoiser.json").read_text())
    assert denoiser["backbone"] == "dit" and "unet" not in denoiser, denoiser
    with open(reproduced / "plots" / "diffusion" / "train.csv") as handle:
        logged = list(csv.DictReader(handle))
    assert float(logged[-1]["alignment"]) < float(logged[0]["alignment"]), (logged[0], logged[-1])
    students = json.loads((artifacts / "distill" / "students.json").read_text())
    for student in students["students"]:
        assert json.loads((artifacts / "distill" / f"{student['name']}.json").read_text())["backbone"] == "dit"
    diffusion = json.loads((reproduced / "metrics" / "diffusion.json").read_text())
    assert diffusion["parameters"] > 0 and math.isfinite(diffusion["train_seconds"])
    fid = json.loads((reproduced / "metrics" / "fid.json").read_text())
    scores = {key: value for key, value in fid.items() if key.startswith(("fid.teacher", "fid.student"))}
    assert any(key.startswith("fid.student.") for key in scores) and all(map(math.isfinite, scores.values())), fid
    best_teacher = min(value for key, value in scores.items() if key.startswith("fid.teacher."))
    assert best_teacher < fid["fid.prior_vs_test"], fid  # the trained DiT beats sampling the latents' Gaussian
    assert run(["dvc", "status", "fid"], reproduced).stdout.strip().endswith("up to date.")
