"""The one training loop: device, bf16 autocast, channels-last layout, torch.compile of the
networks, clipping, EMA, warmup + cosine, progress bar, step metrics, resumable checkpoints and
DistributedDataParallel under torchrun.

The trained module's `forward(batch)` returns a dict with a scalar "loss" (and any other
scalars to log). Optional hooks on the module:
- `param_groups()`: the optimiser's groups (default: decay on >=2-D weights only);
- `after_step(step, total_steps)`: e.g. momentum-encoder updates, after each optimiser step;
- `sync_batch_norm = True`: under DDP on GPUs, its batch norms become SyncBatchNorm (statistics
  over the global batch; torch's runs on GPUs only, so gloo ranks on CPU keep per-rank ones);
- `compile()`: with `compile: true`, what to torch.compile (nn.Module's default: the whole
  forward; the stages' modules compile their networks and leave augmentation and Python eager).

A step reads nothing back to the host: the step's scalars are stacked on the device and read
once per `log_every` steps (with the NaN check), so the GPU never waits for the Python loop.

Every step re-seeds torch from (seed, step, rank), so a resumed run draws exactly the
batches and augmentations an uninterrupted one would.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from models.ema import EMA
from models.lars import LARS
from tasks.artifacts import checkpoint_path
from tasks.data import EpochBatches
from tasks.device import Distributed, autocast, channels_last, pick_device
from tasks.errors import StageError
from tasks.params import TrainParams

REDRAW_SECONDS = 1.0  # the progress bar on a terminal
LOGGED_REDRAW_SECONDS = 30.0  # into a log file or a pipe, where each redraw is kept: ~40 lines for a 20-minute stage


class NonFiniteLoss(StageError, RuntimeError):
    """The loss became NaN or infinite; the message names the step."""


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    return (seed * 1_000_003 + step * 9_176 + rank * 7_919) % (2**63 - 1)


def total_steps(train: TrainParams, steps_per_epoch: int) -> int:
    return max(1, math.ceil(train.epochs * steps_per_epoch))


def default_param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and kernels only; biases, norms and embeddings-of-1-D skip it."""
    decay, no_decay = [], []
    for param in module.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(module: nn.Module, train: TrainParams) -> torch.optim.Optimizer:
    hook = getattr(module, "param_groups", None)
    groups = hook() if callable(hook) else default_param_groups(module, train.weight_decay)
    groups = [g for g in groups if g["params"]]
    if train.optimizer == "adamw":  # fused: one kernel for all parameters (CUDA; on CPU 3-4x faster too)
        fused = groups[0]["params"][0].device.type in ("cuda", "cpu")
        return torch.optim.AdamW(groups, lr=train.lr, betas=(0.9, 0.99), fused=fused)
    if train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=train.lr, momentum=train.momentum, nesterov=True)
    return LARS(groups, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay)


def warmup_cosine(train: TrainParams, steps: int) -> Callable[[int], float]:
    """Linear warmup to 1, then cosine decay to min_lr_ratio."""
    warmup = int(train.warmup_fraction * steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return train.min_lr_ratio + (1 - train.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


@dataclass
class TrainResult:
    module: nn.Module  # the trained weights (unwrapped)
    ema: nn.Module | None  # the EMA weights, when ema_decay is set
    steps: int
    seconds: float  # wall time of the steps this process ran
    images_per_s: float  # global throughput over those steps
    evaluation: dict[str, float]  # the last `evaluate` result (rank 0; empty without one)


class Trainer:
    """Trains one module with the loop described at the top of this file."""

    def __init__(
        self,
        module: nn.Module,
        train: TrainParams,
        *,
        steps_per_epoch: int,
        seed: int,
        checkpoint: Path | None = None,
        fingerprint: str = "",
        log: Callable[[dict[str, float], int], None] | None = None,
        device: torch.device | None = None,
        dist: Distributed | None = None,
        desc: str = "train",
    ):
        self.train = train
        self.dist = dist or Distributed()
        self.device = device or pick_device(self.dist)
        if self.dist.world > 1 and self.device.type == "cuda" and getattr(module, "sync_batch_norm", False):
            module = nn.SyncBatchNorm.convert_sync_batchnorm(module)  # torch's runs on GPUs only
        self.module = module.to(self.device)
        self.steps_per_epoch = steps_per_epoch
        self.steps = total_steps(train, steps_per_epoch)
        self.seed = seed
        self.checkpoint = checkpoint
        self.fingerprint = fingerprint
        self.log = log if self.dist.is_main else None
        self.history: list[list] = []  # [step, metrics] as logged, kept in checkpoints (`_log`)
        self.desc = desc
        self.local_batch = max(1, train.batch_size // self.dist.world)
        if train.channels_last:
            channels_last(self.module)
        self.optimizer = make_optimizer(self.module, train)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(train, self.steps))
        self.ema = EMA(self.module, train.ema_decay) if train.ema_decay is not None else None
        self.forward: nn.Module = self.module
        if self.dist.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            find_unused = getattr(module, "ddp_find_unused_parameters", False)
            self.forward = DistributedDataParallel(self.module, device_ids=ids, find_unused_parameters=find_unused)
        if train.compile:
            self.module.compile()  # in place: state_dict keys and checkpoints stay as they are
        self.start_step = self._resume()

    # -- checkpoints -------------------------------------------------------------------
    CHECKPOINT_KEYS = {"step", "fingerprint", "module", "optimizer", "scheduler", "ema", "history"}

    def _state(self, step: int) -> dict:
        return {
            "step": step,
            "fingerprint": self.fingerprint,
            "module": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "history": self.history,
        }

    def save(self, step: int) -> None:
        if self.checkpoint is None or not self.dist.is_main:
            return
        self.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.checkpoint.with_name(self.checkpoint.name + ".tmp")
        torch.save(self._state(step), tmp)
        os.replace(tmp, self.checkpoint)

    def _resume(self) -> int:
        """The step to start from: the checkpoint's, when it loads and was made with this stage's
        params, deps and world size. One that does not load is set aside (`<name>.corrupt`)."""
        if self.checkpoint is None or not self.checkpoint.exists():
            return 0
        try:
            state = torch.load(self.checkpoint, map_location=self.device, weights_only=True)
        except Exception as err:  # nothing but tensors and plain containers is unpickled
            return self._set_aside(f"truncated, or not a checkpoint of plain tensors: {type(err).__name__}")
        try:
            self._check_state(state)
        except ValueError as err:
            return self._set_aside(str(err))
        if state["fingerprint"] != self.fingerprint:
            if self.dist.is_main:
                print(f"[{self.desc}] ignoring {self.checkpoint}: it was made with other params or data")
            return 0
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        if self.dist.is_main:
            print(f"[{self.desc}] resuming from step {state['step']} of {self.steps} ({self.checkpoint})")
        for step, metrics in state["history"]:  # the curves of the run that stopped, up to its checkpoint
            self._log(metrics, step)
        return int(state["step"])

    def _set_aside(self, reason: str) -> int:
        """Rename the checkpoint that does not load to `<name>.corrupt`, say so, start from step 0."""
        if self.dist.is_main:
            aside = self.checkpoint.with_name(self.checkpoint.name + ".corrupt")
            self.checkpoint.replace(aside)
            print(f"[{self.desc}] {self.checkpoint} does not load ({reason}); set it aside as {aside.name} "
                  "and training from step 0")
        return 0

    def _check_state(self, state: object) -> None:
        """Raise ValueError unless `state` is a checkpoint of this trainer (what `_state` saves), so
        that loading it cannot fail halfway."""
        if not isinstance(state, dict) or set(state) != self.CHECKPOINT_KEYS:
            raise ValueError("not a training checkpoint")
        if state["fingerprint"] != self.fingerprint:
            return  # ignored, never loaded
        if not all(isinstance(state[key], dict) for key in ("module", "optimizer", "scheduler")):
            raise ValueError("its module, optimizer or scheduler state is not a mapping")
        if not isinstance(state["history"], list) or not all(
            isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], dict) for entry in state["history"]
        ):
            raise ValueError("its history is not a list of [step, metrics]")
        for name, module in (("module", self.module), ("ema", self.ema)):
            expected = None if module is None else {k: v.shape for k, v in module.state_dict().items()}
            found = state[name]
            if isinstance(found, dict):
                found = {k: getattr(v, "shape", None) for k, v in found.items()}
            if found != expected:
                raise ValueError(f"its {name} weights do not fit the model")
        if not isinstance(state["step"], int) or not 0 <= state["step"] <= self.steps:
            raise ValueError(f"step {state['step']!r} is outside 0..{self.steps}")

    # -- the loop ----------------------------------------------------------------------
    def fit(
        self,
        next_batch: Callable[[int], object],
        *,
        evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
        evaluate_every: int = 0,
    ) -> TrainResult:
        """Run the remaining steps. `next_batch(step)` returns what the module's forward takes;
        `evaluate(module)` (rank 0, every `evaluate_every` steps and at the end) returns metrics."""
        train, dist = self.train, self.dist
        self.module.train()
        names: list[str] = []  # the logged scalars, in the order each step stacks them
        window: list[torch.Tensor] = []
        window_start = time.perf_counter()
        started = window_start
        bar = tqdm(
            total=self.steps, initial=self.start_step, desc=self.desc, unit="step",
            disable=not dist.is_main, dynamic_ncols=True, mininterval=REDRAW_SECONDS if sys.stderr.isatty() else LOGGED_REDRAW_SECONDS,
        )
        for step in range(self.start_step, self.steps):
            torch.manual_seed(step_seed(self.seed, step, dist.rank))
            batch = next_batch(step)
            with autocast(self.device, train.precision):
                outputs = self.forward(batch)
            loss = outputs["loss"]
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            logged = {k: v.detach().float() for k, v in outputs.items()}
            if train.grad_clip is not None:
                logged["grad_norm"] = nn.utils.clip_grad_norm_(self.module.parameters(), train.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update(self.module, decay=0.0 if step == 0 else None)  # the first update copies
            hook = getattr(self.module, "after_step", None)
            if callable(hook):
                hook(step, self.steps)
            names = names or list(logged)
            window.append(torch.stack([logged[name] for name in names]))

            done = step + 1
            boundary = done % train.log_every == 0 or done % train.checkpoint_every == 0 or done == self.steps
            if boundary:
                metrics = self._read_window(names, window, done - len(window))
                elapsed = time.perf_counter() - window_start
                metrics["lr"] = self.scheduler.get_last_lr()[0]
                metrics["images_per_s"] = len(window) * train.batch_size / max(elapsed, 1e-9)
                metrics["epoch"] = done / self.steps_per_epoch
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", img_s=f"{metrics['images_per_s']:.0f}", refresh=False)  # redrawn at most once a second
                self._log({f"train/{k}": v for k, v in metrics.items()}, done)
                window, window_start = [], time.perf_counter()
            if evaluate is not None and dist.is_main and evaluate_every and done % evaluate_every == 0 and done != self.steps:
                self._evaluate(evaluate, done)
            if done % train.checkpoint_every == 0 and done != self.steps:
                self.save(done)
            bar.update(1)
        bar.close()
        seconds = time.perf_counter() - started
        ran = self.steps - self.start_step
        self.save(self.steps)
        evaluation = self._evaluate(evaluate, self.steps) if evaluate is not None and dist.is_main else {}
        return TrainResult(
            module=self.module,
            ema=self.ema.module if self.ema is not None else None,
            steps=self.steps,
            seconds=seconds,
            images_per_s=ran * train.batch_size / max(seconds, 1e-9),
            evaluation=evaluation,
        )

    def _evaluate(self, evaluate: Callable[[nn.Module], dict[str, float]], step: int) -> dict[str, float]:
        self.module.eval()
        with torch.no_grad(), autocast(self.device, self.train.precision):
            metrics = evaluate(self.ema.module if self.ema is not None else self.module)
        self.module.train()
        if metrics:
            self._log({f"eval/{k}": v for k, v in metrics.items()}, step)
        if self.dist.is_main and metrics:
            tqdm.write(f"[{self.desc}] step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        return metrics

    def _log(self, metrics: dict[str, float], step: int) -> None:
        """Send step metrics to the stage run (rank 0), and keep them for the next checkpoint: a run
        that resumes from it logs them again, so its curves start at step 0."""
        if self.log:
            self.history.append([step, metrics])
            self.log(metrics, step)

    def _read_window(self, names: list[str], window: list[torch.Tensor], first_step: int) -> dict[str, float]:
        """The window's mean of each logged scalar, read back in one transfer with every step's
        loss; a non-finite loss stops the run naming its step."""
        steps = torch.stack(window)  # (steps, scalars)
        losses = steps[:, names.index("loss")]
        values = torch.cat([steps.mean(0), losses]).tolist()
        means, losses = values[: len(names)], values[len(names) :]
        for offset, value in enumerate(losses):
            if not math.isfinite(value):
                raise NonFiniteLoss(
                    f"{self.desc}: the loss became {value} at step {first_step + offset + 1}; "
                    "try a lower lr, grad_clip, or fp32 precision"
                )
        return dict(zip(names, means, strict=True))


@dataclass
class TrainingContext:
    """What every trainer of one stage run shares: the stage (its checkpoint folder), the device and
    ranks, the fingerprint a checkpoint must match, and where step metrics go."""

    stage: str
    device: torch.device = torch.device("cpu")
    dist: Distributed = Distributed()
    fingerprint: str = ""
    log: Callable[[dict[str, float], int], None] | None = None

    @classmethod
    def of(cls, run) -> TrainingContext:
        """The context of a stage run (anything with `stage`, `device`, `dist`, `fingerprint`, `log`)."""
        return cls(run.stage, run.device, run.dist, run.fingerprint, run.log)

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def logged_as(self, prefix: str) -> TrainingContext:
        """This context with its step metrics logged as `<prefix><metric>` (`train/` dropped): a
        stage's second network beside its first (kd's `<name>/loss`, diffusion's `classifier.loss`)."""
        log = self.log
        return replace(self, log=log and (
            lambda metrics, step: log({prefix + key.removeprefix("train/"): value for key, value in metrics.items()}, step)
        ))

    def trainer(
        self, module: nn.Module, train: TrainParams, rows: int, seed: int, name: str | None = None
    ) -> tuple[Trainer, EpochBatches]:
        """The one loop for `module` over `rows` training rows, with a resumable checkpoint (one per
        `name` when a stage trains several), and the batches it draws."""
        batches = EpochBatches(rows, train.batch_size, seed, self.dist.rank, self.dist.world, self.device)
        checkpoint = checkpoint_path(self.stage)
        trainer = Trainer(
            module, train, steps_per_epoch=batches.steps_per_epoch, seed=seed,
            checkpoint=checkpoint.with_name(f"{name}.pt") if name else checkpoint, fingerprint=self.fingerprint,
            log=self.log, device=self.device, dist=self.dist, desc=f"{self.stage}/{name}" if name else self.stage,
        )
        return trainer, batches
