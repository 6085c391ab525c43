"""The one registry of self-supervised objectives: `ssl.objective` names -> classes."""

from __future__ import annotations

from torch import nn

from models.augment import TwoViews
from models.ssl import BYOL, CPC, DINO, MoCoV2, Rotation, SimCLR, SSLObjective, Triplet
from models.ssl_masked import IJEPA, MAE
from models.ssl_pretext import Colorization, DenoisingAutoencoder, Inpainting, Jigsaw

OBJECTIVES: dict[str, type[SSLObjective]] = {
    "simclr": SimCLR, "moco": MoCoV2, "byol": BYOL, "dino": DINO, "rotation": Rotation,
    "mae": MAE, "ijepa": IJEPA, "jigsaw": Jigsaw, "cpc": CPC,
    "inpainting": Inpainting, "dae": DenoisingAutoencoder, "colorization": Colorization,
    "triplet": Triplet,
}


def build_objective(name: str, backbone: nn.Module, augment: TwoViews, **hparams) -> SSLObjective:
    """An objective by name (a key of OBJECTIVES) with its hyper-parameters."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown SSL objective {name!r}; choose from {sorted(OBJECTIVES)}")
    return OBJECTIVES[name](backbone, augment, **hparams)
