"""Each default is defined once, in tasks/params.py: the registries name what the params allow,
each model builds from the params' defaults, and no model keeps a default of its own for a
setting the params hold."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil
import typing

import pytest
import torch
from pydantic import BaseModel

import models
from models.backbones import BACKBONES
from models.kd import StudentCNN
from models.ssl_registry import OBJECTIVES
from tasks import params as P
from tasks.diffusion import BACKBONES as DENOISER_BACKBONES
from tasks.diffusion import SAMPLERS, build_denoiser_training
from tasks.gan import build_gan_training
from tasks.ssl import build_ssl
from tasks.vae import build_vae_training

pytestmark = pytest.mark.usefixtures("one_thread")

# model defaults whose names a params field shares but which no param sets
NOT_PARAMS = {
    ("models.ema", "decay"): "EMA.update's override of its own decay",
    ("models.knn", "temperature"): "the kNN vote's temperature, not a training objective's",
    ("models.samplers", "guidance"): "1 is the plain conditional model; every stage passes its own guidance",
}


def allowed(model: type[BaseModel], field: str) -> set:
    """The values a Literal (or list of Literal) field allows."""
    annotation = model.model_fields[field].annotation
    if typing.get_origin(annotation) is list:
        annotation = typing.get_args(annotation)[0]
    return set(typing.get_args(annotation))


def test_registries_and_the_params_literals_name_the_same_choices():
    assert set(OBJECTIVES) == allowed(P.SslParams, "objective")
    assert set(BACKBONES) == allowed(P.SslParams, "backbone")
    for name in [*OBJECTIVES, *BACKBONES]:  # each choice has its own params block
        assert issubclass(P.SslParams.model_fields[name].annotation, P.Strict), name
    assert set(SAMPLERS) - {"consistency"} == allowed(P.DiffusionParams, "formulation")
    assert set(DENOISER_BACKBONES) == allowed(P.DiffusionParams, "backbone")
    for name in DENOISER_BACKBONES:
        assert issubclass(P.DiffusionParams.model_fields[name].annotation, P.Strict), name
    for formulation, block in [("flow", P.FlowParams), ("ddpm", P.DDPMParams), ("edm", P.EDMParams)]:
        assert set(SAMPLERS[formulation]) == allowed(block, "sampler"), formulation
    teacher_samplers = set().union(*(SAMPLERS[f] for f in ("flow", "ddpm", "edm")))
    assert teacher_samplers == allowed(P.FidParams, "samplers")


def params_field_names() -> set[str]:
    return {
        name
        for block in vars(P).values()
        if isinstance(block, type) and issubclass(block, BaseModel) and block.__module__ == P.__name__
        for name in block.model_fields
    }


def signature_defaults(function) -> list[str]:
    return [p.name for p in inspect.signature(function).parameters.values() if p.default is not p.empty]


def model_defaults() -> list[tuple[str, str, str]]:
    """(module, owner, argument) of every default in models/: dataclass fields, and the
    arguments of functions and of classes' methods."""
    found = []
    for info in pkgutil.iter_modules(models.__path__):
        module = importlib.import_module(f"models.{info.name}")
        for owner, value in vars(module).items():
            if getattr(value, "__module__", None) != module.__name__:
                continue
            if dataclasses.is_dataclass(value):
                names = [f.name for f in dataclasses.fields(value) if f.default is not dataclasses.MISSING]
            elif inspect.isclass(value):
                methods = [m for m in vars(value).values() if inspect.isfunction(m)]
                names = [name for method in methods for name in signature_defaults(method)]
            elif inspect.isfunction(value):
                names = signature_defaults(value)
            else:
                continue
            found += [(module.__name__, owner, name) for name in names]
    return found


def test_no_model_keeps_a_default_for_a_setting_the_params_hold():
    settings = params_field_names()
    duplicated = [
        f"{module}.{owner}({name}=...)"
        for module, owner, name in model_defaults()
        if name in settings and (module, name) not in NOT_PARAMS
    ]
    assert not duplicated, f"defaults that tasks/params.py defines: {duplicated}"


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_each_objective_builds_and_trains_from_the_params_defaults(objective):
    """And the objectives the params keep off a ResNet are exactly those that refuse one."""
    torch.manual_seed(0)
    patch_tokens = objective in P.PATCH_TOKEN_OBJECTIVES
    params = P.SslParams(objective=objective, backbone="vit" if patch_tokens else "resnet")
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    assert torch.isfinite(build_ssl(params, 3, 16)(images)["loss"])
    on_resnet = P.SslParams.model_construct(**{**dict(params), "backbone": "resnet"})
    if patch_tokens:
        with pytest.raises(P.ParamsError, match="vit"):
            build_ssl(on_resnet, 3, 16)
    else:
        build_ssl(on_resnet, 3, 16)


@pytest.mark.parametrize("backbone", sorted(allowed(P.DiffusionParams, "backbone")))
@pytest.mark.parametrize("formulation", sorted(allowed(P.DiffusionParams, "formulation")))
def test_each_denoiser_builds_and_trains_from_the_params_defaults(formulation, backbone):
    params = P.DiffusionParams(formulation=formulation, backbone=backbone)
    training = build_denoiser_training(params, latent_channels=4, num_classes=10)
    latents, labels = torch.randn(2, 4, 4, 4), torch.tensor([0, 9])
    assert torch.isfinite(training((latents, labels))["loss"])


@pytest.mark.parametrize("regulariser", sorted(allowed(P.VaeParams, "regulariser")))
def test_each_vae_builds_and_trains_from_the_params_defaults(regulariser):
    adversarial = P.AdversarialParams(enabled=True, warmup_fraction=0.0)
    params = P.VaeParams(regulariser=regulariser, adversarial=adversarial, perceptual_weight=0.0)
    training = build_vae_training(params, [1, 16, 16], num_classes=10, steps=10, feature_fn=None)
    assert torch.isfinite(training((torch.rand(2, 1, 16, 16) * 2 - 1, torch.tensor([3, 7])))["loss"])


def test_the_gan_and_the_kd_student_build_from_the_params_defaults():
    gan = build_gan_training(P.GanParams(), latent_shape=(4, 4, 4), num_classes=10)
    assert torch.isfinite(gan((torch.randn(2, 4, 4, 4), torch.tensor([0, 9]), "critic"))["loss"])
    student = StudentCNN(1, 16, 10, P.KdParams().student_widths)
    assert student(torch.rand(2, 1, 16, 16)).shape == (2, 10)
