"""Every file the pipeline reads, spoilt: params, overrides, prepared splits, manifest, SSL state,
exported networks, latents, students. Each ends in one error naming the file (and key or value)
and what is allowed or how to get a good one; nothing in it is unpickled or run.
(Raw data: tests/test_prepare.py; checkpoints: tests/test_checkpoints.py; through the stages:
tests/test_pipeline.py.)"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from models.backbones import build_backbone
from models.unet import UNet, UNetConfig
from runtime.profiles import profile_params, set_overrides
from tasks.artifacts import ArtifactError
from tasks.data import load_manifest, load_split
from tasks.diffusion import Denoiser, export_denoiser, load_denoiser
from tasks.encoder import backbone_from_ssl, export_encoder, load_encoder
from tasks.params import ParamsError, load_params
from tasks.students import load_students
from tasks.vae import load_latents


def params_file(text: str | bytes, stage: str = "ssl") -> None:
    Path("params").mkdir(exist_ok=True)
    path = Path(f"params/{stage}.yaml")
    path.write_bytes(text if isinstance(text, bytes) else text.encode())


@pytest.mark.parametrize(
    "text, message",
    [
        ("train: {epochs: .inf}\n", "params/ssl.yaml: key 'train.epochs' = inf is invalid: Input should be a finite number"),
        ("train: {lr: .nan}\n", "params/ssl.yaml: key 'train.lr' = nan is invalid: Input should be a finite number"),
        ("augment: {crop_scale: [0.3, -.inf]}\n", "key 'augment.crop_scale.1' = -inf is invalid: Input should be a finite number"),
        ("", "params/ssl.yaml: empty; expected the stage's keys (`python -m flows profile default` writes every params file)"),
        ("# only a comment\n", "params/ssl.yaml: empty"),
        ("- 1\n- 2\n", "params/ssl.yaml: expected a mapping of keys to values, got list"),
        ("train: {epochs: 3\n", "params/ssl.yaml: not valid YAML"),
        (b"\xff\xfe\x00garbage", "params/ssl.yaml: not valid YAML"),
        ("seed: !!python/object/apply:os.system [echo ran]\n", "params/ssl.yaml: not valid YAML"),
        ("train: {epochs: 1e400}\n", "key 'train.epochs' = '1e400' is invalid: Input should be a valid number"),
        ("train: 5\n", "key 'train' = 5 is invalid: Input should be a valid dictionary"),
    ],
)
def test_a_bad_params_file_is_refused_naming_file_key_and_value(in_tmp, text, message):
    params_file(text)
    with pytest.raises(ParamsError) as caught:
        load_params("ssl")
    assert message in str(caught.value)


def test_a_params_path_that_is_a_folder_is_refused(in_tmp):
    Path("params/ssl.yaml").mkdir(parents=True)
    with pytest.raises(ParamsError, match="params/ssl.yaml: cannot be read"):
        load_params("ssl")


@pytest.mark.parametrize(
    "override, message",
    [
        ("ssl.seed.x=1", "override 'ssl.seed.x=1': ssl.seed is a value (0), not a section with keys"),
        ("ssl.train.lr=[1,", "override 'ssl.train.lr=[1,': the value '[1,' is not valid YAML"),
        ("ssl.train.epochs=.inf", "key 'train.epochs' = inf is invalid: Input should be a finite number"),
        ("ssl.train.epochs=nan", "key 'train.epochs' = nan is invalid: Input should be a finite number"),
        ("probe.weight_decays=[.nan]", "key 'weight_decays.0' = nan is invalid: Input should be a finite number"),
        ("ssl.train=5", "override 'ssl.train=5': key 'train' = 5 is invalid"),
        ("ssl.nope.x=1", "unknown key 'nope'; allowed keys: backbone, resnet"),
        ("ssl.train.lr", "expected stage.key=value or params/<stage>.yaml:key=value"),
        ("imagenet.size=3", "expected stage.key=value or params/<stage>.yaml:key=value with stage in prepare, ssl"),
        ("ssl.seed=!!python/object/apply:os.system [echo ran]", "is not valid YAML"),
    ],
)
def test_a_bad_override_is_refused_naming_it(override, message):
    with pytest.raises(ParamsError) as caught:
        set_overrides(profile_params("smoke"), [override])
    assert message in str(caught.value)


def test_overrides_are_validated_together_in_any_order():
    both = set_overrides(profile_params("default"), ["ssl.objective=mae", "ssl.backbone=vit"])
    assert (both["ssl"]["objective"], both["ssl"]["backbone"]) == ("mae", "vit")
    with pytest.raises(ParamsError, match="overrides 'ssl.objective=mae', 'ssl.seed=1'.*needs backbone: vit"):
        set_overrides(profile_params("default"), ["ssl.objective=mae", "ssl.seed=1"])


# --- artifacts written by one stage and read by the next ------------------------------------------


@pytest.fixture
def prepared(in_tmp) -> Path:
    """A tiny artifacts/prepare: train split and manifest."""
    folder = Path("artifacts/prepare")
    folder.mkdir(parents=True)
    np.save(folder / "train_images.npy", np.zeros((6, 1, 8, 8), np.uint8))
    np.save(folder / "train_labels.npy", np.arange(6) % 3)
    (folder / "manifest.json").write_text(json.dumps({"image_shape": [1, 8, 8], "class_names": ["a", "b", "c"], "counts": {}}))
    return folder


def test_the_prepared_split_reads_back(prepared):
    split = load_split("train")
    assert split.images.shape == (6, 1, 8, 8) and split.labels.tolist() == [0, 1, 2, 0, 1, 2]


class RunsACommand:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize(
    "spoil, message",
    [
        (lambda f: (f / "train_images.npy").write_bytes((f / "train_images.npy").read_bytes()[:200]),
         "artifacts/prepare/train_images.npy: not a readable .npy array"),
        (lambda f: (f / "train_images.npy").unlink(), "artifacts/prepare/train_images.npy: missing"),
        (lambda f: (f / "train_images.npy").write_text("not numpy"), "artifacts/prepare/train_images.npy: not a readable .npy array"),
        (lambda f: np.save(f / "train_images.npy", np.zeros((6, 64), np.uint8)),
         "artifacts/prepare/train_images.npy: expected a 4-D array of kind 'u', found 2-D uint8"),
        (lambda f: np.save(f / "train_labels.npy", np.zeros(6, np.float32)),
         "artifacts/prepare/train_labels.npy: expected a 1-D array of kind 'iu', found 1-D float32"),
        (lambda f: np.save(f / "train_labels.npy", np.arange(5)), "artifacts/prepare/train_labels.npy: 5 labels for 6 images"),
        (lambda f: np.save(f / "train_labels.npy", np.array([RunsACommand(f / "ran")] * 6, dtype=object), allow_pickle=True),
         "artifacts/prepare/train_labels.npy: not a readable .npy array (Object arrays cannot be loaded when allow_pickle=False)"),
    ],
    ids=["truncated", "missing", "not-npy", "wrong-dims", "float-labels", "count-mismatch", "pickled-objects"],
)
def test_a_spoilt_prepared_split_is_refused_by_name(prepared, spoil, message):
    spoil(prepared)
    with pytest.raises(ArtifactError) as caught:
        load_split("train")
    assert message in str(caught.value)
    assert "`dvc repro prepare` puts back (or rebuilds) what the prepare stage wrote" in str(caught.value)
    assert not (prepared / "ran").exists()


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "artifacts/prepare/manifest.json: not readable JSON"),
        ("[1, 2]", "artifacts/prepare/manifest.json: expected a JSON mapping, found list"),
        ('{"image_shape": [1, 8, 8]}', "artifacts/prepare/manifest.json: missing key(s) class_names, counts"),
    ],
)
def test_a_spoilt_manifest_is_refused_by_name(prepared, text, message):
    (prepared / "manifest.json").write_text(text)
    with pytest.raises(ArtifactError) as caught:
        load_manifest()
    assert message in str(caught.value)


@pytest.fixture
def ssl_state(in_tmp) -> Path:
    """artifacts/ssl as the ssl stage writes it: objective.pt (a state dict) and config.json."""
    folder = Path("artifacts/ssl")
    folder.mkdir(parents=True)
    config = {"name": "resnet", "in_channels": 1, "image_size": 8, "width": 4, "depth": [1], "stem_stride": 1}
    backbone = build_backbone(**config)
    torch.save({f"backbone.{k}": v for k, v in backbone.state_dict().items()}, folder / "objective.pt")
    (folder / "config.json").write_text(json.dumps({"objective": "simclr", "backbone": config}))
    return folder


def test_the_ssl_state_and_the_exported_encoder_read_back(ssl_state):
    backbone, config = backbone_from_ssl(ssl_state)
    export_encoder(backbone, config, Path("artifacts/encoder"))
    assert isinstance(load_encoder("artifacts/encoder"), torch.nn.Module)


def test_a_truncated_or_code_running_ssl_state_is_refused_by_name(ssl_state):
    state = (ssl_state / "objective.pt").read_bytes()
    (ssl_state / "objective.pt").write_bytes(state[: len(state) // 2])
    with pytest.raises(ArtifactError, match=r"artifacts/ssl/objective.pt: does not load with config.json"):
        backbone_from_ssl(ssl_state)
    marker = ssl_state / "ran"
    (ssl_state / "objective.pt").write_bytes(pickle.dumps(RunsACommand(marker)))
    with pytest.raises(ArtifactError, match=r"artifacts/ssl/objective.pt: does not load .*UnpicklingError"):
        backbone_from_ssl(ssl_state)
    assert not marker.exists()
    (ssl_state / "config.json").write_text("{}")
    with pytest.raises(ArtifactError, match=r"artifacts/ssl/config.json: missing key\(s\) backbone"):
        backbone_from_ssl(ssl_state)


def test_a_truncated_encoder_is_refused_by_name(ssl_state):
    export_encoder(*backbone_from_ssl(ssl_state), Path("artifacts/encoder"))
    weights = Path("artifacts/encoder/encoder.safetensors")
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ArtifactError, match=r"artifacts/encoder/encoder.safetensors / encoder.json do not load"):
        load_encoder("artifacts/encoder")


@pytest.fixture
def latents(in_tmp) -> Path:
    folder = Path("artifacts/vae")
    folder.mkdir(parents=True)
    np.save(folder / "train_latents.npy", np.zeros((6, 2, 4, 4), np.float32))
    np.save(folder / "train_labels.npy", np.arange(6) % 3)
    info = {"shift": [0.0, 0.0], "scale": [1.0, 1.0], "num_classes": 3, "latent_shape": [2, 4, 4]}
    (folder / "latents.json").write_text(json.dumps(info))
    return folder


@pytest.mark.parametrize(
    "spoil, message",
    [
        (lambda f: np.save(f / "train_latents.npy", np.zeros((6, 2, 4, 4), np.float32)[:, :1]),
         "artifacts/vae/train_latents.npy: (6, 1, 4, 4) latents do not match 6 labels and latents.json"),
        (lambda f: np.save(f / "train_labels.npy", np.arange(4)),
         "artifacts/vae/train_latents.npy: (6, 2, 4, 4) latents do not match 4 labels"),
        (lambda f: (f / "train_latents.npy").write_bytes((f / "train_latents.npy").read_bytes()[:150]),
         "artifacts/vae/train_latents.npy: not a readable .npy array"),
        (lambda f: (f / "latents.json").write_text('{"shift": [0, 0]}'),
         "artifacts/vae/latents.json: missing key(s) scale, num_classes, latent_shape"),
        (lambda f: (f / "latents.json").write_text('{"shift": [0], "scale": [1], "num_classes": 3, "latent_shape": [2, 4, 4]}'),
         "artifacts/vae/latents.json: shift and scale must hold one number per channel of latent_shape"),
    ],
    ids=["latent-shape", "label-count", "truncated", "info-keys", "info-channels"],
)
def test_spoilt_latents_are_refused_by_name(latents, spoil, message):
    assert len(load_latents(latents).labels) == 6
    spoil(latents)
    with pytest.raises(ArtifactError) as caught:
        load_latents(latents)
    assert message in str(caught.value)
    assert "`dvc repro vae`" in str(caught.value)


def test_a_denoiser_config_without_its_sampling_keys_is_refused_by_name(in_tmp):
    config = UNetConfig(2, 3, channels=8, channel_mults=(1, 2), blocks_per_level=1, attention_heads=2, dropout=0.0)
    denoiser = Denoiser(UNet(config), "flow", "euler", (2, 4, 4), {"time_mean": 0.0, "time_std": 1.0})
    export_denoiser(denoiser, Path("artifacts/diffusion"))
    settings = json.loads(Path("artifacts/diffusion/denoiser.json").read_text())
    del settings["sampler"]
    Path("artifacts/diffusion/denoiser.json").write_text(json.dumps(settings))
    with pytest.raises(ArtifactError, match=r"artifacts/diffusion/denoiser.json: missing key\(s\) sampler; `dvc repro diffusion`"):
        load_denoiser("artifacts/diffusion")


def test_a_spoilt_students_index_is_refused_by_name(in_tmp):
    folder = Path("artifacts/distill")
    folder.mkdir(parents=True)
    (folder / "students.json").write_text('{"method": "reflow"')
    with pytest.raises(ArtifactError, match="artifacts/distill/students.json: not readable JSON"):
        load_students(folder)
