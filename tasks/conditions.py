"""What a denoiser is asked for (diffusion.condition): a class label, or a caption.

A caption is an index into `caption_table` (tasks/captions.py): every caption prepare's template
writes, CAPTIONS_PER_CLASS a class, so its class is index // CAPTIONS_PER_CLASS and its attribute
bins follow from the index (`caption_bins`). The clip stage's frozen text encoder turns the table,
and the empty caption after it (classifier-free guidance's null), into the token features a
text-conditioned U-Net attends to; the net keeps them, so a trained denoiser needs nothing else.

Samples asked of a text-conditioned denoiser for a class get the caption of a random image of that
class in a split (`caption_requests`): the test split's captions for FID, whose reference is the
test split, and the train split's for distillation.
"""

from __future__ import annotations

import numpy as np
import torch

from tasks.artifacts import artifacts_dir, unreadable
from tasks.captions import (
    CAPTIONS_PER_CLASS,
    WORDS,
    Tokenizer,
    caption_bins,
    caption_table,
    label_words,
    measure,
    read_captions,
    to_bins,
)
from tasks.clip import VOCAB, load_clip
from tasks.data import PREPARED, load_manifest
from tasks.images import to_uint8


@torch.no_grad()
def caption_features(class_names: list[str], device: torch.device | str) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(the caption table of these classes, its captions' token features from the clip stage's
    frozen text encoder (rows, length, dim) with the empty caption's last, where those tokens are
    not padding (rows, length))."""
    texts, tokenizer = caption_table(class_names), Tokenizer.read(VOCAB)
    words = [tokenizer.split(text) for text in texts]
    if unknown := sorted({word for split in words for word in split} - set(tokenizer.ids))[:5]:
        raise unreadable(VOCAB, f"no token for the caption template's words {unknown}")
    if (longest := max(map(len, words)) + 2) > tokenizer.length:
        raise unreadable(VOCAB, f"length {tokenizer.length} cuts the template's longest caption ({longest} tokens)")
    tokens = torch.from_numpy(tokenizer.encode_batch([*texts, ""])).to(device)
    features, keep = load_clip(artifacts_dir("clip"), device).text_encoder.token_features(tokens)
    return texts, features.float(), keep


def split_conditions(split: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The caption_table index of each image's caption in a prepared split, in the images' order (N,)."""
    class_names = load_manifest()["class_names"]
    table = caption_table(class_names)
    if len(set(table)) < len(table):
        raise unreadable(PREPARED / "manifest.json", f"two class names read as one word in captions "
                                                      f"({', '.join(label_words(class_names))}): a caption would "
                                                      "not say which class it asks for")
    index = {text: i for i, text in enumerate(table)}
    texts = read_captions(PREPARED, split)
    if unknown := sorted(set(texts) - set(index))[:3]:
        raise unreadable(PREPARED / f"{split}_captions.json", f"captions the template does not write: {unknown}")
    return torch.tensor([index[text] for text in texts], device=device)


def caption_requests(classes: torch.Tensor, split: str, seed: int) -> torch.Tensor:
    """For each requested class, the caption_table index of the caption of a random image of that
    class in `split` (seeded): requests drawn as that split's captions are, class by class."""
    conditions = split_conditions(split)
    generator = torch.Generator().manual_seed(seed)
    requests = torch.empty(len(classes), dtype=torch.int64)
    wanted = classes.cpu()
    for label in wanted.unique().tolist():
        pool, asked = conditions[conditions // CAPTIONS_PER_CLASS == label], wanted == label
        if not len(pool):
            raise unreadable(PREPARED / f"{split}_captions.json", f"no caption of class {label} to request")
        requests[asked] = pool[torch.randint(len(pool), (int(asked.sum()),), generator=generator)]
    return requests.to(classes.device)


def attribute_agreement(images: torch.Tensor, conditions: torch.Tensor) -> dict[str, float]:
    """Per attribute, the share of generated `images` (float, [-1, 1]) whose measured word is the
    one their caption (`conditions`, caption_table indices) asked for, binned by the train split's
    edges as prepare binned the captions; a third each is chance."""
    edges = {name: info["edges"] for name, info in load_manifest()["captions"]["attributes"].items()}
    measured = to_bins(measure(to_uint8(images)), edges)
    asked = caption_bins(conditions.cpu().numpy())
    return {name: float(np.mean(measured[name] == asked[name])) for name in WORDS}
