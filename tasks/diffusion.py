"""Latent denoisers: the training module built from params, export and rebuild from safetensors +
JSON (with how they sample and, text-conditioned, their caption table), class-balanced sampling and
decoded per-class (or, text-conditioned, per-caption) grids.

The distilled students are denoisers too: they are saved, loaded and sampled the same way.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.diffusion import (
    DDPM,
    EDM,
    ConsistencyPrecond,
    DenoiserTraining,
    EDMPrecond,
    RectifiedFlow,
)
from models.dit import DiT, DiTConfig
from models.repa import RepaAlignment
from models.samplers import (
    KarrasSchedule,
    consistency,
    ddim,
    ddpm_ancestral,
    edm_heun,
    euler,
    heun,
    reverse_sde,
)
from models.unet import UNet, UNetConfig
from tasks.artifacts import load_network, save_network, unreadable
from tasks.captions import CAPTIONS_PER_CLASS, WORDS, caption_index
from tasks.conditions import caption_requests
from tasks.data import EpochBatches
from tasks.device import autocast
from tasks.images import captioned, grid, to_uint8
from tasks.params import DiffusionParams, ParamsError
from tasks.vae import LatentDecoder

SAMPLERS = {
    "flow": {"euler": euler, "heun": heun},
    "ddpm": {"ddim": ddim, "ancestral": ddpm_ancestral},
    "edm": {"heun": edm_heun, "sde": reverse_sde},
    "consistency": {"multistep": consistency},  # consistency-distilled students (tasks/distill.py)
}
DETERMINISTIC = {"ddpm": "ddim", "edm": "heun"}  # each formulation's invertible sampler; the flow's are both
BACKBONES = {"unet": (UNet, UNetConfig), "dit": (DiT, DiTConfig)}  # diffusion.backbone: the net and its config


def build_net(backbone: str, config: dict) -> UNet | DiT:
    """The denoiser network `backbone` ("unet" or "dit") from its config's fields."""
    net_class, config_class = BACKBONES[backbone]
    return net_class(config_class(**config))


def check_latent_grid(params: DiffusionParams, latent_shape: tuple[int, ...]) -> None:
    """Refuse, before any training, a DiT whose patch does not divide the (C, H, W) latent grid."""
    height, width = latent_shape[-2:]
    if params.backbone == "dit" and (height % params.dit.patch_size or width % params.dit.patch_size):
        raise ParamsError(
            f"params/diffusion.yaml: dit.patch_size {params.dit.patch_size} does not divide the {height}x{width} "
            "latent grid (prepare.image_size / vae.downsample)"
        )


def build_denoiser_training(
    params: DiffusionParams, latent_channels: int, num_classes: int, embedding_dim: int | None = None,
    caption_tokens: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> DenoiserTraining:
    """The net and its objective; with repa.weight > 0, REPA's projector onto the SSL encoder's
    `embedding_dim`-wide embeddings too. Text-conditioned (condition: text), `caption_tokens` is the
    caption table's token features and where they are not padding, the empty caption last
    (tasks/conditions.py's `caption_features`), and the labels index its rows."""
    config = getattr(params, params.backbone).model_dump()
    if params.condition == "text":
        if caption_tokens is None:
            raise ValueError("condition: text needs the caption table's token features")
        features = caption_tokens[0]
        num_classes = len(features) - 1
        config |= {"text_length": features.shape[1], "text_dim": features.shape[2]}
    net = build_net(params.backbone, {"in_channels": latent_channels, "num_classes": num_classes, **config})
    if params.condition == "text":
        net.set_captions(*caption_tokens)
    if params.formulation == "flow":
        objective = RectifiedFlow(params.flow.time_mean, params.flow.time_std, params.label_dropout)
    elif params.formulation == "edm":
        edm = params.edm
        objective = EDM(edm.p_mean, edm.p_std, edm.sigma_data, params.label_dropout)
    else:
        objective = DDPM(label_dropout=params.label_dropout)
    repa = params.repa
    if repa.weight == 0:
        return DenoiserTraining(net, objective)
    if embedding_dim is None:
        raise ValueError("repa.weight > 0 needs the SSL embeddings' width")
    alignment = RepaAlignment(net.hidden_width(repa.depth), embedding_dim, repa.projector_dim, repa.depth, repa.weight)
    return DenoiserTraining(net, objective, alignment)


@dataclass
class Denoiser:
    """A trained network (U-Net or DiT) and what sampling it takes: the formulation, sampler and latent shape."""

    net: UNet | DiT
    formulation: str  # "flow", "ddpm", "edm", or "consistency" (a student)
    sampler: str  # a key of SAMPLERS[formulation]
    latent_shape: tuple[int, ...]
    flow_time: dict[str, float] = field(default_factory=dict)  # the flow's logit-normal t, for reflow
    edm: dict[str, float | None] = field(default_factory=dict)  # EDM's (and consistency's) sigma_data, schedule, churn
    captions: list[str] = field(default_factory=list)  # text-conditioned: the caption table its labels index
    guide: Callable[[nn.Module], nn.Module] | None = None  # wraps what the sampler calls (tasks/guidance.py)

    @classmethod
    def from_params(
        cls, net: UNet | DiT, params: DiffusionParams, latent_shape: tuple[int, ...], captions: Sequence[str] = ()
    ) -> Denoiser:
        formulation = params.formulation
        sampler = getattr(params, formulation).sampler
        flow_time = params.flow.model_dump(include={"time_mean", "time_std"}) if formulation == "flow" else {}
        edm = params.edm.model_dump(exclude={"p_mean", "p_std", "sampler"}) if formulation == "edm" else {}
        return cls(net, formulation, sampler, tuple(latent_shape), flow_time, edm, list(captions))

    @property
    def num_classes(self) -> int:
        return len(self.captions) // CAPTIONS_PER_CLASS if self.captions else self.net.config.num_classes

    def classes(self, conditions: torch.Tensor) -> torch.Tensor:
        """The class each of its labels asks for: the label itself, or a caption's class."""
        return conditions // CAPTIONS_PER_CLASS if self.captions else conditions

    def requests(self, classes: torch.Tensor, split: str, seed: int) -> torch.Tensor:
        """Its labels for samples of `classes`: the classes, or (text-conditioned) the caption of
        a random image of each class in `split` (tasks/conditions.py)."""
        return caption_requests(classes, split, seed) if self.captions else classes

    def with_net(self, net: UNet | DiT, sampler: str | None = None) -> Denoiser:
        return dataclasses.replace(self, net=net, sampler=sampler or self.sampler)

    def sampling(self) -> tuple[nn.Module, Callable[..., torch.Tensor]]:
        """(what the sampler calls, the sampler(net, noise, labels, steps, guidance)): for EDM the
        preconditioned network (a consistency student's with its boundary condition), and its sampler
        bound to the stored schedule (and churn); wrapped by `guide` when set (classifier guidance)."""
        net, sampler = self._sampling()
        return (net if self.guide is None else self.guide(net)), sampler

    def _sampling(self) -> tuple[nn.Module, Callable[..., torch.Tensor]]:
        sampler = SAMPLERS[self.formulation][self.sampler]
        if self.formulation not in ("edm", "consistency"):
            return self.net, sampler
        edm = self.edm
        schedule = KarrasSchedule(edm["sigma_min"], edm["sigma_max"], edm["rho"])
        if self.formulation == "consistency":
            return ConsistencyPrecond(self.net, edm["sigma_data"], edm["sigma_min"]), functools.partial(sampler, schedule=schedule)
        options = {"churn": edm["churn"]} if self.sampler == "sde" else {}
        return EDMPrecond(self.net, edm["sigma_data"]), functools.partial(sampler, schedule=schedule, **options)

    def evaluations(self, steps: int) -> int:
        """Network calls (NFE) of `steps` steps of its sampler, a guided call counted once: Heun's
        two a step (EDM's last step one), every other sampler's one."""
        if self.sampler != "heun":
            return steps
        return 2 * steps - (self.formulation == "edm")

    def deterministic(self) -> Denoiser:
        """This denoiser with its formulation's deterministic sampler (its own, if deterministic)."""
        return self.with_net(self.net, DETERMINISTIC.get(self.formulation, self.sampler))

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, steps: int, guidance: float, seed: int, batch_size: int = 500) -> torch.Tensor:
        """Scaled latents for `labels`, drawn in batches from seeded noise (the same on any device);
        the net runs under bf16 autocast on CUDA, the sampler's state in float32."""
        self.net.eval()
        torch.manual_seed(seed)  # the stochastic samplers' fresh noise
        noise = torch.randn(len(labels), *self.latent_shape, generator=torch.Generator().manual_seed(seed))
        net, sampler = self.sampling()
        with autocast(labels.device):
            return torch.cat([
                sampler(net, chunk.to(labels.device), chunk_labels, steps, guidance)
                for chunk, chunk_labels in zip(noise.split(batch_size), labels.split(batch_size), strict=True)
            ])


@torch.no_grad()
def invert_and_regenerate(
    denoiser: Denoiser, latents: torch.Tensor, labels: torch.Tensor, steps: int, batch_size: int = 500
) -> tuple[torch.Tensor, torch.Tensor]:
    """DDIM inversion: scaled `latents` run backwards to the noise that the deterministic sampler
    maps onto them, unguided, and sampled forwards again from it: (noise, regenerated latents)."""
    denoiser.net.eval()
    net, sampler = denoiser.deterministic().sampling()
    noises, regenerated = [], []
    with autocast(labels.device):
        for chunk, chunk_labels in zip(latents.split(batch_size), labels.split(batch_size), strict=True):
            noises.append(sampler(net, chunk, chunk_labels, steps, 1.0, invert=True))
            regenerated.append(sampler(net, noises[-1], chunk_labels, steps, 1.0))
    return torch.cat(noises), torch.cat(regenerated)


def export_denoiser(denoiser: Denoiser, folder: Path, name: str = "denoiser") -> None:
    """<name>.safetensors and <name>.json: everything `load_denoiser` rebuilds it from. The
    network's config sits under its backbone's name ("unet" or "dit"), which "backbone" names."""
    backbone = next(name for name, (net_class, _) in BACKBONES.items() if isinstance(denoiser.net, net_class))
    config = {
        "backbone": backbone, backbone: dataclasses.asdict(denoiser.net.config), "formulation": denoiser.formulation,
        "sampler": denoiser.sampler, "latent_shape": list(denoiser.latent_shape), "flow_time": denoiser.flow_time,
        "edm": denoiser.edm, "captions": denoiser.captions,
    }
    save_network(denoiser.net, config, folder, name)


def load_denoiser(folder: Path | str, device: torch.device | str = "cpu", name: str = "denoiser") -> Denoiser:
    """Rebuild a frozen denoiser (eval mode, no grads) from <name>.json + <name>.safetensors; a
    file without "backbone" (written before the DiT) holds a U-Net, one without its U-Net's
    "cross_attention_levels" (written before text conditioning) a class-conditioned one."""

    def build(config: dict) -> UNet | DiT:
        backbone = config.get("backbone", "unet")
        if backbone not in BACKBONES or backbone not in config:
            raise unreadable(Path(folder) / f"{name}.json", f"backbone {backbone!r} without its config")
        return build_net(backbone, {"cross_attention_levels": ()} | config[backbone] if backbone == "unet" else config[backbone])

    net, config = load_network(folder, name, build, device)
    if missing := [key for key in ("formulation", "sampler", "latent_shape", "flow_time") if key not in config]:
        raise unreadable(Path(folder) / f"{name}.json", f"missing key(s) {', '.join(missing)}")
    if config["formulation"] in ("edm", "consistency") and not config.get("edm"):
        raise unreadable(Path(folder) / f"{name}.json", f"formulation {config['formulation']} without its 'edm' settings")
    if getattr(net.config, "text_dim", 0) and len(config.get("captions", [])) != net.config.num_classes:
        raise unreadable(Path(folder) / f"{name}.json", f"{len(config.get('captions', []))} captions for a net of "
                                                          f"{net.config.num_classes}")
    return Denoiser(
        net, config["formulation"], config["sampler"], tuple(config["latent_shape"]), config["flow_time"],
        config.get("edm", {}), config.get("captions", []),
    )


def step_rows(batches: EpochBatches, *tensors: torch.Tensor) -> Callable[[int], tuple[torch.Tensor, ...]]:
    """The Trainer's `next_batch`: each tensor's rows for the step."""

    def next_batch(step: int) -> tuple[torch.Tensor, ...]:
        index = batches(step)
        return tuple(tensor[index] for tensor in tensors)

    return next_batch


def balanced_labels(count: int, num_classes: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """0, 1, ..., num_classes - 1, 0, 1, ...: every class within one of count / num_classes."""
    return torch.arange(count, device=device) % num_classes


def timed_images(
    denoiser: Denoiser, decoder: LatentDecoder, labels: torch.Tensor, steps: int, guidance: float, seed: int,
    batch_size: int = 500,
) -> tuple[torch.Tensor, float]:
    """Decoded samples in [-1, 1] for `labels` (the denoiser's: classes, or caption_table indices),
    and the images/s of sampling plus decoding."""
    started = time.perf_counter()
    images = decoder(denoiser.sample(labels, steps, guidance, seed, batch_size), denoiser.classes(labels))
    if images.is_cuda:
        torch.cuda.synchronize(images.device)  # count the kernels still queued
    return images, len(labels) / max(time.perf_counter() - started, 1e-9)


def class_grid(
    denoiser: Denoiser, decoder: LatentDecoder, per_class: int, steps: int, guidance: float, seed: int
) -> tuple[np.ndarray, float]:
    """A row of `per_class` decoded samples per class (text-conditioned: each asked for with the
    caption of a random train image of the class), and the images/s it was drawn at."""
    device = next(denoiser.net.parameters()).device
    classes = torch.arange(denoiser.num_classes, device=device).repeat_interleave(per_class)
    images, images_per_s = timed_images(denoiser, decoder, denoiser.requests(classes, "train", seed), steps, guidance, seed)
    return grid(to_uint8(images), ncols=per_class), images_per_s


def attribute_grid(
    denoiser: Denoiser, decoder: LatentDecoder, label: int, per_caption: int, steps: int, guidance: float, seed: int
) -> tuple[np.ndarray, float]:
    """A text-conditioned denoiser's samples of class `label`: a row per caption, each under its
    caption, the captions sweeping each attribute's words in turn with the others at their middle
    word; `per_caption` samples a row, the same noise down each column; and the images/s."""
    middle = [len(words) // 2 for words in WORDS.values()]
    rows = dict.fromkeys(
        caption_index(label, [*middle[:a], k, *middle[a + 1 :]])
        for a, words in enumerate(WORDS.values()) for k in range(len(words))
    )
    device = next(denoiser.net.parameters()).device
    panels, seconds = {}, 0.0
    for index in rows:
        images, images_per_s = timed_images(denoiser, decoder, torch.full((per_caption,), index, device=device), steps, guidance, seed)
        panels[denoiser.captions[index]] = grid(to_uint8(images), ncols=per_caption)
        seconds += per_caption / images_per_s
    return captioned(panels, ncols=1), len(rows) * per_caption / seconds
