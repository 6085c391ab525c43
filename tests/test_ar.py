"""The autoregressive prior over VQ-VAE codes: its causal mask (a code's logits never see the codes
after it), top-k and temperature sampling, bits per token, that training lowers the loss, the
stage's skip on a continuous latent, and the prior rebuilt from its files. The stage through `dvc
repro` with a VQ-VAE, scored by fid, is in tests/test_vae_regularisers.py (its VQ smoke run)."""

from __future__ import annotations

import math

import pytest
import torch

from models.ar import (
    ArConfig,
    CodePrior,
    NextTokenTraining,
    bits,
    next_token_loss,
    pick_tokens,
    sample_codes,
)
from tasks.ar import (
    bits_per_token,
    build_prior,
    export_prior,
    has_prior,
    load_prior,
    skip_reason,
    unigram_bits_per_token,
)
from tasks.params import ArParams, ParamsError, validate

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = ArConfig(vocab_size=12, num_classes=3, height=3, width=4, dim=32, depth=2, heads=4, dropout=0.0)


def test_the_logits_of_a_code_do_not_change_when_later_codes_change():
    torch.manual_seed(0)
    prior = CodePrior(CONFIG).eval()
    labels = torch.tensor([0, 1, 2, 1])
    codes = torch.randint(0, CONFIG.vocab_size, (4, CONFIG.length))
    logits = prior(labels, codes)
    assert logits.shape == (4, CONFIG.length, CONFIG.vocab_size)
    for place in range(CONFIG.length):
        changed = codes.clone()
        changed[:, place:] = (codes[:, place:] + 1 + torch.randint(0, CONFIG.vocab_size - 1, codes[:, place:].shape)) % CONFIG.vocab_size
        assert (changed[:, place:] != codes[:, place:]).all()
        after = prior(labels, changed)
        # the logits up to and including code `place`'s read only the class and the codes before it
        torch.testing.assert_close(after[:, : place + 1], logits[:, : place + 1], rtol=0, atol=1e-5)
        if place + 1 < CONFIG.length:  # and the next place does see the change: the mask is not vacuous
            assert not torch.allclose(after[:, place + 1], logits[:, place + 1], atol=1e-4)


def test_a_prefix_gives_the_same_logits_as_the_full_sequence_and_the_class_conditions_the_first_code():
    torch.manual_seed(1)
    prior = CodePrior(CONFIG).eval()
    labels, codes = torch.tensor([0, 2]), torch.randint(0, CONFIG.vocab_size, (2, CONFIG.length))
    full = prior(labels, codes)
    for known in range(CONFIG.length):
        torch.testing.assert_close(prior(labels, codes[:, :known]), full[:, : known + 1], rtol=0, atol=1e-5)
    first = prior(torch.arange(3), codes.new_zeros(3, 0))[:, 0]
    assert not torch.allclose(first[0], first[1]) and not torch.allclose(first[1], first[2])


def test_top_k_never_picks_a_code_outside_the_k_most_likely():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 50, generator=generator)
    top = logits.topk(5, dim=-1).indices
    picked = set()
    for _ in range(200):
        tokens = pick_tokens(logits, 2.0, 5, torch.rand(64, 50, generator=generator))
        assert (tokens[:, None] == top).any(1).all()
        picked.update(zip(range(64), tokens.tolist(), strict=True))
    assert len(picked) > 64 * 3  # a hot temperature spreads the draws over the k
    tokens = pick_tokens(logits, 1.0, 1, torch.rand(64, 50, generator=generator))
    torch.testing.assert_close(tokens, logits.argmax(-1))  # top-1 is greedy


def test_temperature_zero_is_the_argmax_and_a_small_one_tends_to_it():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(256, 20, generator=generator) * 3
    uniform = torch.rand(256, 20, generator=generator)
    torch.testing.assert_close(pick_tokens(logits, 0.0, None, uniform), logits.argmax(-1))
    torch.testing.assert_close(pick_tokens(logits, 1e-4, None, uniform), logits.argmax(-1))
    assert (pick_tokens(logits, 1.0, None, uniform) != logits.argmax(-1)).any()  # temperature 1 does sample


def test_draws_follow_the_softmax_at_temperature_one():
    logits = torch.tensor([[0.0, 1.0, 2.0]]).expand(20000, -1)
    tokens = pick_tokens(logits, 1.0, None, torch.rand(20000, 3, generator=torch.Generator().manual_seed(2)))
    shares = torch.bincount(tokens, minlength=3).float() / len(tokens)
    torch.testing.assert_close(shares, torch.softmax(logits[0], 0), atol=0.015, rtol=0)


def test_sampling_is_seeded_and_gives_full_grids_of_valid_codes():
    torch.manual_seed(3)
    prior = CodePrior(CONFIG).eval()
    labels = torch.tensor([0, 1, 2, 2])
    codes = sample_codes(prior, labels, 1.0, 4, torch.Generator().manual_seed(0))
    assert codes.shape == (4, CONFIG.length) and codes.min() >= 0 and codes.max() < CONFIG.vocab_size
    assert torch.equal(codes, sample_codes(prior, labels, 1.0, 4, torch.Generator().manual_seed(0)))
    greedy = sample_codes(prior, labels, 0.0, None, torch.Generator().manual_seed(5))
    assert torch.equal(greedy, sample_codes(prior, labels, 0.0, None, torch.Generator().manual_seed(6)))


def test_a_uniform_model_has_log2_of_the_codebook_bits_per_token():
    prior = CodePrior(CONFIG)
    torch.nn.init.zeros_(prior.head.weight), torch.nn.init.zeros_(prior.head.bias)  # every logit 0
    codes = torch.randint(0, CONFIG.vocab_size, (40, CONFIG.length))
    labels = torch.randint(0, CONFIG.num_classes, (40,))
    assert bits_per_token(prior, codes, labels, batch_size=16) == pytest.approx(math.log2(CONFIG.vocab_size), rel=1e-6)
    assert unigram_bits_per_token(codes, codes, CONFIG.vocab_size) < math.log2(CONFIG.vocab_size)


def test_training_on_a_toy_sequence_lowers_the_loss_below_the_uniform_baseline():
    """Each class's codes are a fixed pattern with one random code in it: a prior that learns the
    patterns needs far fewer bits than log2(vocab)."""
    torch.manual_seed(0)
    patterns = torch.randint(0, CONFIG.vocab_size, (CONFIG.num_classes, CONFIG.length))
    training = NextTokenTraining(CodePrior(CONFIG))
    optimizer = torch.optim.AdamW(training.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        labels = torch.randint(0, CONFIG.num_classes, (32,))
        codes = patterns[labels].clone()
        codes[:, 5] = torch.randint(0, CONFIG.vocab_size, (32,))  # the one place nothing predicts
        loss = training((codes, labels))["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(bits(loss.item()))
    uniform = math.log2(CONFIG.vocab_size)
    assert losses[0] == pytest.approx(uniform, abs=0.3)
    # the floor: the random code's log2(vocab) bits over `length` places
    assert sum(losses[-10:]) / 10 < 0.3 * uniform, losses[-10:]


def test_the_loss_is_the_cross_entropy_of_each_code_given_the_ones_before():
    torch.manual_seed(4)
    prior = CodePrior(CONFIG).eval()
    labels, codes = torch.tensor([1, 0]), torch.randint(0, CONFIG.vocab_size, (2, CONFIG.length))
    reference = []
    for place in range(CONFIG.length):
        logits = prior(labels, codes[:, :place])[:, -1]
        reference.append(torch.nn.functional.cross_entropy(logits, codes[:, place], reduction="none"))
    torch.testing.assert_close(next_token_loss(prior, labels, codes), torch.stack(reference).mean(), atol=1e-5, rtol=1e-5)


def test_the_prior_rebuilds_from_its_files_with_its_sampling_settings(tmp_path):
    params = ArParams(dim=16, depth=1, heads=2, temperature=0.7, top_k=3)
    torch.manual_seed(0)
    prior = build_prior(params, vocab_size=10, num_classes=2, grid_shape=(2, 3)).eval()
    assert not has_prior(tmp_path)
    export_prior(prior, params, tmp_path)
    loaded, sampling = load_prior(tmp_path)
    assert has_prior(tmp_path) and sampling == {"temperature": 0.7, "top_k": 3}
    assert loaded.config == prior.config and loaded.config.length == 6
    labels, codes = torch.tensor([0, 1]), torch.randint(0, 10, (2, 6))
    torch.testing.assert_close(loaded(labels, codes), prior(labels, codes))


def test_only_a_vae_with_a_codebook_gives_codes_to_model():
    assert skip_reason({"codebook_size": 0}) and "vq" in skip_reason({"codebook_size": 0})
    assert skip_reason({"codebook_size": 64}) is None


def test_the_params_refuse_heads_that_do_not_divide_the_width():
    with pytest.raises(ParamsError, match="heads must divide dim"):
        validate("ar", {"dim": 30, "heads": 4})
    with pytest.raises(ParamsError, match="top_k"):
        validate("ar", {"top_k": 0})
