"""Every file the pipeline reads, spoilt: params, overrides, prepared splits, manifest, SSL state,
exported networks, latents, students. Each ends in one error naming the file (and key or value)
and what is allowed or how to get a good one; nothing in it is unpickled or run.
(Raw data: tests/test_prepare.py; checkpoints: tests/test_checkpoints.py; through the stages:
tests/test_pipeline.py.)"""

from __future__ import annotations

import json
import os
import pickle
import shutil
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
from tasks.encoder import backbone_from_ssl, export_encoder, load_embeddings, load_encoder
from tasks.params import ParamsError, load_params
from tasks.students import load_students
from tasks.vae import Latents, LatentScale, load_latents
from tests.conftest import copy_reproduced, empty_store, run
from tests.test_pipeline import snapshot


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
        (lambda f: np.save(f / "train_labels.npy", np.arange(5) % 3), "artifacts/prepare/train_labels.npy: 5 labels for 6 images"),
        (lambda f: np.save(f / "train_labels.npy", np.array([0, 1, 2, 0, 1, 11])),
         "artifacts/prepare/train_labels.npy: 1 label(s) outside [0, 3), e.g. 11; manifest.json says 3 classes"),
        (lambda f: np.save(f / "train_labels.npy", np.array([0, 1, 2, 0, -1, 3])),
         "artifacts/prepare/train_labels.npy: 2 label(s) outside [0, 3), e.g. -1"),
        (lambda f: np.save(f / "train_images.npy", np.zeros((6, 8, 8, 1), np.uint8)),
         "artifacts/prepare/train_images.npy: images of shape [8, 8, 1], but manifest.json says [1, 8, 8] (C, H, W)"),
        (lambda f: np.save(f / "train_labels.npy", np.array([RunsACommand(f / "ran")] * 6, dtype=object), allow_pickle=True),
         "artifacts/prepare/train_labels.npy: not a readable .npy array (Object arrays cannot be loaded when allow_pickle=False)"),
    ],
    ids=["truncated", "missing", "not-npy", "wrong-dims", "float-labels", "count-mismatch", "label-11", "negative-label",
         "channels-last", "pickled-objects"],
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
    with pytest.raises(ArtifactError, match=r"artifacts/encoder/encoder.safetensors: does not load with encoder.json"):
        load_encoder("artifacts/encoder")


@pytest.fixture
def latents(in_tmp) -> Path:
    """artifacts/vae as the vae stage writes it: 6 latents (4 channels of 4x4, each channel its own
    mean), labels of 3 classes, and latents.json with their fitted scale."""
    folder = Path("artifacts/vae")
    folder.mkdir(parents=True)
    means = torch.randn(6, 4, 4, 4, generator=torch.Generator().manual_seed(0)) + torch.tensor([0.0, 3.0, -3.0, 6.0])[:, None, None]
    Latents(means, torch.arange(6) % 3, LatentScale.fit(means), num_classes=3).save(folder)
    return folder


def spoil_array(path: Path, change) -> None:
    np.save(path, change(np.load(path)))


def with_value(index: tuple, value: float):
    def change(array: np.ndarray) -> np.ndarray:
        array[index] = value
        return array
    return change


@pytest.mark.parametrize(
    "spoil, message",
    [
        (lambda f: spoil_array(f / "train_latents.npy", lambda a: a[:, :1]),
         "artifacts/vae/train_latents.npy: shape (6, 1, 4, 4), expected (*, 4, 4, 4) (latents.json's latent_shape (C, h, w))"),
        (lambda f: spoil_array(f / "train_latents.npy", lambda a: np.ascontiguousarray(a.transpose(0, 2, 3, 1))),
         "artifacts/vae/train_latents.npy: its per-channel mean and std are not the shift and scale in latents.json: "
         "latents in another layout (channels last?)"),
        (lambda f: spoil_array(f / "train_latents.npy", with_value((2, 1, 0, 3), np.nan)),
         "artifacts/vae/train_latents.npy: 1 of its 384 values are NaN or infinite"),
        (lambda f: spoil_array(f / "train_latents.npy", with_value((0, 0, 0, slice(None)), -np.inf)),
         "artifacts/vae/train_latents.npy: 4 of its 384 values are NaN or infinite"),
        (lambda f: spoil_array(f / "train_labels.npy", lambda a: a[:4]),
         "artifacts/vae/train_latents.npy: (6, 4, 4, 4) latents do not match 4 labels"),
        (lambda f: spoil_array(f / "train_labels.npy", with_value(5, 3)),
         "artifacts/vae/train_labels.npy: 1 label(s) outside [0, 3), e.g. 3; latents.json says 3 classes"),
        (lambda f: spoil_array(f / "train_labels.npy", lambda a: a + 11),
         "artifacts/vae/train_labels.npy: 6 label(s) outside [0, 3), e.g. 11"),
        (lambda f: (f / "train_latents.npy").write_bytes((f / "train_latents.npy").read_bytes()[:150]),
         "artifacts/vae/train_latents.npy: not a readable .npy array"),
        (lambda f: (f / "latents.json").write_text('{"shift": [0, 0]}'),
         "artifacts/vae/latents.json: missing key(s) scale, num_classes, latent_shape"),
        (lambda f: (f / "latents.json").write_text('{"shift": [0], "scale": [1], "num_classes": 3, "latent_shape": [4, 4, 4]}'),
         "artifacts/vae/latents.json: shift and scale must hold one number per channel of latent_shape"),
        (lambda f: (f / "latents.json").write_text('{"shift": [0], "scale": [1], "num_classes": 0, "latent_shape": [1, 4, 4]}'),
         "artifacts/vae/latents.json: num_classes must be a positive integer, found 0"),
        (lambda f: (f / "latents.json").write_text('{"shift": [0], "scale": [1], "num_classes": 3, "latent_shape": [1, 16]}'),
         "artifacts/vae/latents.json: latent_shape must be [channels, height, width], found [1, 16]"),
    ],
    ids=["latent-shape", "channels-last", "nan", "inf", "label-count", "null-class-label", "label-11", "truncated",
         "info-keys", "info-channels", "info-classes", "info-shape"],
)
def test_spoilt_latents_are_refused_by_name(latents, spoil, message):
    assert len(load_latents(latents).labels) == 6
    spoil(latents)
    with pytest.raises(ArtifactError) as caught:
        load_latents(latents)
    assert message in str(caught.value)
    assert "`dvc repro vae`" in str(caught.value)


@pytest.mark.parametrize(
    "spoil, message",
    [
        (with_value((1, 0), np.nan), "artifacts/encoder/val_embeddings.npy: 1 of its 15 values are NaN or infinite"),
        (lambda a: a[:2], "artifacts/encoder/val_embeddings.npy: shape (2, 5), expected (3, *) (one row per image of the prepared val split)"),
        (lambda a: a[0], "artifacts/encoder/val_embeddings.npy: expected a 2-D array of kind 'f', found 1-D float32"),
    ],
    ids=["nan", "rows", "dims"],
)
def test_spoilt_embeddings_are_refused_by_name(in_tmp, spoil, message):
    folder = Path("artifacts/encoder")
    folder.mkdir(parents=True)
    np.save(folder / "val_embeddings.npy", np.ones((3, 5), np.float32))
    assert load_embeddings(folder, "val", 3).shape == (3, 5)
    spoil_array(folder / "val_embeddings.npy", spoil)
    with pytest.raises(ArtifactError) as caught:
        load_embeddings(folder, "val", 3)
    assert message in str(caught.value) and "`dvc repro encoder`" in str(caught.value)


def test_a_denoiser_config_without_its_sampling_keys_is_refused_by_name(in_tmp):
    config = UNetConfig(2, 3, channels=8, channel_mults=(1, 2), blocks_per_level=1, attention_heads=2, dropout=0.0,
                        cross_attention_levels=())
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


# --- through the door: a spoilt file between two stages of a smoke run ---------------------------


@pytest.fixture(scope="module")
def spoilable(smoke_snapshot, tmp_path_factory) -> Path:
    """A copy of the session's smoke run for this module's spoilt files (each test puts its file back)."""
    return copy_reproduced(smoke_snapshot, tmp_path_factory.mktemp("spoilable") / "repo")


@pytest.mark.slow
@pytest.mark.parametrize(
    "spoilt, change, stage, message",
    [
        ("artifacts/prepare/train_labels.npy", with_value(0, 11), "vae",
         "artifacts/prepare/train_labels.npy: 1 label(s) outside [0, 10), e.g. 11; manifest.json says 10 classes"),
        ("artifacts/encoder/test_embeddings.npy", with_value((3, 1), np.nan), "probe",
         "artifacts/encoder/test_embeddings.npy: 1 of its"),
        ("artifacts/vae/train_labels.npy", lambda a: np.full_like(a, 10), "diffusion",
         "label(s) outside [0, 10), e.g. 10; latents.json says 10 classes"),
        ("artifacts/vae/train_latents.npy", with_value((0, 0, 0, 0), np.nan), "diffusion",
         "artifacts/vae/train_latents.npy: 1 of its"),
        ("artifacts/vae/train_latents.npy", lambda a: np.ascontiguousarray(a.transpose(0, 2, 3, 1)), "gan",
         "artifacts/vae/train_latents.npy: its per-channel mean and std are not the shift and scale in latents.json"),
        ("artifacts/ssl/objective.pt", None, "encoder", "artifacts/ssl/objective.pt: does not load"),
        ("artifacts/prepare/train_labels.npy", with_value(0, 11), "kd",  # what its cnn teacher and students train on
         "artifacts/prepare/train_labels.npy: 1 label(s) outside [0, 10), e.g. 11; manifest.json says 10 classes"),
        ("artifacts/vae/vae.safetensors", None, "distill", "artifacts/vae/vae.safetensors: does not load"),
        ("artifacts/diffusion/denoiser.safetensors", None, "distill",
         "artifacts/diffusion/denoiser.safetensors: does not load"),
        ("artifacts/distill/students.json", None, "fid", "artifacts/distill/students.json: not readable JSON"),
        ("artifacts/gan/generator.safetensors", None, "fid", "artifacts/gan/generator.safetensors: does not load"),
    ],
    ids=["label-11-to-vae", "nan-embeddings-to-probe", "null-class-labels-to-diffusion", "nan-latents-to-diffusion",
         "channels-last-latents-to-gan", "ssl-state-to-encoder", "label-11-to-kd", "vae-to-distill",
         "denoiser-to-distill", "students-to-fid", "generator-to-fid"],
)
def test_a_spoilt_file_between_two_stages_stops_the_next_naming_it_and_its_writer(
    spoilable, tmp_path, spoilt, change, stage, message,
):
    """`dvc repro --single-item <stage>` after another stage's output was spoilt: the stage exits 2
    with one message naming the file and the stage that writes it, no traceback, and its last
    good outputs in place."""
    repo = spoilable
    outputs = (f"metrics/{stage}.json", f"plots/{stage}", f"artifacts/{stage}")
    good, before = (repo / spoilt).read_bytes(), snapshot(repo, *outputs)
    try:
        if change is None:  # cut short, as a full disk or a killed copy would leave it
            (repo / spoilt).write_bytes(good[: len(good) // 2])
        else:
            spoil_array(repo / spoilt, change)
        done = run(["dvc", "repro", "--single-item", stage], repo, check=False,  # tracked apart from the shared run
                   MLFLOW_TRACKING_URI=empty_store(tmp_path / "mlflow.db"))
        after = snapshot(repo, *outputs)
    finally:
        (repo / spoilt).write_bytes(good)
        restore(repo, before, outputs)  # the module's other tests share this run
    writer = spoilt.split("/")[1]
    assert done.returncode != 0 and "exited with 2" in done.stderr, done.stderr[-3000:]
    assert done.stderr.count(message) == 1, done.stderr[-3000:]
    assert f"`dvc repro {writer}`" in done.stderr and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert after == before
    assert json.loads(run(["dvc", "status", "--json"], repo).stdout) == {}


def restore(repo: Path, files: dict[str, bytes], outputs: tuple[str, ...]) -> None:
    """Put `outputs` back as `files` (a `snapshot` of them) were."""
    for output in outputs:
        path = repo / output
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    for name, data in files.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_bytes(data)
