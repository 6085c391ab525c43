"""The prepare stage on real data: digits, MNIST from ../shared, image folders, and bad data."""

import gzip
import hashlib
import io
import os
import pickle
import shutil
import struct
import sys
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tasks.artifacts import file_digest
from tasks.datasets import DataError, fetch, load_source, read_cifar10, read_idx, read_idx_source
from tasks.params import validate
from tasks.prepare import make_splits, write_splits
from tests.conftest import MNIST, run

needs_mnist = pytest.mark.skipif(not MNIST.is_dir(), reason="../shared/datasets/mnist is not beside the repo")


def prepare_params(**values):
    return validate("prepare", values)


def test_digits_split_is_stratified_complete_and_seeded():
    params = prepare_params(image_size=16)
    raw = load_source("digits", Path("unused"), download=False, channels=None, size=28, fit="resize")
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
    raw = load_source("mnist", root, download=False, channels=None, size=28, fit="resize")
    assert raw.images.shape == (60000, 1, 28, 28) and raw.test_images.shape == (10000, 1, 28, 28)
    splits = make_splits(raw, params)
    assert {name: len(labels) for name, (_, labels) in splits.items()} == {"train": 270, "val": 30, "test": 300}
    train_images = splits["train"][0]
    assert train_images.shape[1:] == (1, 32, 32)
    assert train_images[:, :, :2].max() == 0 and train_images[:, :, :, -2:].max() == 0  # zero padding
    assert train_images.mean() > 20  # real strokes, not an empty canvas


@needs_mnist
def test_full_mnist_prepares_and_loads_back(tmp_path):
    started = time.perf_counter()
    raw = load_source("mnist", MNIST, download=False, channels=None, size=28, fit="resize")
    splits = make_splits(raw, prepare_params(source="mnist", image_size=32, fit="pad"))
    write_splits(splits, tmp_path)
    prepare_seconds = time.perf_counter() - started
    started = time.perf_counter()
    images = np.load(tmp_path / "train_images.npy")
    load_seconds = time.perf_counter() - started
    assert images.shape[1:] == (1, 32, 32) and abs(len(images) - 54000) <= 10  # per-class rounding
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
    raw = load_source("folder", tmp_path / "shapes", download=False, channels=1, size=16, fit="resize")
    assert raw.class_names == ["circle", "square"] and raw.images.shape == (21, 1, 16, 16)
    splits = make_splits(raw, prepare_params(source="folder", image_size=16, channels=1))
    assert splits["train"][0].shape[1:] == (1, 16, 16)
    assert sum(len(labels) for _, labels in splits.values()) == 21
    padded = load_source("folder", tmp_path / "shapes", download=False, channels=3, size=14, fit="pad")
    assert padded.images.shape == (21, 3, 14, 14) and not padded.images[:, :, :, :2].any()  # 10 wide, centred
    with pytest.raises(DataError, match=r"circle/0.png: images are 12x10, larger than image_size 8; use fit: resize"):
        load_source("folder", tmp_path / "shapes", download=False, channels=3, size=8, fit="pad")


PEAK_MEMORY = """
import resource, sys
from pathlib import Path
from tasks.datasets import load_source
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
raw = load_source("folder", Path(sys.argv[1]), download=False, channels=3, size=32, fit="resize")
print(raw.images.shape, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


@pytest.mark.slow  # a process of its own, whose peak memory it reads
def test_a_large_image_in_a_folder_costs_memory_for_its_own_decoding_only(tmp_path):
    """Each image is brought to image_size as it is read: one 4000x4000 PNG among 60 small ones
    costs about one decoded copy of it (48 MB, 192 MB as floats while resized), not 61."""
    write_pngs(tmp_path / "f", {"a": 30, "b": 30}, size=(40, 30))
    Image.new("RGB", (4000, 4000), (200, 30, 90)).save(tmp_path / "f" / "a" / "large.png")
    done = run([sys.executable, "-c", PEAK_MEMORY, str(tmp_path / "f")], Path(__file__).resolve().parents[1])
    shape, peak_mib = done.stdout.rsplit(" ", 1)
    assert shape == "(61, 3, 32, 32)"
    assert int(peak_mib) < 400, f"peak memory grew by {peak_mib} MiB while reading the folder"


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels (8-bit RGB) and holds no image data."""
    body = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", body) + png_chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [20000, 10000])  # over twice PIL's limit (an error there), and over it (a warning)
def test_a_decompression_bomb_in_a_folder_is_refused_naming_file_and_limit(tmp_path, side):
    write_pngs(tmp_path / "f", {"a": 3, "b": 3})
    (tmp_path / "f" / "b" / "bomb.png").write_bytes(png_header(side, side))
    with pytest.raises(DataError) as caught:
        load_source("folder", tmp_path / "f", download=False, channels=3, size=16, fit="resize")
    message = str(caught.value)
    assert f"f/b/bomb.png: refused as a possible decompression bomb: Image size ({side * side} pixels) exceeds limit" in message
    assert f"Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS} pixels" in message


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
    raw = load_source("mnist", root, download=False, channels=None, size=28, fit="resize")  # the default dataset, offline
    assert raw.images.shape == (60000, 1, 28, 28) and raw.test_images.shape == (10000, 1, 28, 28)
    write_idx(root / "t10k-labels-idx1-ubyte.gz", np.arange(10000) % 10)  # well-formed, but not MNIST's
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.gz: MD5 [0-9a-f]{32} is not the published mnist t10k-labels-idx1-ubyte.gz"):
        load_source("mnist", root, download=False, channels=None, size=28, fit="resize")


def test_truncated_gz_is_refused(tmp_path):
    root = fake_mnist(tmp_path / "m")
    data = (root / "train-images-idx3-ubyte.gz").read_bytes()
    (root / "train-images-idx3-ubyte.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: not a readable .gz file"):
        read_idx_source("mnist", root)


def test_wrong_idx_magic_is_refused(tmp_path):
    root = fake_mnist(tmp_path / "m")
    write_idx(root / "train-images-idx3-ubyte.gz", np.zeros((50, 28, 28)), magic=0x00000D03)
    with pytest.raises(DataError, match="wrong IDX magic number 0x00000d03"):
        read_idx_source("mnist", root)


def test_idx_body_shorter_than_its_header_is_refused(tmp_path):
    path = tmp_path / "x.gz"
    with gzip.open(path, "wb") as handle:
        handle.write(struct.pack(">HBBI", 0, 8, 1, 100) + bytes(10))
    with pytest.raises(DataError, match="header says"):
        read_idx(path)


def test_image_label_count_mismatch_is_refused(tmp_path):
    root = fake_mnist(tmp_path / "m", n_train=50, n_labels=40)
    with pytest.raises(DataError, match="50 images in train-images-idx3-ubyte.gz but 40 labels"):
        read_idx_source("mnist", root)


def test_unreadable_image_is_named(tmp_path):
    write_pngs(tmp_path / "f", {"a": 5, "b": 5})
    (tmp_path / "f" / "b" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"b/broken.png: unreadable image"):
        load_source("folder", tmp_path / "f", download=False, channels=3, size=16, fit="resize")


def test_empty_class_folder_is_refused(tmp_path):
    write_pngs(tmp_path / "f", {"a": 5})
    (tmp_path / "f" / "empty").mkdir()
    with pytest.raises(DataError, match="empty: empty class folder"):
        load_source("folder", tmp_path / "f", download=False, channels=3, size=16, fit="resize")


def test_too_few_images_for_the_split_is_refused(tmp_path):
    write_pngs(tmp_path / "f", {"a": 5, "rare": 2})
    raw = load_source("folder", tmp_path / "f", download=False, channels=3, size=16, fit="resize")
    with pytest.raises(DataError, match="class 'rare' has 2 image"):
        make_splits(raw, prepare_params(source="folder"))


def test_missing_files_offline_name_the_folder_to_fill(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path / 'empty'}: missing train-images-idx3-ubyte.gz"):
        load_source("fashion_mnist", tmp_path / "empty", download=False, channels=None, size=28, fit="resize")


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


@pytest.mark.slow
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


@pytest.mark.slow
def test_stage_on_bad_data_fails_clearly_and_leaves_nothing(tmp_path, prefect_api):
    root = fake_mnist(tmp_path / "data" / "raw" / "mnist", n_train=50, n_labels=40)
    cwd = stage_dir(tmp_path, source="mnist", root=str(root), download=False)
    done = run([sys.executable, "-m", "flows.prepare"], cwd, check=False)
    assert done.returncode == 2
    assert f"{root / 'train-images-idx3-ubyte.gz'}: MD5" in done.stderr
    assert "is not the published mnist train-images-idx3-ubyte.gz" in done.stderr
    assert "Traceback" not in done.stderr
    for output in ("artifacts", "metrics", "plots"):
        leftovers = [p for p in (cwd / output).rglob("*") if p.is_file()] if (cwd / output).exists() else []
        assert leftovers == [], output


def test_files_already_on_disk_must_match_their_published_md5(tmp_path):
    root = fake_mnist(tmp_path / "m")
    with pytest.raises(DataError) as caught:
        load_source("mnist", root, download=False, channels=None, size=28, fit="resize")
    message = str(caught.value)
    assert message.startswith(f"{root / 'train-images-idx3-ubyte.gz'}: MD5 ")
    assert "f68b3c2dcbeaaa9fbdd348bbdeb94873, or 6bbc9ace898e44ae57da46a324031adb uncompressed" in message
    assert "replace it with the original" in message


@needs_mnist
def test_a_recompressed_original_passes_and_a_changed_byte_does_not(tmp_path):
    root = tmp_path / "mnist"
    shutil.copytree(MNIST, root)
    labels = root / "t10k-labels-idx1-ubyte.gz"
    content = gzip.decompress(labels.read_bytes())
    labels.write_bytes(gzip.compress(content, compresslevel=1))  # other bytes, same content
    assert load_source("mnist", root, download=False, channels=None, size=28, fit="resize").test_labels.shape == (10000,)
    labels.write_bytes(gzip.compress(content[:-1] + bytes([(content[-1] + 1) % 10])))
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz: MD5 .* is not the published mnist"):
        load_source("mnist", root, download=False, channels=None, size=28, fit="resize")


def cifar_batch(rows: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {b"batch_label": b"batch", b"data": rng.integers(0, 256, (rows, 3072), dtype=np.uint8),
            b"labels": [int(x) for x in rng.integers(0, 10, rows)], b"filenames": [b"x.png"] * rows}


def cifar_tarball(root: Path, batches: dict[str, object]) -> Path:
    """A cifar-10-python.tar.gz holding `batches` ({member name: object}) pickled as the original
    (protocol 2)."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, batch in batches.items():
            data = pickle.dumps(batch, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_cifar10_batches_are_read_without_unpickling_code(tmp_path):
    batches = {f"data_batch_{i}": cifar_batch(6, i) for i in range(1, 6)} | {"test_batch": cifar_batch(4, 9)}
    cifar_tarball(tmp_path, batches)
    raw = read_cifar10(tmp_path)
    assert raw.images.shape == (30, 3, 32, 32) and raw.images.dtype == np.uint8 and raw.test_images.shape == (4, 3, 32, 32)
    assert np.array_equal(raw.images[:6].reshape(6, -1), batches["data_batch_1"][b"data"])
    assert raw.labels.tolist()[:6] == batches["data_batch_1"][b"labels"]


class RunsACommand:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_a_crafted_cifar10_tarball_is_refused_and_its_payload_never_runs(tmp_path):
    marker = tmp_path / "payload-ran"
    batches = {f"data_batch_{i}": cifar_batch(2, i) for i in range(1, 6)} | {"test_batch": cifar_batch(2, 9)}
    batches["data_batch_3"] = {b"data": RunsACommand(f"touch {marker}"), b"labels": [0, 1]}
    path = cifar_tarball(tmp_path / "cifar10", batches)
    with pytest.raises(DataError) as caught:
        read_cifar10(path.parent)
    assert str(caught.value).startswith(f"{path}: cifar-10-batches-py/data_batch_3 is not a CIFAR-10 batch")
    assert "posix.system" in str(caught.value) and "nothing in it was run" in str(caught.value)
    with pytest.raises(DataError, match=f"{path}: MD5 .* is not the published cifar10 cifar-10-python.tar.gz"):
        load_source("cifar10", path.parent, download=False, channels=None, size=28, fit="resize")  # the checksum refuses it first
    assert not marker.exists()


@pytest.mark.parametrize(
    "batch, complaint",
    [
        ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, "b'data' is not a uint8 array"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 12]}, "b'labels' is not one class 0-9 per row"),
        ({b"data": np.zeros((2, 3072), np.uint8)}, "expected a mapping with b'data' and b'labels'"),
        ([1, 2, 3], "expected a mapping"),
    ],
)
def test_a_cifar10_batch_of_the_wrong_shape_is_refused_by_name(tmp_path, batch, complaint):
    batches = {f"data_batch_{i}": cifar_batch(2, i) for i in range(1, 6)} | {"test_batch": batch}
    path = cifar_tarball(tmp_path, batches)
    with pytest.raises(DataError, match=f"{path}: cifar-10-batches-py/test_batch is not a CIFAR-10 batch"):
        read_cifar10(tmp_path)
    with pytest.raises(DataError) as caught:
        read_cifar10(tmp_path)
    assert complaint in str(caught.value)


def test_a_truncated_cifar10_tarball_is_refused_by_name(tmp_path):
    path = cifar_tarball(tmp_path, {f"data_batch_{i}": cifar_batch(50, i) for i in range(1, 6)})
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(DataError, match=f"{path}: not a readable CIFAR-10 python tarball"):
        read_cifar10(tmp_path)
