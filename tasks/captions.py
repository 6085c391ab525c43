"""A caption per prepared image, from its label and four attributes measured on its pixels, and the
word-level tokenizer built from the train split's captions.

The attributes, measured on the ink (grey level / 255, light ink on a dark ground as in MNIST; a
colour image's channels are averaged), all in pixels of the prepared image:

- thickness: the width of the rectangle with the ink's area and perimeter. Area is the ink mass;
  the perimeter is the ink's total variation (the gradient's length summed over the image, from
  2x2-cell differences, which measure a 45-degree edge either way as long as an upright one). A
  stroke of width w and length L has area wL and perimeter 2(L + w), so w is the smaller root of
  w^2 - (P/2) w + A = 0: ink mass over half the perimeter for a long stroke, exact for a bar.
- slant: the shear -mu11 / mu02 of the ink's second central moments (the one MNIST deskewing
  undoes), horizontal pixels per pixel upward: positive when the top leans to the right.
- size: the ink's radius of gyration, the root-mean-square distance of its mass from its
  centroid. (MNIST's digits are normalised to one height, so a bounding-box height is 12 or 13 of
  16 pixels for nine digits in ten and would not tell them apart.)
- position: the middle of the ink's vertical extent (the rows holding its 2nd and 98th mass
  percentiles) below the frame's centre; negative is high. (MNIST centres each digit's mass, so its
  centroid moves by a sixth of a pixel, less than this extent's middle does.)

Each attribute is binned into words by the train split's terciles (`fit_edges`), and every split
uses the train edges. An empty image measures 0 on every attribute.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.artifacts import read_json, unreadable, write_json

# Words per attribute, in the order of the measured value (low to high).
WORDS: dict[str, tuple[str, ...]] = {
    "thickness": ("thin", "medium", "thick"),
    "slant": ("leaning left", "upright", "leaning right"),
    "size": ("small", "medium-sized", "large"),
    "position": ("high in the frame", "centred in the frame", "low in the frame"),
}
UNITS = {
    "thickness": "px: width of the rectangle with the ink's area and perimeter",
    "slant": "shear -mu11/mu02: px to the right per px up (positive: top to the right)",
    "size": "px: radius of gyration of the ink",
    "position": "px: middle of the ink's 2nd-98th percentile rows below the frame's centre",
}
TEMPLATE = "a {thickness} {label} {slant}, {size}, {position}"
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
EXTENT = (0.02, 0.98)  # the mass percentiles whose rows bound the ink's vertical extent
CHUNK = 2048  # images measured at once: bounded memory at any resolution (and half the CPU time of 8192 at 16x16: cache-sized)


def measure(images: np.ndarray) -> dict[str, np.ndarray]:
    """Thickness, slant, size and position (float64, one per image) of uint8 images (N, C, H, W)
    or (N, H, W); see the module's docstring for what each is."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[:, None]
    parts = [_measure_chunk(images[start : start + CHUNK]) for start in range(0, len(images), CHUNK)]
    return {name: np.concatenate([part[name] for part in parts]) if parts else np.zeros(0) for name in WORDS}


def _measure_chunk(images: np.ndarray) -> dict[str, np.ndarray]:
    ink = (images[:, 0] if images.shape[1] == 1 else images.mean(1, dtype=np.float32)).astype(np.float32) / 255.0
    _, height, width = ink.shape
    rows, cols = ink.sum(2, dtype=np.float64), ink.sum(1, dtype=np.float64)  # mass per row / column
    mass = rows.sum(1)
    empty = mass <= 0
    safe_mass = np.where(empty, 1.0, mass)
    ys, xs = np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64)
    cy, cx = rows @ ys / safe_mass, cols @ xs / safe_mass
    mu02 = rows @ ys**2 / safe_mass - cy**2  # vertical variance
    mu20 = cols @ xs**2 / safe_mass - cx**2
    mu11 = np.einsum("nhw,h,w->n", ink, ys, xs, dtype=np.float64) / safe_mass - cx * cy
    slant = np.where(mu02 > 1e-12, -mu11 / np.maximum(mu02, 1e-12), 0.0)  # y grows downward: a top-right lean has mu11 < 0

    padded = np.pad(ink, ((0, 0), (1, 1), (1, 1)))
    top_left, top_right = padded[:, :-1, :-1], padded[:, :-1, 1:]
    bottom_left, bottom_right = padded[:, 1:, :-1], padded[:, 1:, 1:]
    gx = (top_right - top_left + bottom_right - bottom_left) / 2
    gy = (bottom_left - top_left + bottom_right - top_right) / 2
    half_perimeter = np.sqrt(gx**2 + gy**2).sum((1, 2), dtype=np.float64) / 2
    thickness = (half_perimeter - np.sqrt(np.maximum(half_perimeter**2 - 4 * mass, 0.0))) / 2

    size = np.sqrt(np.maximum(mu20 + mu02, 0.0))
    top, bottom = (_row_percentile(rows, safe_mass, q) for q in EXTENT)
    position = (top + bottom) / 2 - height / 2
    measured = {"thickness": thickness, "slant": slant, "size": size, "position": position}
    return {name: np.where(empty, 0.0, values) for name, values in measured.items()}


def _row_percentile(rows: np.ndarray, mass: np.ndarray, q: float) -> np.ndarray:
    """Where (in rows, continuous) the cumulative ink mass from the top reaches the fraction q,
    each row's mass spread evenly over its pixel height."""
    share = rows / mass[:, None]
    cdf = np.cumsum(share, 1)
    index = np.minimum((cdf < q).sum(1), rows.shape[1] - 1)
    before = np.where(index > 0, np.take_along_axis(cdf, np.maximum(index - 1, 0)[:, None], 1)[:, 0], 0.0)
    within = np.take_along_axis(share, index[:, None], 1)[:, 0]
    return index + np.clip((q - before) / np.where(within > 0, within, 1.0), 0.0, 1.0)


def fit_edges(values: dict[str, np.ndarray]) -> dict[str, list[float]]:
    """Each attribute's bin edges: the quantiles that cut its (train) values into len(words) equal parts."""
    return {
        name: np.quantile(values[name], np.arange(1, len(words)) / len(words)).tolist()
        for name, words in WORDS.items()
    }


def to_bins(values: dict[str, np.ndarray], edges: dict[str, list[float]]) -> dict[str, np.ndarray]:
    """Bin index per image and attribute (0 = the first word); a value on an edge goes above it."""
    return {name: np.searchsorted(np.asarray(edges[name]), values[name], side="right") for name in WORDS}


def label_words(class_names: Sequence[str]) -> list[str]:
    """How a caption names each class: digits "0"-"9" as "zero"-"nine", any other name lower-case
    with underscores as spaces ("class k" when a name is blank)."""
    words = []
    for k, name in enumerate(class_names):
        if name.strip().isdigit() and int(name) < len(DIGIT_NAMES):
            words.append(DIGIT_NAMES[int(name)])
        else:
            words.append(" ".join(name.lower().replace("_", " ").split()) or f"class {k}")
    return words


CAPTIONS_PER_CLASS = math.prod(len(words) for words in WORDS.values())  # 81: a word of each attribute


def caption_table(class_names: Sequence[str]) -> list[str]:
    """Every caption TEMPLATE writes for these classes, class by class and, within a class, the
    attributes' words as nested loops in WORDS' order (position varying fastest): the caption of
    class c with bin indices (b1, ..., b4) sits at c * CAPTIONS_PER_CLASS + ((b1 * 3 + b2) * 3 + b3) * 3 + b4."""
    return [
        TEMPLATE.format(label=name, **dict(zip(WORDS, words, strict=True)))
        for name in label_words(class_names) for words in itertools.product(*WORDS.values())
    ]


def caption_index(label: int, bins: Sequence[int]) -> int:
    """The caption_table index of class `label`'s caption with these bin indices (one per attribute, in WORDS' order)."""
    index = label
    for k, words in zip(bins, WORDS.values(), strict=True):
        index = index * len(words) + k
    return index


def caption_bins(index: np.ndarray) -> dict[str, np.ndarray]:
    """Each attribute's bin index of captions given by their `caption_table` index (their class is
    index // CAPTIONS_PER_CLASS)."""
    rest, bins = np.asarray(index) % CAPTIONS_PER_CLASS, {}
    for name, words in reversed(WORDS.items()):
        rest, bins[name] = np.divmod(rest, len(words))
    return {name: bins[name] for name in WORDS}


def captions(labels: np.ndarray, bins: dict[str, np.ndarray], class_names: Sequence[str]) -> list[str]:
    """One caption per image, TEMPLATE filled with its label's name and its attributes' words."""
    names = label_words(class_names)
    combos = np.stack([np.asarray(labels), *(bins[attr] for attr in WORDS)], axis=1)
    unique, index = np.unique(combos, axis=0, return_inverse=True)  # a few hundred distinct captions
    texts = [
        TEMPLATE.format(label=names[label], **{attr: WORDS[attr][k] for attr, k in zip(WORDS, ks, strict=True)})
        for label, *ks in unique.tolist()
    ]
    return [texts[i] for i in index.reshape(-1).tolist()]


class Tokenizer:
    """Word-level: lower-cased text split into words (runs of anything but white space and commas)
    and commas; ids are the special tokens, then the words in alphabetical order. `encode` wraps a
    caption in <bos> ... <eos> and pads it with <pad> to `length` (cutting a longer one, <eos> kept
    last); a word not in the vocabulary is <unk>. `decode(encode(c)) == c` for a caption in the
    canonical form: lower-case, single spaces, no space before a comma."""

    SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
    PAD, BOS, EOS, UNK = range(4)
    PATTERN = r"[^\s,]+|,"

    def __init__(self, words: Iterable[str], length: int):
        self.tokens = [*self.SPECIALS, *sorted(set(words) - set(self.SPECIALS))]
        self.ids = {token: i for i, token in enumerate(self.tokens)}
        self.length = length

    @classmethod
    def split(cls, text: str) -> list[str]:
        return re.findall(cls.PATTERN, text.lower())

    @classmethod
    def build(cls, texts: Iterable[str]) -> Tokenizer:
        """The vocabulary of `texts`, with `length` their longest token count plus <bos> and <eos>."""
        split = [cls.split(text) for text in dict.fromkeys(texts)]  # each distinct text once
        return cls((word for words in split for word in words), max(map(len, split), default=0) + 2)

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, text: str) -> list[int]:
        ids = [self.ids.get(word, self.UNK) for word in self.split(text)][: self.length - 2]
        return [self.BOS, *ids, self.EOS] + [self.PAD] * (self.length - len(ids) - 2)

    def encode_batch(self, texts: Iterable[str]) -> np.ndarray:
        """int64 (N, length)."""
        texts = list(texts)
        distinct = list(dict.fromkeys(texts))
        ids = np.array([self.encode(text) for text in distinct], dtype=np.int64).reshape(-1, self.length)
        row = {text: i for i, text in enumerate(distinct)}
        return ids[[row[text] for text in texts]]

    def decode(self, ids: Iterable[int]) -> str:
        """The words up to <eos>, <pad> and <bos> left out."""
        words = []
        for i in map(int, ids):
            if i == self.EOS:
                break
            if i not in (self.PAD, self.BOS):
                words.append(self.tokens[i])
        return " ".join(words).replace(" ,", ",")

    def to_json(self) -> dict:
        return {"tokens": self.tokens, "length": self.length, "pattern": self.PATTERN,
                "specials": list(self.SPECIALS)}

    @classmethod
    def read(cls, path: Path | str) -> Tokenizer:
        """The tokenizer `write_captions` saved (e.g. artifacts/prepare/vocab.json)."""
        saved = read_json(path, keys=("tokens", "length"))
        if saved["tokens"][: len(cls.SPECIALS)] != list(cls.SPECIALS):
            raise unreadable(path, f"its first tokens are not {', '.join(cls.SPECIALS)}")
        tokenizer = cls(saved["tokens"], int(saved["length"]))
        if tokenizer.tokens != saved["tokens"]:
            raise unreadable(path, "its tokens after the special ones are not unique and sorted")
        return tokenizer


@dataclass
class SplitCaptions:
    """Every split's captions and token ids, the train edges they were binned by, and the tokenizer."""

    texts: dict[str, list[str]]
    tokens: dict[str, np.ndarray]
    edges: dict[str, list[float]]
    fractions: dict[str, dict[str, dict[str, float]]]  # split -> attribute -> word -> share of images
    tokenizer: Tokenizer

    def summary(self) -> dict:
        """What the manifest records: the template, each attribute's unit, words and train edges,
        and the train split's share of each word."""
        return {
            "template": TEMPLATE,
            "attributes": {
                name: {"unit": UNITS[name], "words": list(words), "edges": self.edges[name],
                       "train_fractions": self.fractions["train"][name]}
                for name, words in WORDS.items()
            },
            "vocab_size": len(self.tokenizer),
            "token_length": self.tokenizer.length,
        }

    def metrics(self) -> dict[str, float | int]:
        """The vocabulary's size, the token length, and the test split's share of each word (about
        a third each when test is drawn like train; train's are a third by construction)."""
        shares = {
            f"caption_test_share.{attr}.{word.split(' in ')[0].replace(' ', '_')}": share
            for attr, words in self.fractions["test"].items() for word, share in words.items()
        }
        return {"caption_vocab_size": len(self.tokenizer), "caption_tokens": self.tokenizer.length, **shares}


def caption_splits(splits: dict[str, tuple[np.ndarray, np.ndarray]], class_names: Sequence[str]) -> SplitCaptions:
    """Captions of every split of `splits` ({name: (images, labels)}, a "train" among them) with the
    train split's bin edges, token ids from the train captions' tokenizer."""
    values = {name: measure(images) for name, (images, _) in splits.items()}
    edges = fit_edges(values["train"])
    texts, fractions = {}, {}
    for name, (_, labels) in splits.items():
        bins = to_bins(values[name], edges)
        texts[name] = captions(labels, bins, class_names)
        fractions[name] = {
            attr: {word: round(float(np.mean(bins[attr] == k)), 4) if len(labels) else 0.0 for k, word in enumerate(words)}
            for attr, words in WORDS.items()
        }
    tokenizer = Tokenizer.build(texts["train"])
    tokens = {name: tokenizer.encode_batch(split_texts) for name, split_texts in texts.items()}
    return SplitCaptions(texts, tokens, edges, fractions, tokenizer)


def read_captions(folder: Path | str, split: str) -> list[str]:
    """The captions `write_captions` saved for `split`, in the images' order."""
    path = Path(folder) / f"{split}_captions.json"
    try:
        texts = json.loads(path.read_text())
    except FileNotFoundError:
        raise unreadable(path, "missing") from None
    except (OSError, ValueError) as err:
        raise unreadable(path, f"not readable JSON ({str(err).splitlines()[0][:200]})") from None
    if not isinstance(texts, list) or not all(isinstance(text, str) for text in texts):
        raise unreadable(path, "expected a JSON list of captions")
    return texts


def write_captions(captioned: SplitCaptions, folder: Path) -> None:
    """{split}_captions.json (a list, in the images' order), {split}_tokens.npy and vocab.json."""
    for name, split_texts in captioned.texts.items():
        write_json(folder / f"{name}_captions.json", split_texts)
        np.save(folder / f"{name}_tokens.npy", captioned.tokens[name])
    write_json(folder / "vocab.json", captioned.tokenizer.to_json())


def caption_grid(images: np.ndarray, texts: Sequence[str], count: int = 12, seed: int = 0) -> np.ndarray:
    """Up to `count` random images, each under its caption (no two captions alike), three a row."""
    from tasks.images import captioned, grid

    panels: dict[str, np.ndarray] = {}
    for i in np.random.default_rng(seed).permutation(len(texts)):
        if len(panels) == count:
            break
        panels.setdefault(texts[i], grid(images[i : i + 1], ncols=1, min_cell=96))
    return captioned(panels, ncols=3)
