"""The prepare stage on real data: digits, MNIST from ../shared, image folders, and bad data."""

import gzip
import hashlib
import shutil
import struct
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tasks.artifacts import file_digest
from tasks.datasets import DataError, fetch, load_source, read_idx
from tasks.params import validate
from tasks.prepare import make_splits, write_splits
from tests.conftest import MNIST, run

needs_mnist = pytest.mark.skipif(not MNIST.is_dir(), reason="../shared/datasets/mnist is not beside the repo")


def prepare_params(**values):
    return validate("prepare", values)


def test_digits_split_is_stratified_complete_and_seeded():
    params = prepare_params(image_size=16)
    raw = load_source("digits", Path("unused"), download=False, channels=None)
    splits = make_splits(raw, params)
    counts = {name: len(labels) for name, (_, labels) in splits.items()}
    assert sum(counts.values()) == 1797
    assert counts["test"] == pytest.approx(0.2 * 1797, abs=10) and counts["val"] == pytest.approx(0.1 * 1797, abs=10)
    for images, labels in splits.values():
        assert images.dtype == np.uint8 and images.shape[1:] == (1, 16, 16)
        assert set(labels.tolist()) == set(range(10))  # every class in every split
    again = make_splits(raw, params)
    assert all(np.array_equal(splits[s][1], again[s][1]) and np.array_equal(splits[s][0], again[s][0]) for s in splits)
    other = make_splits(raw, prepare_params(image_size=16, seed=1))
    assert not np.array_equal(splits["test"][0], other["test"][0])


@needs_mnist
def test_mnist_subset_from_shared_uses_the_official_test_split(tmp_path):
    root = tmp_path / "mnist"
    shutil.copytree(MNIST, root)
    params = prepare_params(source="mnist", image_size=32, fit="pad", limit_per_class=30, download=False)
    raw = load_source("mnist", root, download=False, channels=None)
    assert raw.images.shape == (60000, 1, 28, 28) and raw.test_images.shape == (10000, 1, 28, 28)
    splits = make_splits(raw, params)
    assert {name: len(labels) for name, (_, labels) in splits.items()} == {"train": 270, "val": 30, "test": 300}
    train_images = splits["train"][0]
    assert train_images.shape[1:] == (1, 32, 32)
    assert train_images[:, :, :2].max() == 0 and train_images[:, :, :, -2:].max() == 0  # zero padding
    assert train_images.mean() > 20  # real strokes, not an empty canvas


@needs_mnist
def test_full_mnist_prepares_fast_and_loads_in_well_under_a_second(tmp_path):
    started = time.perf_counter()
    raw = load_source("mnist", MNIST, download=False, channels=None)
    splits = make_splits(raw, prepare_params(source="mnist", image_size=32, fit="pad"))
    write_splits(splits, tmp_path)
    prepare_seconds = time.perf_counter() - started
    started = time.perf_counter()
    images = np.load(tmp_path / "train_images.npy")
    load_seconds = time.perf_counter() - started
    assert images.shape[1:] == (1, 32, 32) and abs(len(images) - 54000) <= 10  # per-class rounding
    assert load_seconds < 0.5, load_seconds
    print(f"full MNIST: prepare {prepare_seconds:.1f} s, load train split {load_seconds * 1000:.0f} ms")


def write_pngs(root: Path, classes: dict[str, int], size=(12, 10)) -> None:
    rng = np.random.default_rng(0)
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")


def test_folder_source_reads_classes_resizes_and_converts(tmp_path):
    write_pngs(tmp_path / "shapes", {"circle": 12, "square": 9})
    raw = load_source("folder", tmp_path / "shapes", download=False, channels=None)
    assert raw.class_names == ["circle", "square"] and raw.images.shape == (21, 3, 12, 10)
    splits = make_splits(raw, prepare_params(source="folder", image_size=16, channels=1))
    assert splits["train"][0].shape[1:] == (1, 16, 16)
    assert sum(len(labels) for _, labels in splits.values()) == 21


def write_idx(path: Path, array: np.ndarray, magic: int | None = None) -> None:
    header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    if magic is not None:
        header = struct.pack(">I", magic) + header[4:]
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def fake_mnist(root: Path, n_train=50, n_labels=50) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    write_idx(root / "train-images-idx3-ubyte.gz", np.zeros((n_train, 28, 28)))
    write_idx(root / "train-labels-idx1-ubyte.gz", np.arange(n_labels) % 10)
    write_idx(root / "t10k-images-idx3-ubyte.gz", np.zeros((20, 28, 28)))
    write_idx(root / "t10k-labels-idx1-ubyte.gz", np.arange(20) % 10)
    return root


SHIPPED_MNIST = Path(__file__).resolve().parents[1] / "data" / "raw" / "mnist"


def test_shipped_mnist_verifies_and_a_replaced_file_is_named(tmp_path):
    root = tmp_path / "mnist"
    shutil.copytree(SHIPPED_MNIST, root)
    raw = load_source("mnist", root, download=False, channels=None)  # the default dataset, offline
    assert raw.images.shape == (60000, 1, 28, 28) and raw.test_images.shape == (10000, 1, 28, 28)
    write_idx(root / "t10k-labels-idx1-ubyte.gz", np.arange(10000) % 10)  # well-formed, but not MNIST's
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.gz: sha256 [0-9a-f]{64} does not match .* in .*SHA256SUMS"):
        load_source("mnist", root, download=False, channels=None)


def test_truncated_gz_is_refused(tmp_path):
    root = fake_mnist(tmp_path / "m")
    data = (root / "train-images-idx3-ubyte.gz").read_bytes()
    (root / "train-images-idx3-ubyte.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: not a readable .gz file"):
        load_source("mnist", root, download=False, channels=None)


def test_wrong_idx_magic_is_refused(tmp_path):
    root = fake_mnist(tmp_path / "m")
    write_idx(root / "train-images-idx3-ubyte.gz", np.zeros((50, 28, 28)), magic=0x00000D03)
    with pytest.raises(DataError, match="wrong IDX magic number 0x00000d03"):
        load_source("mnist", root, download=False, channels=None)


def test_idx_body_shorter_than_its_header_is_refused(tmp_path):
    path = tmp_path / "x.gz"
    with gzip.open(path, "wb") as handle:
        handle.write(struct.pack(">HBBI", 0, 8, 1, 100) + bytes(10))
    with pytest.raises(DataError, match="header says"):
        read_idx(path)


def test_image_label_count_mismatch_is_refused(tmp_path):
    root = fake_mnist(tmp_path / "m", n_train=50, n_labels=40)
    with pytest.raises(DataError, match="50 images in train-images-idx3-ubyte.gz but 40 labels"):
        load_source("mnist", root, download=False, channels=None)


def test_unreadable_image_is_named(tmp_path):
    write_pngs(tmp_path / "f", {"a": 5, "b": 5})
    (tmp_path / "f" / "b" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"b/broken.png: unreadable image"):
        load_source("folder", tmp_path / "f", download=False, channels=3)


def test_empty_class_folder_is_refused(tmp_path):
    write_pngs(tmp_path / "f", {"a": 5})
    (tmp_path / "f" / "empty").mkdir()
    with pytest.raises(DataError, match="empty: empty class folder"):
        load_source("folder", tmp_path / "f", download=False, channels=3)


def test_too_few_images_for_the_split_is_refused(tmp_path):
    write_pngs(tmp_path / "f", {"a": 5, "rare": 2})
    raw = load_source("folder", tmp_path / "f", download=False, channels=3)
    with pytest.raises(DataError, match="class 'rare' has 2 image"):
        make_splits(raw, prepare_params(source="folder"))


def test_missing_files_offline_name_the_folder_to_fill(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path / 'empty'}: missing train-images-idx3-ubyte.gz"):
        load_source("fashion_mnist", tmp_path / "empty", download=False, channels=None)


def test_download_keeps_only_files_whose_checksum_matches(tmp_path):
    served = tmp_path / "mirror" / "file.bin"
    served.parent.mkdir()
    served.write_bytes(b"payload")
    good = hashlib.md5(b"payload").hexdigest()
    with pytest.raises(DataError, match="checksum mismatch"):
        fetch(served.as_uri(), tmp_path / "out" / "file.bin", "0" * 32)
    assert not (tmp_path / "out" / "file.bin").exists() and not list((tmp_path / "out").iterdir())
    fetch(served.as_uri(), tmp_path / "out" / "file.bin", good)
    assert (tmp_path / "out" / "file.bin").read_bytes() == b"payload"


def stage_dir(tmp_path: Path, **params) -> Path:
    (tmp_path / "params").mkdir()
    (tmp_path / "params" / "prepare.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


def test_stage_writes_manifest_with_checksums_grid_and_metrics(tmp_path, prefect_api):
    cwd = stage_dir(tmp_path, source="digits", image_size=8, limit_per_class=40)
    run([sys.executable, "-m", "flows.prepare"], cwd)
    out = cwd / "artifacts" / "prepare"
    manifest = yaml.safe_load((out / "manifest.json").read_text())
    assert manifest["image_shape"] == [1, 8, 8] and len(manifest["class_names"]) == 10
    assert sum(sum(c.values()) for c in manifest["counts"].values()) == 400
    for name, digest in manifest["sha256"].items():
        assert file_digest(out / name) == digest
    assert (cwd / "plots" / "prepare" / "samples.png").stat().st_size > 500
    metrics = yaml.safe_load((cwd / "metrics" / "prepare.json").read_text())
    assert metrics["train_images"] + metrics["val_images"] + metrics["test_images"] == 400


def test_stage_on_bad_data_fails_clearly_and_leaves_nothing(tmp_path, prefect_api):
    root = fake_mnist(tmp_path / "data" / "raw" / "mnist", n_train=50, n_labels=40)
    cwd = stage_dir(tmp_path, source="mnist", root=str(root), download=False)
    done = run([sys.executable, "-m", "flows.prepare"], cwd, check=False)
    assert done.returncode == 2
    assert "50 images in train-images-idx3-ubyte.gz but 40 labels" in done.stderr
    for output in ("artifacts", "metrics", "plots"):
        leftovers = [p for p in (cwd / output).rglob("*") if p.is_file()] if (cwd / output).exists() else []
        assert leftovers == [], output
