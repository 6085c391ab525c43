"""The MLflow model of a trained network, as "models from code": MLflow copies this file, the
network's safetensors + JSON files and the `tasks` and `models` packages into the logged model,
and loading it runs this file and the project's own loaders. Nothing is unpickled.

`model_config[<model name>]` holds the network's `kind` and `network` (its files' name), nested under
the model's name so that MLflow logs them as run params `<model name>/kind` and `/network`, apart from
another model's of the same run (distill's students). `kind` says what `predict` does:
- `encoder`: float32 images (N, C, H, W) in [-1, 1] -> embeddings (N, D)
- `vae`: float32 images (N, C, H, W) in [-1, 1] -> posterior-mean latents (N, c, h, w)
- `classifier` (the kd stage's student): float32 images (N, C, H, W) in [-1, 1] -> logits (N, classes)
- `generator` (the denoiser, a student): int64 class labels (N,) (a text-conditioned one's: indices
  into the caption table its JSON lists) -> decoded images (N, C, H, W) in [-1, 1]; params `steps`,
  `guidance`, `seed` (defaults: how the stage sampled)
- `gan` (the GAN's generator): int64 class labels (N,) -> decoded images in [-1, 1]; param `seed`
`model_config["device"]` (`cpu`) is where it runs; override it at load with
`mlflow.pyfunc.load_model(uri, model_config={"device": "cuda"})` (MLflow takes only keys logged with it).
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.pyfunc import PythonModel

from tasks.diffusion import load_denoiser, timed_images
from tasks.encoder import load_encoder
from tasks.gan import load_generator, timed_gan_images
from tasks.kd import load_student
from tasks.vae import NAME as VAE
from tasks.vae import encode_means, load_decoder, load_vae


def _folder(artifacts: dict[str, str], network: str) -> Path:
    """Where `<network>.safetensors` and `.json` are (their own folder while the model is logged,
    the model's artifacts folder once it is)."""
    return Path(artifacts[f"{network}.safetensors"]).parent


def _encoder(artifacts: dict[str, str], config: dict, device: str):
    encoder = load_encoder(_folder(artifacts, config["network"]), device)
    return lambda images, params: encoder(images).float()


def _classifier(artifacts: dict[str, str], config: dict, device: str):
    student = load_student(_folder(artifacts, config["network"]), device)
    return lambda images, params: student(images).float()


def _vae(artifacts: dict[str, str], config: dict, device: str):
    vae = load_vae(_folder(artifacts, config["network"]), device)

    def encode(images: torch.Tensor, params: dict) -> torch.Tensor:
        """Posterior means; a conditional VAE's of every image as the class `params["label"]`."""
        labels = torch.full((len(images),), int(params["label"]), device=images.device) if vae.config.num_classes else None
        return encode_means(vae, images, labels)

    return encode


def _generator(artifacts: dict[str, str], config: dict, device: str):
    denoiser = load_denoiser(_folder(artifacts, config["network"]), device, config["network"])
    decoder = load_decoder(_folder(artifacts, VAE), device)

    def generate(labels: torch.Tensor, params: dict) -> torch.Tensor:
        return timed_images(denoiser, decoder, labels, int(params["steps"]), float(params["guidance"]), int(params["seed"]))[0]

    return generate


def _gan(artifacts: dict[str, str], config: dict, device: str):
    generator = load_generator(_folder(artifacts, config["network"]), device, config["network"])
    decoder = load_decoder(_folder(artifacts, VAE), device)
    return lambda labels, params: timed_gan_images(generator, decoder, labels, int(params["seed"]))[0]


KINDS = {"encoder": _encoder, "classifier": _classifier, "vae": _vae, "generator": _generator, "gan": _gan}


class Network(PythonModel):
    def load_context(self, context) -> None:
        config = context.model_config
        (network,) = (value for value in config.values() if isinstance(value, dict))  # under the model's name
        self.device = config["device"]
        self.run = KINDS[network["kind"]](context.artifacts, network, self.device)

    def predict(self, context, model_input: np.ndarray, params: dict | None = None) -> np.ndarray:
        with torch.no_grad():
            return self.run(torch.as_tensor(np.asarray(model_input), device=self.device), params or {}).cpu().numpy()


mlflow.models.set_model(Network())
