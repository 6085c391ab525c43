"""Raw dataset -> fixed-seed stratified train/val/test splits of uint8 images at image_size."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tasks.artifacts import file_digest
from tasks.data import SPLITS
from tasks.datasets import DataError, RawDataset, fit_images
from tasks.params import PrepareParams


def limit_per_class(images: np.ndarray, labels: np.ndarray, limit: int | None, seed: int):
    """Keep at most `limit` random images of each class (all when limit is None)."""
    if limit is None:
        return images, labels
    rng = np.random.default_rng(seed)
    keep = np.sort(np.concatenate([
        rng.permutation(np.flatnonzero(labels == c))[:limit] for c in np.unique(labels)
    ]))
    return images[keep], labels[keep]


def stratified_split(labels: np.ndarray, fractions: dict[str, float], seed: int, class_names: list[str]) -> dict[str, np.ndarray]:
    """Indices per split: each class divided by `fractions` (the rest is train), at least one each."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in ["train", *fractions]}
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        needed = 1 + len(fractions)
        if len(members) < needed:
            raise DataError(
                f"class '{class_names[label]}' has {len(members)} image(s); the split needs at least "
                f"{needed} (one for train and for each of {', '.join(fractions)})"
            )
        start = 0
        for name, fraction in fractions.items():
            count = max(1, round(fraction * len(members)))
            parts[name].append(members[start : start + count])
            start += count
        if start >= len(members):
            raise DataError(f"class '{class_names[label]}' has no images left for train after the split")
        parts["train"].append(members[start:])
    return {name: np.sort(np.concatenate(chunks)) for name, chunks in parts.items()}


def make_splits(raw: RawDataset, params: PrepareParams) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The three splits as (images, labels), images already at image_size."""
    images, labels = limit_per_class(raw.images, raw.labels, params.limit_per_class, params.seed)
    use_official = params.official_test and raw.test_images is not None
    fractions = {"val": params.val_fraction} if use_official else {"val": params.val_fraction, "test": params.test_fraction}
    indices = stratified_split(labels, fractions, params.seed, raw.class_names)
    splits = {name: (images[idx], labels[idx]) for name, idx in indices.items()}
    if use_official:
        splits["test"] = limit_per_class(raw.test_images, raw.test_labels, params.limit_per_class, params.seed)
    return {
        name: (fit_images(splits[name][0], params.image_size, params.fit, params.channels), splits[name][1])
        for name in SPLITS
    }


def write_splits(splits: dict[str, tuple[np.ndarray, np.ndarray]], folder: Path) -> None:
    for name, (images, labels) in splits.items():
        np.save(folder / f"{name}_images.npy", images)
        np.save(folder / f"{name}_labels.npy", labels)


def manifest(splits: dict, raw: RawDataset, params: PrepareParams, folder: Path) -> dict:
    """What was prepared: source, shape, class names, per-split per-class counts, file checksums."""
    shape = list(splits["train"][0].shape[1:])
    return {
        "source": params.source,
        "image_shape": shape,
        "class_names": raw.class_names,
        "counts": {
            name: {raw.class_names[c]: int((labels == c).sum()) for c in range(len(raw.class_names))}
            for name, (_, labels) in splits.items()
        },
        "sha256": {p.name: file_digest(p) for p in sorted(folder.glob("*.npy"))},
        "seed": params.seed,
    }
