"""Text-conditioned latent diffusion (diffusion.condition: text): the caption table's arithmetic,
the U-Net's cross-attention (padding is never attended to, the label reaches the net only through
its caption's tokens, the empty caption is CFG's null), every sampler of a text-conditioned net,
its export, and the params that refuse what it cannot do."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from models.samplers import guided
from models.unet import UNet, UNetConfig
from tasks.artifacts import ArtifactError
from tasks.captions import (
    CAPTIONS_PER_CLASS,
    WORDS,
    caption_bins,
    caption_index,
    caption_table,
    captions,
)
from tasks.diffusion import SAMPLERS, Denoiser, export_denoiser, load_denoiser
from tasks.params import DiffusionParams, EDMParams, UNetParams
from tests.defaults import defaults

pytestmark = pytest.mark.usefixtures("one_thread")

CAPTIONS, LENGTH, TEXT_DIM = 4, 7, 8


def caption_tokens() -> tuple[torch.Tensor, torch.Tensor]:
    """A table of CAPTIONS random captions and the empty one (last): caption i keeps i + 3 tokens,
    the empty caption its <bos> and <eos>; the padding holds random features too."""
    features = torch.randn(CAPTIONS + 1, LENGTH, TEXT_DIM)
    kept = torch.tensor([*(i + 3 for i in range(CAPTIONS)), 2])
    return features, torch.arange(LENGTH)[None] < kept[:, None]


def text_unet() -> UNet:
    """A text-conditioned U-Net with every weight random (the zero-initialised branches too, so that
    each cross-attention acts on the output)."""
    torch.manual_seed(0)
    config = UNetConfig(
        2, CAPTIONS, **defaults(UNetParams, channels=8, channel_mults=(1, 2), attention_heads=2, cross_attention_levels=(0, 1)),
        text_length=LENGTH, text_dim=TEXT_DIM,
    )
    net = UNet(config).eval()
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.normal_(0, 0.3)
    net.set_captions(*caption_tokens())
    return net


def outputs(net: UNet, labels: list[int]) -> torch.Tensor:
    """The net's output for each label, on the same input (x, t)."""
    torch.manual_seed(1)
    x, t = torch.randn(1, 2, 4, 4).expand(len(labels), -1, -1, -1), torch.full((len(labels),), 0.4)
    with torch.no_grad():
        return net(x, t, torch.tensor(labels))


def test_padding_is_never_attended_to_and_the_kept_tokens_are():
    net = text_unet()
    labels = list(range(CAPTIONS + 1))  # every caption and the null one
    before = outputs(net, labels)
    features, keep = net.caption_tokens.clone(), net.caption_keep.clone()
    net.set_captions(torch.where(keep[..., None], features, 100 * torch.randn_like(features)), keep)
    torch.testing.assert_close(outputs(net, labels), before, rtol=0, atol=1e-5)
    features[:, 1] += torch.randn(len(features), TEXT_DIM)  # a kept token (the first word; <bos> is 0)
    net.set_captions(features, keep)
    changed = (outputs(net, labels) - before).flatten(1).abs().amax(1)
    assert (changed > 1e-3).all(), changed


def test_the_label_reaches_the_net_only_through_its_captions_tokens():
    net = text_unet()
    assert not hasattr(net, "class_embedding")
    features, keep = net.caption_tokens.clone(), net.caption_keep.clone()
    features[2], keep[2] = features[0], keep[0]  # caption 2 now reads as caption 0
    net.set_captions(features, keep)
    same, other = outputs(net, [0, 2]), outputs(net, [0, 1])
    torch.testing.assert_close(same[0], same[1])
    assert (other[0] - other[1]).abs().max() > 1e-3


def test_cfgs_null_path_is_the_empty_caption():
    """guided() asks for null_label, the table's last row: the empty caption's two tokens."""
    net = text_unet()
    assert net.null_label == CAPTIONS and net.caption_keep[CAPTIONS].sum() == 2
    torch.manual_seed(0)
    x, labels, scale = torch.randn(3, 2, 4, 4), torch.tensor([0, 1, 3]), 3.0
    with torch.no_grad():
        t = torch.full((3,), 0.5)
        cond, uncond = net(x, t, labels), net(x, t, torch.full_like(labels, CAPTIONS))
        torch.testing.assert_close(guided(net, x, 0.5, labels, scale), uncond + scale * (cond - uncond), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("formulation", "sampler"), [(f, s) for f, samplers in SAMPLERS.items() for s in samplers])
def test_every_sampler_samples_a_text_conditioned_denoiser_and_follows_its_caption(formulation, sampler):
    edm = EDMParams().model_dump(exclude={"p_mean", "p_std", "sampler"}) if formulation in ("edm", "consistency") else {}
    flow_time = {"time_mean": 0.0, "time_std": 1.0} if formulation == "flow" else {}
    texts = [f"caption {i}" for i in range(CAPTIONS)]
    denoiser = Denoiser(text_unet(), formulation, sampler, (2, 4, 4), flow_time, edm, texts)
    conditions = torch.tensor([0, 0, 1, 1])
    samples = denoiser.sample(conditions, steps=2, guidance=2.0, seed=0)
    assert samples.shape == (4, 2, 4, 4) and torch.isfinite(samples).all()
    same_noise = denoiser.sample(torch.tensor([0, 1, 0, 1]), steps=2, guidance=2.0, seed=0)
    assert (same_noise[1] - samples[1]).abs().max() > 1e-3  # the same noise, another caption


def test_a_text_conditioned_denoiser_round_trips_with_its_caption_table(tmp_path):
    texts = [f"caption {i}" for i in range(CAPTIONS)]
    denoiser = Denoiser(text_unet(), "flow", "euler", (2, 4, 4), {"time_mean": 0.0, "time_std": 1.0}, {}, texts)
    export_denoiser(denoiser, tmp_path)
    loaded = load_denoiser(tmp_path)
    assert loaded.captions == texts and loaded.net.config == denoiser.net.config
    torch.testing.assert_close(outputs(loaded.net, [0, 3, CAPTIONS]), outputs(denoiser.net, [0, 3, CAPTIONS]))
    assert loaded.classes(torch.tensor([0, CAPTIONS_PER_CLASS + 5])).tolist() == [0, 1]


def test_the_caption_table_holds_every_caption_at_its_index():
    names = [str(k) for k in range(10)]
    table = caption_table(names)
    assert len(table) == len(set(table)) == 10 * CAPTIONS_PER_CLASS == 810
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 200)
    bins = {name: rng.integers(0, len(words), 200) for name, words in WORDS.items()}
    written = captions(labels, bins, names)
    for i, text in enumerate(written):
        index = caption_index(int(labels[i]), [int(bins[name][i]) for name in WORDS])
        assert table[index] == text
        assert {name: int(b) for name, b in caption_bins(np.array(index)).items()} == {name: int(bins[name][i]) for name in WORDS}
    assert all(caption_index(c, ks) // CAPTIONS_PER_CLASS == c for c, ks in itertools.product(range(10), [(2, 0, 1, 2)]))


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"condition": "text", "backbone": "dit"}, "backbone: unet"),
        ({"condition": "text", "classifier": {"epochs": 1}}, "classifier.epochs"),
        ({"condition": "text", "unet": {"channel_mults": [1, 2], "cross_attention_levels": [2]}}, "cross_attention_levels"),
        ({"condition": "text", "unet": {"channels": 12, "attention_heads": 8, "channel_mults": [1, 2]}}, "each unet.cross_attention_levels"),
    ],
)
def test_params_refuse_what_text_conditioning_cannot_do_by_name(overrides, named):
    with pytest.raises(ValidationError, match=named):
        DiffusionParams(**overrides)
    DiffusionParams(**{**overrides, "condition": "class", "classifier": {}})  # class conditioning ignores them


def test_a_denoiser_written_before_text_conditioning_loads_and_a_short_caption_table_is_refused(tmp_path):
    texts = [f"caption {i}" for i in range(CAPTIONS)]
    export_denoiser(Denoiser(text_unet(), "flow", "euler", (2, 4, 4), {"time_mean": 0.0, "time_std": 1.0}, {}, texts), tmp_path)
    path = tmp_path / "denoiser.json"
    saved = json.loads(path.read_text())
    path.write_text(json.dumps({**saved, "captions": texts[:-1]}))
    with pytest.raises(ArtifactError, match=f"{CAPTIONS - 1} captions for a net of {CAPTIONS}"):
        load_denoiser(tmp_path)

    config = UNetConfig(2, 3, **defaults(UNetParams, channels=8, channel_mults=(1,), attention_heads=2))
    export_denoiser(Denoiser(UNet(config), "flow", "euler", (2, 4, 4), {"time_mean": 0.0, "time_std": 1.0}), tmp_path)
    saved = json.loads(path.read_text())
    del saved["unet"]["cross_attention_levels"], saved["captions"]  # as the class-conditioned code wrote it
    path.write_text(json.dumps(saved))
    assert load_denoiser(tmp_path).net.config.cross_attention_levels == ()
