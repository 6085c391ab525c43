"""Captions (tasks/captions.py): the attributes measured on drawn shapes of known width, slant, size
and position; bins from the train split's quantiles; deterministic captions; the word tokenizer; the
files prepare writes, and (slow) the smoke run's prepared captions against its images."""

import json

import numpy as np
import pytest

from tasks.artifacts import ArtifactError, read_json
from tasks.captions import (
    TEMPLATE,
    WORDS,
    Tokenizer,
    caption_splits,
    captions,
    fit_edges,
    label_words,
    measure,
    read_captions,
    to_bins,
    write_captions,
)

SIZE = 32


def bar(width: float, length: float = 16, angle: float = 0.0, centre=(SIZE / 2, SIZE / 2), size: int = SIZE) -> np.ndarray:
    """uint8 (size, size): a bar `width` px wide and `length` long, its top turned `angle` degrees
    to the right of upright, centred at `centre` (x, y), its pixels' coverage from 8x8 supersampling."""
    sub = 8
    coords = (np.arange(size * sub) + 0.5) / sub
    x, y = np.meshgrid(coords, coords)
    theta = np.radians(angle)
    along = (x - centre[0]) * np.sin(theta) - (y - centre[1]) * np.cos(theta)  # upward along the bar
    across = (x - centre[0]) * np.cos(theta) + (y - centre[1]) * np.sin(theta)
    inside = (np.abs(along) <= length / 2) & (np.abs(across) <= width / 2)
    coverage = inside.reshape(size, sub, size, sub).mean((1, 3))
    return np.round(coverage * 255).astype(np.uint8)


def measured(*images: np.ndarray) -> dict[str, np.ndarray]:
    return measure(np.stack(images)[:, None])


def test_thickness_of_bars_is_near_their_width_and_ordered_at_any_slant():
    widths = [2.0, 3.0, 4.0, 5.0]
    for angle in (0, 20, -30, 45):
        thickness = measured(*(bar(w, angle=angle) for w in widths))["thickness"]
        assert np.all(np.diff(thickness) > 0.5), (angle, thickness)
        assert thickness == pytest.approx(widths, abs=0.45), (angle, thickness)
    # on whole columns the only error is the bar's ends; a sub-pixel width is confounded with
    # contrast (a 1-px bar on two half-covered columns measures as a 2-px faint one)
    assert measured(bar(2.0, length=16))["thickness"][0] == pytest.approx(2.0, abs=0.15)


def test_slant_is_the_shear_of_a_leaning_bar_with_its_sign():
    angles = [-30, -15, 0, 15, 30]
    slant = measured(*(bar(1.5, length=20, angle=a) for a in angles))["slant"]
    assert np.all(np.diff(slant) > 0)
    assert slant == pytest.approx(np.tan(np.radians(angles)), abs=0.03)  # px right per px up: top to the right is positive


def test_size_and_position_follow_the_drawn_shape():
    small, large = measured(bar(3, length=8), bar(3, length=20))["size"]
    assert small < large
    assert large == pytest.approx(np.sqrt((20**2 + 3**2) / 12), abs=0.1)  # a rectangle's radius of gyration
    # a horizontal bar 4 rows tall whose middle is 8 rows above / 6 below the frame's centre
    high, centred, low = measured(*(bar(4, length=12, angle=90, centre=(16, 16 + dy)) for dy in (-8, 0, 6)))["position"]
    assert (high, centred, low) == pytest.approx((-8, 0, 6), abs=0.05)


def test_an_empty_image_measures_zero_and_colour_is_averaged():
    empty = measure(np.zeros((1, 1, 16, 16), np.uint8))
    assert all(values.tolist() == [0.0] for values in empty.values())
    grey = bar(3, angle=10)[None, None]
    colour = np.repeat(grey, 3, axis=1)
    assert {k: v.tolist() for k, v in measure(colour).items()} == {k: v.tolist() for k, v in measure(grey).items()}


def test_bins_come_from_train_quantiles_with_values_on_an_edge_going_above():
    values = {name: np.arange(9.0) for name in WORDS}
    edges = fit_edges(values)
    assert edges == {name: pytest.approx([8 / 3, 16 / 3]) for name in WORDS}
    bins = to_bins({name: np.array([0.0, 8 / 3, 3.0, 16 / 3, 100.0]) for name in WORDS}, edges)
    assert all(b.tolist() == [0, 1, 1, 2, 2] for b in bins.values())


def shapes(rng: np.random.Generator, count: int, widths=(1.5, 4.0)) -> np.ndarray:
    """uint8 (count, 1, 16, 16) bars of random width, angle, length and place."""
    return np.stack([
        bar(rng.uniform(*widths), length=rng.uniform(6, 12), angle=rng.uniform(-30, 30),
            centre=(8 + rng.uniform(-1, 1), 8 + rng.uniform(-2, 2)), size=16)
        for _ in range(count)
    ])[:, None]


def test_caption_splits_bins_every_split_by_the_train_edges_only():
    rng = np.random.default_rng(0)
    train = shapes(rng, 60)
    thick_test = shapes(rng, 20, widths=(3.5, 4.5))  # all thicker than most of train
    labels = rng.integers(0, 10, 60)
    splits = {"train": (train, labels), "val": (train[:10], labels[:10]),
              "test": (thick_test, np.zeros(20, int))}
    result = caption_splits(splits, [str(k) for k in range(10)])
    assert result.edges == fit_edges(measure(train))
    assert result.edges != fit_edges(measure(np.concatenate([train, thick_test])))
    assert all(share == pytest.approx(1 / 3, abs=0.02) for attr in result.fractions["train"].values() for share in attr.values())
    assert result.fractions["test"]["thickness"]["thick"] > 0.8  # test's shares are not re-fitted to thirds
    assert result.texts["val"] == result.texts["train"][:10]  # the same images and labels: the same captions
    summary = result.summary()
    assert summary["attributes"]["thickness"]["edges"] == result.edges["thickness"]
    assert summary["vocab_size"] == len(result.tokenizer)
    assert result.metrics()["caption_test_share.thickness.thick"] == result.fractions["test"]["thickness"]["thick"]
    json.dumps(summary)  # the manifest takes it


def test_captions_are_deterministic_from_label_and_pixels():
    rng = np.random.default_rng(1)
    images, labels = shapes(rng, 40), rng.integers(0, 10, 40)
    names = [str(k) for k in range(10)]
    first = caption_splits({"train": (images, labels)}, names).texts["train"]
    assert caption_splits({"train": (images, labels)}, names).texts["train"] == first
    order = rng.permutation(40)  # the same images in another order: each keeps its caption
    assert caption_splits({"train": (images[order], labels[order])}, names).texts["train"] == [first[i] for i in order]
    bins = {attr: np.array([k]) for attr, k in zip(WORDS, (2, 2, 0, 0), strict=True)}
    assert captions(np.array([7]), bins, names) == ["a thick seven leaning right, small, high in the frame"]
    assert TEMPLATE.count("{") == 5


def test_label_words_name_digits_and_other_classes():
    assert label_words(["0", "9", "T-shirt_top", "Ankle boot", " "]) == ["zero", "nine", "t-shirt top", "ankle boot", "class 4"]


def test_tokenizer_round_trips_maps_unknown_words_and_pads():
    texts = ["a thin five leaning right, large, low in the frame", "a thick one upright, small, high in the frame"]
    tokenizer = Tokenizer.build(texts + texts[:1])
    assert tokenizer.tokens[:4] == ["<pad>", "<bos>", "<eos>", "<unk>"]
    assert tokenizer.length == 12 + 2  # the longest caption's 12 tokens (commas included), <bos> and <eos>
    for text in texts:
        ids = tokenizer.encode(text)
        assert len(ids) == tokenizer.length and ids[0] == Tokenizer.BOS and Tokenizer.UNK not in ids
        assert tokenizer.decode(ids) == text
    short = tokenizer.encode("a thick zebra")
    assert short == [Tokenizer.BOS, tokenizer.ids["a"], tokenizer.ids["thick"], Tokenizer.UNK, Tokenizer.EOS] + [Tokenizer.PAD] * 9
    assert tokenizer.decode(short) == "a thick <unk>"
    cut = tokenizer.encode(" ".join(["a"] * 30))
    assert len(cut) == tokenizer.length and cut[-1] == Tokenizer.EOS
    batch = tokenizer.encode_batch([texts[1], texts[0], texts[1]])
    assert batch.dtype == np.int64 and batch.tolist() == [tokenizer.encode(t) for t in (texts[1], texts[0], texts[1])]


def test_write_captions_writes_captions_tokens_and_a_vocabulary_that_reads_back(tmp_path):
    rng = np.random.default_rng(2)
    splits = {name: (shapes(rng, 12), rng.integers(0, 3, 12)) for name in ("train", "val", "test")}
    result = caption_splits(splits, ["0", "1", "2"])
    write_captions(result, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"{s}_{kind}" for s in splits for kind in ("captions.json", "tokens.npy")] + ["vocab.json"])
    tokenizer = Tokenizer.read(tmp_path / "vocab.json")
    assert tokenizer.tokens == result.tokenizer.tokens and tokenizer.length == result.tokenizer.length
    for name in splits:
        texts, tokens = read_captions(tmp_path, name), np.load(tmp_path / f"{name}_tokens.npy")
        assert texts == result.texts[name] and tokens.shape == (12, tokenizer.length)
        assert [tokenizer.decode(row) for row in tokens] == texts
    saved = read_json(tmp_path / "vocab.json")
    (tmp_path / "vocab.json").write_text(json.dumps(saved | {"tokens": saved["tokens"][1:]}))
    with pytest.raises(ArtifactError, match="first tokens"):
        Tokenizer.read(tmp_path / "vocab.json")
    (tmp_path / "val_captions.json").write_text("{}")
    with pytest.raises(ArtifactError, match="list of captions"):
        read_captions(tmp_path, "val")


@pytest.mark.slow
def test_smoke_run_prepares_captions_that_match_its_images(smoke_snapshot):
    folder = smoke_snapshot / "artifacts" / "prepare"
    manifest = read_json(folder / "manifest.json", keys=("captions", "class_names", "sha256"))
    metrics = json.loads((smoke_snapshot / "metrics" / "prepare.json").read_text())
    tokenizer = Tokenizer.read(folder / "vocab.json")
    assert metrics["caption_vocab_size"] == manifest["captions"]["vocab_size"] == len(tokenizer)
    assert metrics["caption_tokens"] == tokenizer.length
    assert {"train_tokens.npy", "val_tokens.npy", "test_tokens.npy"} <= set(manifest["sha256"])
    assert (smoke_snapshot / "plots" / "prepare" / "captions.png").stat().st_size > 0

    train_images = np.load(folder / "train_images.npy")
    edges = {name: attr["edges"] for name, attr in manifest["captions"]["attributes"].items()}
    refitted = fit_edges(measure(train_images))  # from train, as re-measured here
    assert all(edges[name] == pytest.approx(refitted[name]) for name in WORDS) and edges.keys() == refitted.keys()
    assert all(len(edges[name]) == len(words) - 1 for name, words in WORDS.items())
    for split in ("train", "val", "test"):
        images, labels = np.load(folder / f"{split}_images.npy"), np.load(folder / f"{split}_labels.npy")
        texts, tokens = read_captions(folder, split), np.load(folder / f"{split}_tokens.npy")
        assert texts == captions(labels, to_bins(measure(images), edges), manifest["class_names"])
        assert tokens.shape == (len(images), tokenizer.length)
        assert [tokenizer.decode(row) for row in tokens] == texts
        if split == "train":
            assert not (tokens == Tokenizer.UNK).any()  # the vocabulary holds every train word
