"""A tiny real training job for the loop's tests; also run under torchrun by the DDP test:
`torchrun --nproc_per_node 2 tests/tiny_training.py OUT_DIR` writes each rank's weights."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from tasks.data import EpochBatches
from tasks.device import Distributed
from tasks.params import TrainParams
from tasks.training import Trainer


class Regression(nn.Module):
    """A small MLP fitting a fixed random linear map; forward(batch) -> {"loss"}."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Dropout(0.1), nn.GELU(), nn.Linear(32, 4))

    def forward(self, batch):
        inputs, targets = batch
        return {"loss": nn.functional.mse_loss(self.net(inputs), targets)}


def dataset(n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(123)
    inputs = torch.randn(n, 8, generator=generator)
    return inputs, inputs @ torch.randn(8, 4, generator=generator)


def make_trainer(checkpoint: Path | None, dist: Distributed | None = None, log=None, **train) -> tuple[Trainer, EpochBatches]:
    dist = dist or Distributed()
    torch.manual_seed(0)
    params = TrainParams(**{"epochs": 8, "batch_size": 32, "lr": 2e-2, "log_every": 2, **train})
    inputs, targets = dataset()
    batches = EpochBatches(len(inputs), params.batch_size, seed=1, rank=dist.rank, world=dist.world)
    trainer = Trainer(
        Regression(), params, steps_per_epoch=batches.steps_per_epoch, seed=1,
        checkpoint=checkpoint, fingerprint="tiny", log=log, dist=dist, device=torch.device("cpu"),
    )
    trainer.next_batch = lambda step: (inputs[batches(step)], targets[batches(step)])
    return trainer, batches


if __name__ == "__main__":
    out = Path(sys.argv[1])
    dist = Distributed.from_env()
    trainer, _ = make_trainer(None, dist, ema_decay=0.9)
    first_batch = trainer.next_batch(0)[0]
    result = trainer.fit(trainer.next_batch)
    torch.save(
        {"weights": result.module.state_dict(), "first_batch": first_batch, "loss": result.module(dataset())["loss"].item()},
        out / f"rank{dist.rank}.pt",
    )
