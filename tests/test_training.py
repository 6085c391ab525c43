"""The training loop: resume after a kill, non-finite losses, EMA, schedule, DDP under torchrun."""

import math
import subprocess
from collections.abc import Callable

import pytest
import torch

from tasks.params import TrainParams
from tasks.training import NonFiniteLoss, Trainer, TrainingContext, warmup_cosine
from tests.conftest import BIN, REPO
from tests.tiny_training import dataset, make_trainer


class Killed(Exception):
    pass


def losses(logged: list) -> dict[int, float]:
    """{step: train loss} of the logged rows of step metrics."""
    return {step: metrics["train/loss"] for metrics, step in logged if "train/loss" in metrics}


def test_interrupted_run_resumed_gives_the_same_weights_and_curves(tmp_path):
    """A resumed run logs the stopped run's curves up to its checkpoint again (its stage run's
    plots and MLflow run start at step 0), then goes on as the uninterrupted run did."""
    reference_log, resumed_log = [], []
    reference, _ = make_trainer(None, log=lambda *row: reference_log.append(row), ema_decay=0.9, checkpoint_every=7)
    expected = reference.fit(reference.next_batch)

    checkpoint = tmp_path / "state.pt"
    first, _ = make_trainer(checkpoint, ema_decay=0.9, checkpoint_every=7, log=lambda *row: None)

    def dies_at_step_17(step):
        if step == 17:
            raise Killed
        return first.next_batch(step)

    with pytest.raises(Killed):
        first.fit(dies_at_step_17)
    assert checkpoint.exists()
    second, _ = make_trainer(checkpoint, ema_decay=0.9, checkpoint_every=7, log=lambda *row: resumed_log.append(row))
    assert second.start_step == 14
    resumed = second.fit(second.next_batch)
    assert losses(resumed_log) == pytest.approx(losses(reference_log))  # the same steps, the same values
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


def stage_module(stage: str) -> tuple[torch.nn.Module, Callable[[int], object]]:
    """A real stage's training module at a tiny size, and its `next_batch`: two batches of 8x8 images in turn."""
    from tasks.params import SslParams, VaeParams
    from tasks.ssl import build_ssl
    from tasks.vae import build_vae_training

    torch.manual_seed(0)
    images, labels = torch.rand(16, 1, 8, 8) * 2 - 1, torch.arange(16) % 10

    def rows(step: int) -> slice:
        return slice((step % 2) * 8, (step % 2) * 8 + 8)

    if stage == "ssl":  # the augmentation (kornia) must stay outside the compiled graphs
        params = SslParams.model_validate({"resnet": {"width": 8, "depth": [1, 1]}, "simclr": {"proj_hidden_dim": 16, "proj_dim": 8}})
        return build_ssl(params, 1, 8), lambda step: images[rows(step)]
    # the discriminator joins after 2 of the 4 steps: the switch must not break or re-trace a graph
    params = VaeParams.model_validate({"downsample": 2, "width": 8, "adversarial": {"enabled": True, "width": 8}})
    module = build_vae_training(params, [1, 8, 8], 10, 4, torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten()))
    return module, lambda step: (images[rows(step)], labels[rows(step)])


def losses_of_a_run(stage: str, compiled: bool) -> tuple[list[float], torch.nn.Module]:
    """Each step's loss of 4 steps of the real Trainer on a stage module, and the trained module."""
    module, next_batch = stage_module(stage)
    train = TrainParams(epochs=4, batch_size=8, lr=1e-2, log_every=1, ema_decay=0.9, compile=compiled)
    logged = []
    trainer = Trainer(module, train, steps_per_epoch=1, seed=0, device=torch.device("cpu"),
                      log=lambda metrics, step: logged.append(metrics["train/loss"]))
    result = trainer.fit(next_batch)
    return logged, result.module


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["ssl", "vae"])
def test_compiled_stage_module_trains_as_eager_in_whole_graphs(stage):
    from torch._dynamo.utils import counters

    eager, _ = losses_of_a_run(stage, compiled=False)
    counters.clear()
    compiled, module = losses_of_a_run(stage, compiled=True)
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"], dict(counters["graph_break"])
    assert not any(name.startswith("_orig_mod") for name in module.state_dict())  # checkpoints unchanged
    assert compiled == pytest.approx(eager, rel=1e-3)


def test_lars_scales_each_matrix_update_by_its_trust_ratio_and_leaves_vectors_alone():
    from models.lars import LARS

    weight, bias = torch.nn.Parameter(torch.full((2, 3), 2.0)), torch.nn.Parameter(torch.ones(3))
    weight.grad, bias.grad = torch.full((2, 3), 0.5), torch.full((3,), 0.25)
    optimizer = LARS([weight, bias], lr=0.1, momentum=0.9, weight_decay=0.1, eta=0.01)
    optimizer.step()
    update = torch.full((2, 3), 0.5 + 0.1 * 2.0)  # gradient + weight decay
    trust = 0.01 * weight.detach().new_full((2, 3), 2.0).norm() / update.norm()
    first = 2.0 - 0.1 * trust * update  # the first step's buffer is the update itself
    torch.testing.assert_close(weight.detach(), first)
    torch.testing.assert_close(bias.detach(), torch.full((3,), 1 - 0.1 * 0.25))
    weight.grad, bias.grad = torch.zeros(2, 3), torch.zeros(3)
    optimizer.step()  # no gradient: only momentum moves them, 0.9 of the last step again
    torch.testing.assert_close(bias.detach(), torch.full((3,), 1 - 0.1 * 0.25 * 1.9))


def test_a_context_logged_as_a_prefix_names_each_step_metric_under_it_and_none_stays_none():
    logged = []
    context = TrainingContext("kd", log=lambda metrics, step: logged.append((metrics, step))).logged_as("with_kd/")
    context.log({"train/loss": 0.5, "lr": 0.1}, 3)
    assert logged == [({"with_kd/loss": 0.5, "with_kd/lr": 0.1}, 3)]
    assert TrainingContext("kd").logged_as("with_kd/").log is None  # a rank that logs nothing still logs nothing
