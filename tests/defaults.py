"""The params' defaults, the one place they live, for tests that build models from parts."""

from __future__ import annotations

from pydantic import BaseModel

from models.vae import VAE, KLRegulariser, VAETraining
from tasks.params import VaeParams


def defaults(params: type[BaseModel], **overrides) -> dict:
    """`params`' default values as keyword arguments, with the test's own `overrides`."""
    return {**params().model_dump(), **overrides}


def vae_training(vae: VAE, **overrides) -> VAETraining:
    """`vae` under the params' default losses (beta-KL, no perceptual or adversarial term), but `overrides`."""
    params = VaeParams()
    losses = {
        "regulariser": KLRegulariser(params.beta), "reconstruction": params.reconstruction,
        "adv_weight": params.adversarial.weight, "perceptual_weight": params.perceptual_weight,
    }
    return VAETraining(vae, **{**losses, **overrides})
