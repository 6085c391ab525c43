"""The clip stage's pieces: a split's images with prepare's captions (token ids, and which images
share a caption), CLIP built from params, export and rebuild (safetensors + JSON), retrieval and
zero-shot evaluation on the test split, and the retrieval figure.

Retrieval is scored over the test split's DISTINCT captions, since many images share one:
image->text recall@k is the share of test images whose own caption is among the k captions most
similar to it; text->image recall@k is the share of distinct captions with an image of that
caption among the k images most similar to it. Zero-shot classification embeds a prompt per
class, "a <class word>", the word the captions name the class by (`label_words`: "a zero" …
"a nine" on digits), and gives each image the class of its most similar prompt.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.clip import Clip, ClipConfig
from tasks.artifacts import load_network, read_array, save_network, unreadable
from tasks.captions import Tokenizer, label_words, read_captions
from tasks.data import PREPARED, ImageSplit, load_split
from tasks.device import autocast
from tasks.images import grid
from tasks.params import ClipParams

NAME = "clip"  # clip.safetensors + clip.json
VOCAB = PREPARED / "vocab.json"
KS = (1, 5)  # recall@k


@dataclass
class CaptionedSplit:
    """A split's images and labels, each image's caption as an index into `texts` (the split's
    distinct captions, in first-seen order), and the token ids of each distinct caption."""

    images: ImageSplit
    captions: torch.Tensor  # (N,) int64
    texts: list[str]
    tokens: torch.Tensor  # (len(texts), length) int64

    def __len__(self) -> int:
        return len(self.images)


def captioned_split(images: ImageSplit, texts: list[str], tokens: np.ndarray) -> CaptionedSplit:
    """A split from its images, each image's caption and each image's token ids (N, length)."""
    distinct = {text: i for i, text in enumerate(dict.fromkeys(texts))}
    captions = np.array([distinct[text] for text in texts], dtype=np.int64)
    first = np.unique(captions, return_index=True)[1]  # an image of each distinct caption, in id order
    device = images.labels.device
    return CaptionedSplit(images, torch.from_numpy(captions).to(device), list(distinct), torch.from_numpy(tokens[first]).long().to(device))


def load_captioned(split: str, tokenizer: Tokenizer, device: torch.device | str = "cpu") -> CaptionedSplit:
    """A prepared split with its captions and their token ids (prepare's, checked against its tokenizer)."""
    images = load_split(split, device)
    texts = read_captions(PREPARED, split)
    path = PREPARED / f"{split}_tokens.npy"
    tokens = read_array(path, ndim=2, kinds="i")
    if len(texts) != len(images) or len(tokens) != len(images):
        raise unreadable(path, f"{len(tokens)} token rows and {len(texts)} captions for {len(images)} images")
    if tokens.shape[1] != tokenizer.length or tokens.min(initial=0) < 0 or tokens.max(initial=0) >= len(tokenizer):
        raise unreadable(path, f"token ids of shape {tokens.shape} outside vocab.json's {len(tokenizer)} tokens "
                               f"of length {tokenizer.length}")
    return captioned_split(images, texts, tokens)


def build_clip(params: ClipParams, channels: int, image_size: int, tokenizer: Tokenizer) -> Clip:
    image = {"name": "resnet", "in_channels": channels, "image_size": image_size, **params.image.model_dump()}
    return Clip(ClipConfig(
        image, len(tokenizer), tokenizer.length, tokenizer.PAD, params.dim, params.depth, params.heads,
        params.embed_dim,
    ))


def export_clip(clip: Clip, folder: Path) -> None:
    save_network(clip, dataclasses.asdict(clip.config), folder, NAME)


def load_clip(folder: Path | str, device: torch.device | str = "cpu") -> Clip:
    """The frozen CLIP (eval mode, no grads)."""
    return load_network(folder, NAME, lambda config: Clip(ClipConfig(**config)), device)[0]


def prompt_tokens(class_names: list[str], tokenizer: Tokenizer) -> torch.Tensor:
    """The token ids of the zero-shot prompts, "a <class word>" per class; a class word the
    tokenizer does not know (a class no training caption names) stops the stage."""
    prompts = [f"a {word}" for word in label_words(class_names)]
    unknown = [word for prompt in prompts for word in tokenizer.split(prompt) if word not in tokenizer.ids]
    if unknown:
        raise unreadable(VOCAB, f"no token for the zero-shot prompts' words {unknown}")
    return torch.from_numpy(tokenizer.encode_batch(prompts))


@torch.no_grad()
def embed_images(clip: Clip, images: ImageSplit, batch_size: int = 1000) -> torch.Tensor:
    clip.eval()
    with autocast(images.images.device):
        return torch.cat([clip.encode_images(images.floats(slice(start, start + batch_size)))
                          for start in range(0, len(images), batch_size)])


@torch.no_grad()
def embed_texts(clip: Clip, tokens: torch.Tensor) -> torch.Tensor:
    clip.eval()
    with autocast(tokens.device):
        return clip.encode_texts(tokens)


def recall_at_k(similarity: torch.Tensor, captions: torch.Tensor, ks: tuple[int, ...] = KS) -> dict[str, float]:
    """Image->text and text->image recall@k of a similarity matrix (N images, C distinct captions),
    image i's caption being column captions[i] (see the module's docstring)."""
    images, texts = similarity.shape
    own = captions[:, None]
    per_caption = torch.arange(texts, device=captions.device)[:, None]
    scores = {}
    for k in ks:
        top_texts = similarity.topk(min(k, texts), dim=1).indices  # (N, k)
        top_images = similarity.T.topk(min(k, images), dim=1).indices  # (C, k)
        scores[f"image_to_text_recall_at_{k}"] = (top_texts == own).any(1).float().mean().item()
        scores[f"text_to_image_recall_at_{k}"] = (captions[top_images] == per_caption).any(1).float().mean().item()
    return scores


def chance_recall(captions: torch.Tensor, ks: tuple[int, ...] = KS) -> dict[str, float]:
    """What a random ranking scores on average: image->text k / C; text->image, for a caption
    held by n of the N images, 1 - C(N - n, k) / C(N, k) (some of k random images hold it)."""
    counts = torch.bincount(captions).double()
    images, texts = len(captions), len(counts)
    scores = {}
    for k in ks:
        misses = torch.ones_like(counts)
        for i in range(min(k, images)):
            misses *= ((images - counts - i) / (images - i)).clamp(min=0)
        scores[f"chance_image_to_text_recall_at_{k}"] = min(k, texts) / texts
        scores[f"chance_text_to_image_recall_at_{k}"] = (1 - misses).mean().item()
    return scores


def evaluate(clip: Clip, test: CaptionedSplit, class_names: list[str], tokenizer: Tokenizer) -> tuple[dict[str, float], torch.Tensor]:
    """Recall@k both ways over the distinct test captions with their chance levels, zero-shot
    accuracy with its chance level (1 / classes), and the similarity matrix (N images, C captions)."""
    image_embeddings = embed_images(clip, test.images)
    similarity = image_embeddings @ embed_texts(clip, test.tokens).T
    prompts = embed_texts(clip, prompt_tokens(class_names, tokenizer).to(test.tokens.device))
    predicted = (image_embeddings @ prompts.T).argmax(1)
    return {
        **recall_at_k(similarity, test.captions), **chance_recall(test.captions),
        "zero_shot_accuracy": (predicted == test.images.labels).float().mean().item(),
        "zero_shot_chance": 1 / len(class_names),
        "test_captions": len(test.texts),
    }, similarity


def retrieval_figure(test: CaptionedSplit, similarity: torch.Tensor, count: int, seed: int, path: Path) -> None:
    """`count` random test images, each beside the 3 captions most similar to it (cosine
    similarity; its own caption in green, or named below in grey when not among them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picked = np.random.default_rng(seed).choice(len(test), size=min(count, len(test)), replace=False)
    fig, axes = plt.subplots(len(picked), 2, figsize=(8, 1.1 * len(picked)), width_ratios=[1, 7], squeeze=False)
    for (image_ax, text_ax), index in zip(axes, picked.tolist(), strict=True):
        image_ax.imshow(grid(test.images.images[index : index + 1].cpu().numpy(), ncols=1, pad=0)[..., 0], cmap="gray", vmin=0, vmax=255)
        own = int(test.captions[index])
        values, top = similarity[index].topk(min(3, len(test.texts)))
        for line, (value, caption) in enumerate(zip(values.tolist(), top.tolist(), strict=True)):
            text_ax.text(0, 0.8 - 0.3 * line, f"{value:.2f}  {test.texts[caption]}", fontsize=8,
                         color="tab:green" if caption == own else "black", weight="bold" if caption == own else "normal")
        if own not in top.tolist():
            text_ax.text(0, -0.1, f"own: {test.texts[own]}", fontsize=7, color="grey")
        for ax in (image_ax, text_ax):
            ax.axis("off")
    fig.suptitle("clip: test images and their top-3 captions (own caption in green)", fontsize=9)
    fig.subplots_adjust(top=0.94, hspace=0.15)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def recall_summary(metrics: dict[str, float]) -> str:
    """One line: recall@k both ways against chance, and zero-shot accuracy."""
    parts = [f"{way} R@{k} {metrics[f'{way}_recall_at_{k}']:.3f} (chance {metrics[f'chance_{way}_recall_at_{k}']:.3f})"
             for way in ("image_to_text", "text_to_image") for k in KS]
    return "; ".join(parts) + f"; zero-shot {metrics['zero_shot_accuracy']:.3f} (chance {metrics['zero_shot_chance']:.3f})"

