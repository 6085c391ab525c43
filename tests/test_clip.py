"""CLIP on prepare's captions: the symmetric InfoNCE loss (against a pair-by-pair loop, and with
duplicate captions masked out of the negatives), the temperature's clamp, recall@k and its chance
level on hand-made similarities, a text feature that padding cannot change, the zero-shot
prompts, the model rebuilt from its files, a tiny CLIP on the digits beating chance, and the
stage's smoke run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.clip import (
    INITIAL_LOGIT_SCALE,
    MAX_LOGIT_SCALE,
    Clip,
    ClipConfig,
    ClipTraining,
    contrastive_loss,
)
from tasks.artifacts import ArtifactError
from tasks.captions import Tokenizer, caption_splits
from tasks.clip import (
    captioned_split,
    chance_recall,
    evaluate,
    export_clip,
    load_clip,
    prompt_tokens,
    recall_at_k,
)
from tasks.data import ImageSplit
from tasks.datasets import read_digits
from tests.conftest import run

pytestmark = pytest.mark.usefixtures("one_thread")

IMAGE = {"name": "resnet", "in_channels": 1, "image_size": 8, "width": 8, "depth": [1], "stem_stride": 1}
CONFIG = ClipConfig(IMAGE, vocab_size=12, length=10, pad_id=0, dim=16, depth=2, heads=2, embed_dim=8)


def unit_rows(count: int, dim: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(count, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def looped_loss(images: torch.Tensor, texts: torch.Tensor, scale: float, captions: list[int]) -> float:
    """The loss pair by pair: each image against its caption and the captions unlike its own,
    each caption against its image and the images of other captions, averaged both ways."""
    n = len(captions)

    def cross_entropy(anchor: torch.Tensor, others: torch.Tensor, i: int) -> float:
        rivals = [j for j in range(n) if j == i or captions[j] != captions[i]]
        logits = [scale * float(anchor @ others[j]) for j in rivals]
        return -(logits[rivals.index(i)] - math.log(sum(math.exp(logit) for logit in logits)))

    image_to_text = sum(cross_entropy(images[i], texts, i) for i in range(n)) / n
    text_to_image = sum(cross_entropy(texts[i], images, i) for i in range(n)) / n
    return (image_to_text + text_to_image) / 2


@pytest.mark.parametrize("captions", [[0, 1, 2, 3, 4, 5, 6, 7], [0, 1, 1, 2, 3, 3, 3, 4]])
def test_the_loss_is_symmetric_and_equals_a_pair_by_pair_loop(captions):
    images, texts = unit_rows(8, 6, 0), unit_rows(8, 6, 1)
    ids = torch.tensor(captions)
    loss = contrastive_loss(images, texts, torch.tensor(5.0), ids)
    torch.testing.assert_close(contrastive_loss(texts, images, torch.tensor(5.0), ids), loss)
    assert loss.item() == pytest.approx(looped_loss(images, texts, 5.0, captions), rel=1e-5)
    if len(set(captions)) == len(captions):  # no duplicates: CLIP's own formula
        logits, targets = 5.0 * images @ texts.T, torch.arange(8)
        torch.testing.assert_close(loss, (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2)


def test_images_matching_a_shared_caption_leave_nothing_to_learn():
    """Equal captions have equal text embeddings: with each image on its caption's embedding the
    masked loss goes to zero as the scale grows; unmasked, each duplicate costs log(copies)."""
    captions = torch.tensor([0, 0, 1, 2, 2, 2])
    texts = unit_rows(3, 16, 2)[captions]
    images = texts.clone()
    assert contrastive_loss(images, texts, torch.tensor(100.0), captions).item() < 1e-3
    unmasked = contrastive_loss(images, texts, torch.tensor(100.0), torch.arange(6)).item()
    assert unmasked == pytest.approx((2 * math.log(2) + 3 * math.log(3)) / 6, rel=1e-3)


def test_the_temperature_starts_at_0_07_and_the_logit_scale_stops_at_100():
    torch.manual_seed(0)
    clip = Clip(CONFIG)
    assert clip.logit_scale.item() == pytest.approx(INITIAL_LOGIT_SCALE) and 1 / clip.scale.item() == pytest.approx(0.07)
    images, tokens = torch.rand(4, 1, 8, 8) * 2 - 1, torch.tensor([[1, 5, 2, 0, 0, 0, 0, 0, 0, 0]] * 4)
    tokens[:, 1] = torch.arange(5, 9)
    for logit_scale, scale, learns in [(1.0, math.e, True), (MAX_LOGIT_SCALE + 2, 100.0, False)]:
        with torch.no_grad():
            clip.logit_scale.fill_(logit_scale)
        assert clip.scale.item() == pytest.approx(scale)
        clip.zero_grad()
        ClipTraining(clip)((images, tokens, torch.arange(4)))["loss"].backward()
        assert (clip.logit_scale.grad.abs().item() > 0) == learns


def test_recall_at_k_over_distinct_captions_on_a_hand_made_similarity_matrix():
    captions = torch.tensor([0, 0, 1, 2])  # 4 images, 3 distinct captions; images 0 and 1 share caption 0
    similarity = torch.tensor([
        [0.9, 0.1, 0.0],  # image 0: its caption first
        [0.2, 0.8, 0.5],  # image 1: its caption third
        [0.3, 0.7, 0.1],  # image 2: its caption first
        [0.6, 0.5, 0.4],  # image 3: its caption third
    ])
    # caption 0's best image is image 0 (its own); caption 1's is image 1 (caption 0), then image 2
    # (its own); caption 2's is image 1, then image 3 (its own), then image 2
    recall = recall_at_k(similarity, captions, ks=(1, 2, 3))
    assert recall["image_to_text_recall_at_1"] == pytest.approx(2 / 4)
    assert recall["image_to_text_recall_at_3"] == pytest.approx(1.0)
    assert recall["text_to_image_recall_at_1"] == pytest.approx(1 / 3)
    assert recall["text_to_image_recall_at_2"] == pytest.approx(3 / 3)
    chance = chance_recall(captions, ks=(1, 2))
    assert chance["chance_image_to_text_recall_at_1"] == pytest.approx(1 / 3)
    assert chance["chance_image_to_text_recall_at_2"] == pytest.approx(2 / 3)
    assert chance["chance_text_to_image_recall_at_1"] == pytest.approx((2 / 4 + 1 / 4 + 1 / 4) / 3)
    # two of four images: caption 0 is missed only by {2, 3}, each single caption by 3 of the 6 pairs
    assert chance["chance_text_to_image_recall_at_2"] == pytest.approx((5 / 6 + 1 / 2 + 1 / 2) / 3)


def test_chance_recall_is_what_random_similarities_score():
    captions = torch.randint(0, 12, (60,), generator=torch.Generator().manual_seed(0))
    captions = torch.unique(captions, return_inverse=True)[1]  # every id held by some image
    chance = chance_recall(captions)
    draws = [recall_at_k(torch.rand(60, int(captions.max()) + 1, generator=torch.Generator().manual_seed(seed)), captions)
             for seed in range(400)]
    for key, expected in chance.items():
        measured = np.mean([draw[key.removeprefix("chance_")] for draw in draws])
        assert measured == pytest.approx(expected, abs=0.02), key


def test_a_caption_s_text_feature_does_not_depend_on_its_padding():
    """A batch of captions of different lengths, each encoded alone without padding and in a batch
    padded to the full length with <pad>: the same features. A changed word does change them."""
    torch.manual_seed(1)
    encoder = Clip(CONFIG).eval().text_encoder
    captions = [[1, 5, 6, 2], [1, 7, 8, 9, 10, 11, 2], [1, 4, 2]]
    padded = torch.tensor([caption + [0] * (CONFIG.length - len(caption)) for caption in captions])
    features = encoder(padded)
    for i, caption in enumerate(captions):
        torch.testing.assert_close(encoder(torch.tensor([caption]))[0], features[i], rtol=0, atol=1e-5)
    changed = padded.clone()
    changed[0, 1] = 9
    assert not torch.allclose(encoder(changed)[0], features[0], atol=1e-4)


def test_the_zero_shot_prompts_name_each_class_as_the_captions_do():
    tokenizer = Tokenizer(["a", "zero", "one", "thick"], length=8)
    tokens = prompt_tokens(["0", "1"], tokenizer)
    assert [tokenizer.decode(row) for row in tokens] == ["a zero", "a one"]
    with pytest.raises(ArtifactError, match="two"):
        prompt_tokens(["0", "1", "2"], tokenizer)


def test_clip_rebuilds_from_its_files(tmp_path):
    torch.manual_seed(2)
    clip = Clip(CONFIG).eval()
    export_clip(clip, tmp_path)
    loaded = load_clip(tmp_path)
    assert loaded.config == clip.config
    images, tokens = torch.rand(3, 1, 8, 8) * 2 - 1, torch.tensor([[1, 5, 2] + [0] * 7] * 3)
    for got, want in zip(loaded(images, tokens), clip(images, tokens), strict=True):
        torch.testing.assert_close(got, want)


def digits_split(images: np.ndarray, labels: np.ndarray, texts: list[str], tokens: np.ndarray):
    return captioned_split(ImageSplit(torch.from_numpy(images), torch.from_numpy(labels)), texts, tokens)


def test_a_tiny_clip_trained_on_the_digits_beats_chance():
    """The smoke profile's data (scikit-learn's 8x8 digits, captioned as prepare does) split
    1400 / 397: 200 steps of a tiny CLIP retrieve captions and classify zero-shot far above chance."""
    raw = read_digits()
    cut = 1400
    captioned = caption_splits({"train": (raw.images[:cut], raw.labels[:cut]), "test": (raw.images[cut:], raw.labels[cut:])},
                               raw.class_names)
    train, test = (digits_split(images, labels, captioned.texts[name], captioned.tokens[name])
                   for name, images, labels in [("train", raw.images[:cut], raw.labels[:cut]),
                                                ("test", raw.images[cut:], raw.labels[cut:])])
    tokenizer = captioned.tokenizer
    torch.manual_seed(0)
    config = ClipConfig(IMAGE, len(tokenizer), tokenizer.length, tokenizer.PAD, 32, 1, 2, 32)
    training = ClipTraining(Clip(config))
    optimizer = torch.optim.AdamW(training.parameters(), lr=3e-3, weight_decay=0.2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        index = torch.randint(0, len(train), (64,), generator=generator)
        captions = train.captions[index]
        loss = training((train.images.floats(index), train.tokens[captions], captions))["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    scores, similarity = evaluate(training.clip, test, raw.class_names, tokenizer)
    assert similarity.shape == (len(test), len(test.texts))
    assert scores["zero_shot_accuracy"] > 3 * scores["zero_shot_chance"], scores
    for way in ("image_to_text", "text_to_image"):
        assert scores[f"{way}_recall_at_5"] > 5 * scores[f"chance_{way}_recall_at_5"], scores


@pytest.mark.slow
def test_the_smoke_run_trains_clip_above_chance_every_way(reproduced: Path):
    """The session's smoke run (clip among its stages): `dvc repro clip` has nothing to do, and its
    recalls and zero-shot accuracy beat their chance levels."""
    run(["dvc", "repro", "clip"], reproduced)
    metrics = json.loads((reproduced / "metrics" / "clip.json").read_text())
    for way in ("image_to_text", "text_to_image"):
        for k in (1, 5):
            assert metrics[f"{way}_recall_at_{k}"] > 2 * metrics[f"chance_{way}_recall_at_{k}"], metrics
    assert metrics["zero_shot_accuracy"] > 2 * metrics["zero_shot_chance"], metrics
    assert metrics["temperature"] >= 1 / 100 and metrics["steps"] > 0  # the clamp
    assert (reproduced / "plots" / "clip" / "retrieval.png").is_file()
    with open(reproduced / "plots" / "clip" / "train.csv") as handle:
        assert len(handle.readlines()) > 2
    assert run(["dvc", "status", "clip"], reproduced).stdout.strip().endswith("up to date.")
