"""Self-supervised pretraining: the objective built from params, trained by the one loop, with
an online kNN monitor on the val split."""

from __future__ import annotations

from torch import nn

from models.augment import TwoViews
from models.backbones import build_backbone
from models.knn import knn_accuracy
from models.ssl import SSLObjective
from models.ssl_registry import OBJECTIVES, build_objective
from tasks.data import ImageSplit
from tasks.encoder import embed
from tasks.params import ParamsError, SslParams

MONITOR_TRAIN_IMAGES = 10_000  # kNN bank size for the online monitor
MONITOR_K = 20  # neighbours voting in the online monitor


GRAYSCALE_SOURCES = ("digits", "mnist", "fashion_mnist")  # prepare.source values without colour


def check_fits_the_data(params: SslParams, source: str, channels: int) -> None:
    """Refuse an objective the prepared data cannot train (params/ssl.yaml against what the prepare
    stage made, so only checkable here), before any work."""
    if params.objective == "colorization" and (source in GRAYSCALE_SOURCES or channels != 3):
        raise ParamsError(
            f"params/ssl.yaml: objective: colorization predicts colour from lightness, but the prepared data "
            f"(prepare.source: {source}, {channels} channel(s)) has no colour to predict; prepare a colour "
            "source (prepare.source: cifar10, or folder with RGB images and prepare.channels: null or 3)"
        )


def build_ssl(params: SslParams, channels: int, image_size: int) -> SSLObjective:
    """The objective the params name, on the prepared images' shape; a combination the networks
    refuse (a patch size that does not divide the images, I-JEPA blocks that leave no context)
    is a ParamsError naming params/ssl.yaml."""
    augment_params = params.augment.model_dump()
    augment_params["crop_scale"] = tuple(augment_params["crop_scale"])
    if not OBJECTIVES[params.objective].colour_augmented:  # crops and flips only, as its paper
        augment_params.update(jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0)
    try:
        backbone = build_backbone(params.backbone, channels, image_size, **getattr(params, params.backbone).model_dump())
        augment = TwoViews(image_size, channels, **augment_params)
        return build_objective(params.objective, backbone, augment, **getattr(params, params.objective).model_dump())
    except ValueError as err:
        raise ParamsError(f"params/ssl.yaml: {err} (for the prepared {channels}x{image_size}x{image_size} images)") from None


def knn_monitor(train: ImageSplit, val: ImageSplit):
    """`evaluate(objective) -> {"knn_top1": ...}` on val, with (a subset of) train as the bank."""
    bank = ImageSplit(train.images[:MONITOR_TRAIN_IMAGES], train.labels[:MONITOR_TRAIN_IMAGES])

    def evaluate(objective: nn.Module) -> dict[str, float]:
        backbone = objective.backbone
        return {"knn_top1": knn_accuracy(embed(backbone, bank), bank.labels, embed(backbone, val), val.labels, MONITOR_K)}

    return evaluate
