"""The training loop: resume after a kill, non-finite losses, EMA, schedule, DDP under torchrun."""

import math
import subprocess

import pytest
import torch

from tasks.params import TrainParams
from tasks.training import NonFiniteLoss, warmup_cosine
from tests.conftest import BIN, REPO
from tests.tiny_training import dataset, make_trainer


class Killed(Exception):
    pass


def test_interrupted_run_resumed_gives_the_same_weights(tmp_path):
    reference, _ = make_trainer(None, ema_decay=0.9)
    expected = reference.fit(reference.next_batch)

    checkpoint = tmp_path / "state.pt"
    first, _ = make_trainer(checkpoint, ema_decay=0.9, checkpoint_every=7)

    def dies_at_step_17(step):
        if step == 17:
            raise Killed
        return first.next_batch(step)

    with pytest.raises(Killed):
        first.fit(dies_at_step_17)
    assert checkpoint.exists()
    second, _ = make_trainer(checkpoint, ema_decay=0.9, checkpoint_every=7)
    assert second.start_step == 14
    resumed = second.fit(second.next_batch)
    for name, tensor in expected.module.state_dict().items():
        assert torch.equal(tensor, resumed.module.state_dict()[name]), name
    for name, tensor in expected.ema.state_dict().items():
        assert torch.equal(tensor, resumed.ema.state_dict()[name]), name


def test_training_lowers_the_loss_and_ema_differs_from_raw_weights():
    inputs, targets = dataset()
    trainer, _ = make_trainer(None, ema_decay=0.9)
    before = trainer.module((inputs, targets))["loss"].item()
    result = trainer.fit(trainer.next_batch)
    assert result.module((inputs, targets))["loss"].item() < 0.3 * before
    assert not torch.equal(result.ema.net[0].weight, result.module.net[0].weight)
    assert result.images_per_s > 0 and result.steps == 64


def test_checkpoint_from_other_params_is_ignored(tmp_path):
    checkpoint = tmp_path / "state.pt"
    trainer, _ = make_trainer(checkpoint, checkpoint_every=5)
    trainer.fit(trainer.next_batch)
    other, _ = make_trainer(checkpoint)
    other.fingerprint = "changed"
    assert other._resume() == 0


def test_nan_loss_stops_naming_the_step(tmp_path):
    trainer, _ = make_trainer(tmp_path / "state.pt", checkpoint_every=100)

    def poisoned(step):
        inputs, targets = trainer.next_batch(step)
        return (inputs * (float("nan") if step == 12 else 1.0), targets)

    with pytest.raises(NonFiniteLoss, match="at step 13"):
        trainer.fit(poisoned)
    assert not (tmp_path / "state.pt").exists()  # nothing saved from the poisoned run


def test_warmup_then_cosine_to_the_floor():
    factor = warmup_cosine(TrainParams(warmup_fraction=0.1, min_lr_ratio=0.1), 100)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(55) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert factor(100) == pytest.approx(0.1)


@pytest.mark.slow
def test_two_process_gloo_ddp_trains_and_ranks_agree(tmp_path):
    done = subprocess.run(
        [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "tests/tiny_training.py", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for name, tensor in rank0["weights"].items():
        assert torch.allclose(tensor, rank1["weights"][name], atol=1e-6), name
    assert not torch.equal(rank0["first_batch"], rank1["first_batch"])  # each rank its own shard
    start, _ = make_trainer(None)
    assert rank0["loss"] < 0.3 * start.module(dataset())["loss"].item()
