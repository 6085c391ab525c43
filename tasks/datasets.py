"""Raw dataset sources: scikit-learn digits, IDX (MNIST, Fashion-MNIST), CIFAR-10, image folders.

Each reader returns `RawDataset` with uint8 (N, C, H, W) images; sources that ship a test
split return it separately. Missing files are fetched from the canonical mirrors (when
allowed and online); every file, fetched or already there, must match its published MD5.
Nothing read runs code: CIFAR-10's pickled batches go through an unpickler that builds only
containers, bytes and uint8 arrays.
"""

from __future__ import annotations

import gzip
import hashlib
import pickle
import struct
import tarfile
import urllib.request
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tasks.artifacts import file_digest
from tasks.errors import StageError


class DataError(StageError, ValueError):
    """Raw data that cannot be read; the message names the file and what is wrong."""


@dataclass
class RawDataset:
    images: np.ndarray  # uint8 (N, C, H, W)
    labels: np.ndarray  # int64 (N,)
    class_names: list[str]
    test_images: np.ndarray | None = None  # the source's own test split, when it has one
    test_labels: np.ndarray | None = None


@dataclass(frozen=True)
class RemoteFile:
    name: str
    md5: str  # published checksum of the file as served
    content_md5: str | None = None  # published checksum of its gunzipped content (a .gz compressed again still matches)


IDX_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")

MIRRORS: dict[str, tuple[list[str], list[RemoteFile]]] = {
    "mnist": (
        ["https://ossci-datasets.s3.amazonaws.com/mnist/", "https://yann.lecun.com/exdb/mnist/"],
        [
            RemoteFile("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873", "6bbc9ace898e44ae57da46a324031adb"),
            RemoteFile("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432", "a25bea736e30d166cdddb491f175f624"),
            RemoteFile("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3", "2646ac647ad5339dbf082846283269ea"),
            RemoteFile("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c", "27ae3e4e09519cfbb04c329615203637"),
        ],
    ),
    "fashion_mnist": (
        ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
        [
            RemoteFile("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d", "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
            RemoteFile("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe", "9018921c3c673c538a1fc5bad174d6f9"),
            RemoteFile("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79", "8181f5470baa50b63fa0f6fddb340f0a"),
            RemoteFile("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310", "15d484375f8d13e6eb1aabb0c3f46965"),
        ],
    ),
    "cifar10": (
        ["https://www.cs.toronto.edu/~kriz/"],
        [RemoteFile("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a")],
    ),
}

CLASS_NAMES = {
    "digits": [str(i) for i in range(10)],
    "mnist": [str(i) for i in range(10)],
    "fashion_mnist": ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"],
    "cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
}

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


def fetch(url: str, dest: Path, md5: str, timeout: float = 30) -> None:
    """Download `url` to `dest` via a temporary file, keeping it only if its MD5 matches."""
    tmp = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
            while block := response.read(1 << 20):
                out.write(block)
        got = file_digest(tmp, "md5")
        if got != md5:
            raise DataError(f"{url}: checksum mismatch (md5 {got}, published {md5}); the file was not kept")
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)


def fetch_missing(source: str, root: Path, download: bool) -> None:
    """Download a file source's missing files (when allowed), and check every one is the published file."""
    if source in MIRRORS:
        ensure_files(source, root, download)


def ensure_files(source: str, root: Path, download: bool) -> None:
    """Make sure the source's files are in `root` (downloading the missing ones if allowed) and are
    the published ones."""
    mirrors, files = MIRRORS[source]
    missing = [f for f in files if not (root / f.name).exists()]
    for remote in files:
        if remote not in missing:
            verify(root / remote.name, remote, source, download)
    if not missing:
        return
    names = ", ".join(f.name for f in missing)
    if not download:
        raise DataError(f"{root}: missing {names}; put them there, or set download: true in params/prepare.yaml")
    for remote in missing:
        errors = []
        for mirror in mirrors:
            try:
                fetch(mirror + remote.name, root / remote.name, remote.md5)
                break
            except OSError as err:  # offline, DNS failure, HTTP error
                errors.append(f"{mirror}: {err}")
        else:
            raise DataError(
                f"{root}: missing {remote.name} and it could not be downloaded ({'; '.join(errors)}). "
                f"Offline? Copy the {source} files ({names}) into {root}."
            )


_VERIFIED: set[tuple[str, int, int]] = set()  # (path, size, mtime) checked in this process


def verify(path: Path, remote: RemoteFile, source: str, download: bool) -> None:
    """Refuse a file on disk that is not the published one: its MD5 must match, or for a .gz
    compressed again, the MD5 of its content."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _VERIFIED:
        return
    got = file_digest(path, "md5")
    if got == remote.md5 or (remote.content_md5 is not None and gunzipped_md5(path) == remote.content_md5):
        _VERIFIED.add(key)
        return
    again = "delete it and rerun (download: true fetches it again)" if download else "replace it with the original"
    raise DataError(
        f"{path}: MD5 {got} is not the published {source} {remote.name} (MD5 {remote.md5}"
        f"{f', or {remote.content_md5} uncompressed' if remote.content_md5 else ''}); the file is corrupt or "
        f"another one: {again}"
    )


def gunzipped_md5(path: Path) -> str | None:
    """MD5 of a gzip file's content (None when it does not decompress)."""
    digest = hashlib.md5()
    try:
        with gzip.open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except (OSError, EOFError, zlib.error):
        return None
    return digest.hexdigest()


def read_idx(path: Path) -> np.ndarray:
    """Read a gzipped IDX file (unsigned bytes) into an array, checking its header against its size."""
    try:
        with gzip.open(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise DataError(f"{path}: not a readable .gz file ({err})") from None
    if len(data) < 4:
        raise DataError(f"{path}: too short to be an IDX file")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08 or ndim not in (1, 3):
        magic = int.from_bytes(data[:4], "big")
        raise DataError(f"{path}: wrong IDX magic number 0x{magic:08x} (expected 0x00000801 or 0x00000803)")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = data[4 + 4 * ndim :]
    if len(body) != int(np.prod(shape)):
        raise DataError(f"{path}: header says {shape} ({int(np.prod(shape))} bytes) but the file holds {len(body)}")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def _idx_pair(root: Path, images_name: str, labels_name: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = read_idx(root / images_name), read_idx(root / labels_name)
    if images.ndim != 3 or labels.ndim != 1:
        raise DataError(f"{root}: {images_name} must hold images (3-D) and {labels_name} labels (1-D)")
    if len(images) != len(labels):
        raise DataError(f"{root}: {len(images)} images in {images_name} but {len(labels)} labels in {labels_name}")
    return images[:, None].copy(), labels.astype(np.int64)


def read_idx_source(source: str, root: Path) -> RawDataset:
    train_x, train_y = _idx_pair(root, IDX_FILES[0], IDX_FILES[1])
    test_x, test_y = _idx_pair(root, IDX_FILES[2], IDX_FILES[3])
    return RawDataset(train_x, train_y, CLASS_NAMES[source], test_x, test_y)


class BatchUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR-10 batch without running code: the only callables it hands the pickle are
    numpy's array reconstruction and latin-1 bytes (protocol 2 from Python 3); anything else a
    pickle names (os.system, eval, ...) is refused before it is looked up."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): np.ndarray(0).__reduce__()[0],
        ("numpy._core.multiarray", "_reconstruct"): np.ndarray(0).__reduce__()[0],
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def find_class(self, module: str, name: str):
        if (module, name) == ("_codecs", "encode"):
            return _latin1_bytes
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a CIFAR-10 batch never holds")
        return self.ALLOWED[module, name]


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"it encodes bytes as {encoding!r}, which a CIFAR-10 batch never does")
    return text.encode("latin1")


def read_cifar10(root: Path) -> RawDataset:
    path = root / "cifar-10-python.tar.gz"
    batches: dict[str, dict] = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar.getmembers():
                name = Path(member.name).name
                if member.isfile() and name.startswith(("data_batch_", "test_batch")):
                    try:
                        batches[name] = _check_batch(BatchUnpickler(tar.extractfile(member), encoding="bytes").load())
                    except (pickle.UnpicklingError, ValueError, TypeError, AttributeError, IndexError) as err:
                        raise DataError(f"{path}: {member.name} is not a CIFAR-10 batch ({err}); nothing in it was run. "
                                        "Replace the file with the original cifar-10-python.tar.gz") from None
    except (OSError, EOFError, tarfile.TarError, zlib.error) as err:
        raise DataError(f"{path}: not a readable CIFAR-10 python tarball ({err})") from None
    train_names = [f"data_batch_{i}" for i in range(1, 6)]
    if any(name not in batches for name in [*train_names, "test_batch"]):
        raise DataError(f"{path}: expected data_batch_1..5 and test_batch inside")

    def stack(names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        images = np.concatenate([batches[n][b"data"] for n in names]).reshape(-1, 3, 32, 32)
        labels = np.concatenate([batches[n][b"labels"] for n in names]).astype(np.int64)
        return images, labels

    train_x, train_y = stack(train_names)
    test_x, test_y = stack(["test_batch"])
    return RawDataset(train_x, train_y, CLASS_NAMES["cifar10"], test_x, test_y)


def _check_batch(batch: object) -> dict:
    """A batch holds b"data", uint8 rows of 3x32x32 pixels, and b"labels", one class 0-9 per row."""
    if not isinstance(batch, dict) or not {b"data", b"labels"} <= set(batch):
        raise ValueError("expected a mapping with b'data' and b'labels'")
    data, labels = batch[b"data"], np.asarray(batch[b"labels"])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError("b'data' is not a uint8 array of 3072-pixel rows")
    if labels.shape != (len(data),) or labels.dtype.kind not in "iu" or labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
        raise ValueError("b'labels' is not one class 0-9 per row")
    return {b"data": data, b"labels": labels}


def read_digits() -> RawDataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # values are 0..16
    return RawDataset(images, digits.target.astype(np.int64), CLASS_NAMES["digits"])


def read_folder(root: Path, channels: int, size: int, fit: str) -> RawDataset:
    """One sub-folder per class, PNG/JPEG inside; images of any size, each brought to size x size
    (`fit_images`) as it is read, so memory grows with the output, not with the largest input."""
    if not root.is_dir():
        raise DataError(f"{root}: folder not found; make one sub-folder per class with PNG/JPEG images inside")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{root}: no class sub-folders found")
    images, labels = [], []
    for label, class_dir in enumerate(class_dirs):
        files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"{class_dir}: empty class folder (no .png/.jpg/.jpeg files)")
        for file in files:
            try:
                images.append(fit_images(read_image(file, channels)[None], size, fit, channels)[0])
            except DataError as err:
                raise DataError(f"{file}: {err}") from None
            labels.append(label)
    return RawDataset(np.stack(images), np.asarray(labels, dtype=np.int64), [d.name for d in class_dirs])


def read_image(file: Path, channels: int) -> np.ndarray:
    """uint8 (C, H, W) of one PNG/JPEG; one whose header claims more pixels than PIL's
    decompression-bomb limit (Image.MAX_IMAGE_PIXELS) is refused before it is decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(file) as image:
                array = np.array(image.convert("L" if channels == 1 else "RGB"))  # writable, for torch
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise DataError(f"{file}: refused as a possible decompression bomb: {err} "
                        f"(PIL's limit, Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS} pixels)") from None
    except (OSError, UnidentifiedImageError) as err:
        raise DataError(f"{file}: unreadable image ({err})") from None
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def fit_images(images: np.ndarray, size: int, fit: str, channels: int | None) -> np.ndarray:
    """uint8 (N, C, H, W) -> uint8 (N, C', size, size), resized (antialiased) or zero-padded."""
    if channels == 3 and images.shape[1] == 1:
        images = images.repeat(3, axis=1)
    elif channels == 1 and images.shape[1] == 3:
        luma = np.array([0.299, 0.587, 0.114], dtype=np.float32)[None, :, None, None]
        images = np.round((images.astype(np.float32) * luma).sum(1, keepdims=True)).astype(np.uint8)
    height, width = images.shape[2:]
    if (height, width) == (size, size):
        return np.ascontiguousarray(images)
    if fit == "pad":
        if height > size or width > size:
            raise DataError(f"images are {height}x{width}, larger than image_size {size}; use fit: resize")
        top, left = (size - height) // 2, (size - width) // 2
        out = np.zeros((len(images), images.shape[1], size, size), np.uint8)
        out[:, :, top : top + height, left : left + width] = images
        return out
    chunks = []
    for start in range(0, len(images), 8192):  # bounded memory for large sets
        chunk = torch.from_numpy(images[start : start + 8192]).float()
        chunk = F.interpolate(chunk, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        chunks.append(chunk.round().clamp(0, 255).to(torch.uint8).numpy())
    return np.concatenate(chunks)


def load_source(source: str, root: Path, *, download: bool, channels: int | None, size: int, fit: str) -> RawDataset:
    """Read a source into memory (files fetched first when missing and allowed); a folder's images
    at size x size (the others are fitted by `tasks.prepare`)."""
    if source == "digits":
        return read_digits()
    if source == "folder":
        return read_folder(root, channels or 3, size, fit)
    ensure_files(source, root, download)
    if source == "cifar10":
        return read_cifar10(root)
    return read_idx_source(source, root)

