"""The bench: each training stage's speed on this device at a profile's model sizes, against the
device's own limit. Torch and the compute dependencies only: no Prefect, MLflow or DVC.

For each training stage (ssl, vae, diffusion, distill, gan) and each setup (the device's defaults,
then bf16 autocast, torch.compile and channels-last each flipped):
- images/s of the project's `Trainer` (augmentation, EMA, clipping, scheduler, hooks, logging)
  and of a bare loop of the same module (forward, backward, optimiser step) on the same batches;
  `overhead` = bare / Trainer images/s;
- FLOPs per training image (torch.utils.flop_counter: matmuls, convolutions, attention),
  the FLOP/s that makes at the Trainer's speed, and that over the peak a large matmul reaches
  here (bf16 on CUDA, fp32 on CPU): the model FLOP utilisation (MFU);
- peak memory (CUDA: allocated; CPU: the process's resident high-water mark, reset per run);
and for the teacher and the students, sampling images/s per network evaluation.
Data is synthetic (random images, latents and labels of the prepared shapes): speed does not
depend on the pixels.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from models.backbones import build_backbone
from models.diffusion import RectifiedFlow
from models.distill import ProgressiveDistillation, ReflowTraining
from models.samplers import guided
from tasks.artifacts import freeze
from tasks.device import autocast, channels_last, uses_bf16
from tasks.diffusion import build_denoiser_training
from tasks.distill import distill_method
from tasks.gan import build_gan_training, update_of
from tasks.params import TrainParams
from tasks.ssl import build_ssl
from tasks.training import Trainer, make_optimizer
from tasks.vae import build_vae_training

VARIANTS = ("defaults", "bf16", "compile", "channels_last")
NUM_CLASSES = 10


@dataclass(frozen=True)
class Setup:
    """How the networks run: autocast precision, torch.compile, memory layout."""

    precision: str  # "fp32" or "bf16"
    compile: bool
    channels_last: bool

    def label(self) -> str:
        return f"{self.precision}{' compile' if self.compile else ''}{' NHWC' if self.channels_last else ' NCHW'}"


def setups(device: torch.device, variants: list[str]) -> dict[str, Setup]:
    """The device's defaults (what `precision: auto`, `compile: false` and `channels_last: true`
    give), and each named switch flipped from them."""
    defaults = Setup("bf16" if uses_bf16(device) else "fp32", False, True)
    flipped = {
        "defaults": defaults,
        "bf16": Setup("fp32" if defaults.precision == "bf16" else "bf16", defaults.compile, defaults.channels_last),
        "compile": Setup(defaults.precision, not defaults.compile, defaults.channels_last),
        "channels_last": Setup(defaults.precision, defaults.compile, not defaults.channels_last),
    }
    unknown = sorted(set(variants) - set(flipped))
    if unknown:
        raise ValueError(f"unknown bench variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    return {name: flipped[name] for name in variants}


@dataclass
class Case:
    """One training stage at a profile's sizes: a fresh module (same init every call), its loop's
    params and a few batches on the device."""

    stage: str
    build: Callable[[], nn.Module]
    train: TrainParams
    batches: list
    batch_size: int


def _seeded(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def fresh() -> nn.Module:
        torch.manual_seed(0)
        return build()

    return fresh


def image_shape(prepare) -> tuple[int, int, int]:
    """(C, H, W) that prepare writes for these params."""
    channels = prepare.channels or (3 if prepare.source in ("cifar10", "folder") else 1)
    return channels, prepare.image_size, prepare.image_size


def stage_cases(params: dict, device: torch.device, batch_size: int | None = None, batches: int = 2) -> list[Case]:
    """The five training stages built from a profile's typed params (`{stage: params}`); the GAN's
    batches are one round of its schedule (critic_steps critic batches, then a generator batch)."""
    channels, height, width = image_shape(params["prepare"])
    ssl, vae, diffusion, distill, gan = (params[s] for s in ("ssl", "vae", "diffusion", "distill", "gan"))
    latent_shape = (vae.latent_channels, height // vae.downsample, width // vae.downsample)
    generator = torch.Generator().manual_seed(0)

    def images(size: int) -> torch.Tensor:
        return (torch.rand(size, channels, height, width, generator=generator) * 2 - 1).to(device)

    def latents(size: int) -> torch.Tensor:
        return torch.randn(size, *latent_shape, generator=generator).to(device)

    def labels(size: int) -> torch.Tensor:
        return torch.randint(0, NUM_CLASSES, (size,), generator=generator).to(device)

    def encoder() -> nn.Module:  # the frozen SSL backbone the perceptual loss runs through
        config = getattr(ssl, ssl.backbone).model_dump()
        return freeze(build_backbone(ssl.backbone, channels, height, **config)).to(device)

    def unet() -> nn.Module:
        return build_denoiser_training(diffusion, latent_shape[0], NUM_CLASSES).net

    reflow = distill_method("auto", diffusion.formulation) == "reflow"  # consistency is not benched

    def distillation() -> nn.Module:
        net = unet()
        if reflow:
            return ReflowTraining(net, RectifiedFlow(diffusion.flow.time_mean, diffusion.flow.time_std, 0.0))
        rounds = distill.progressive
        return ProgressiveDistillation(freeze(copy.deepcopy(net)), net, rounds.teacher_steps // 2, label_dropout=rounds.label_dropout)

    distill_train = distill.reflow.train if reflow else distill.progressive.train
    cases = []
    for stage, build, train in (
        ("ssl", lambda: build_ssl(ssl, channels, height), ssl.train),
        ("vae", lambda: build_vae_training(  # steps=0: no adversarial warm-up, the full step is timed
            vae, [channels, height, width], NUM_CLASSES, 0, encoder() if vae.perceptual_weight > 0 else None), vae.train),
        ("diffusion", lambda: build_denoiser_training(diffusion, latent_shape[0], NUM_CLASSES), diffusion.train),
        ("distill", distillation, distill_train),
        ("gan", lambda: build_gan_training(gan, latent_shape, NUM_CLASSES), gan.train),
    ):
        size = batch_size or train.batch_size
        if stage == "ssl":
            data = [images(size) for _ in range(batches)]
        elif stage == "vae":
            data = [(images(size), labels(size)) for _ in range(batches)]
        elif stage == "gan":
            data = [(latents(size), labels(size), update_of(step, gan.critic_steps)) for step in range(gan.critic_steps + 1)]
        elif stage == "distill" and reflow:
            data = [(latents(size), latents(size), labels(size)) for _ in range(batches)]
        else:
            data = [(latents(size), labels(size)) for _ in range(batches)]
        cases.append(Case(stage, _seeded(build), train, data, size))
    return cases


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory of what runs inside: CUDA's allocator peak, or on Linux CPUs the process's
    resident high-water mark (VmHWM, reset through /proc/self/clear_refs). None where neither works."""

    def __init__(self, device: torch.device):
        self.device, self.mib = device, None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with contextlib.suppress(OSError):
                Path("/proc/self/clear_refs").write_text("5")
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.mib = torch.cuda.max_memory_allocated(self.device) / 2**20
            return
        try:
            status = Path("/proc/self/status").read_text()
        except OSError:
            return
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                self.mib = int(line.split()[1]) / 1024


def trainer_images_per_s(case: Case, setup: Setup, device: torch.device, warmup: int, steps: int) -> tuple[float, float | None]:
    """The real Trainer: `warmup` steps (compilation, allocator), then `steps` timed; and peak memory."""
    train = case.train.model_copy(update={
        "epochs": 1.0, "batch_size": case.batch_size, "checkpoint_every": 10**9, "precision": setup.precision,
        "compile": setup.compile, "channels_last": setup.channels_last,
    })
    started = {}

    def next_batch(step: int):
        if step == warmup:
            synchronize(device)
            started["at"] = time.perf_counter()
        return case.batches[step % len(case.batches)]

    with PeakMemory(device) as memory, open(os.devnull, "w") as quiet, contextlib.redirect_stderr(quiet):
        trainer = Trainer(  # its progress bar goes to the null device, not into the table
            case.build(), train, steps_per_epoch=warmup + steps, seed=0, device=device,
            log=lambda metrics, step: None, desc=f"bench/{case.stage}",
        )
        trainer.fit(next_batch)  # its last step reads the losses back: the queue is drained
        seconds = time.perf_counter() - started["at"]
    return steps * case.batch_size / seconds, memory.mib


def bare_images_per_s(case: Case, setup: Setup, device: torch.device, warmup: int, steps: int) -> float:
    """Forward, backward and the same optimiser's step on the same batches, nothing else."""
    module = case.build().to(device)
    if setup.channels_last:
        channels_last(module)
    optimizer = make_optimizer(module, case.train)
    if setup.compile:
        module.compile()
    module.train()
    for step in range(warmup + steps):
        if step == warmup:
            synchronize(device)
            started = time.perf_counter()
        with autocast(device, setup.precision):
            loss = module(case.batches[step % len(case.batches)])["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    synchronize(device)
    return steps * case.batch_size / (time.perf_counter() - started)


class _Total:
    """FlopCounterMode's module tracker, reduced to the total the bench reads: the tracker's
    backward hooks fail under `torch.autograd.grad` (the GAN's gradient penalty)."""

    parents = frozenset({"Global"})

    def __enter__(self) -> None: ...

    def __exit__(self, *exc) -> None: ...


def training_flops_per_image(case: Case, device: torch.device) -> float:
    """FLOPs of one forward + backward (eager, float32), per image of the batch."""
    module = case.build().to(device).train()
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _Total()
    with counter:
        module(case.batches[0])["loss"].backward()
    return counter.get_total_flops() / case.batch_size


def peak_flops(device: torch.device) -> tuple[float, str]:
    """FLOP/s of the fastest of several large square matmuls: the device's practical peak (bf16 on
    CUDA, fp32 on CPU)."""
    size, dtype, repeats = (8192, torch.bfloat16, 20) if device.type == "cuda" else (2048, torch.float32, 8)
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    fastest = math.inf
    for _ in range(repeats + 2):
        synchronize(device)
        started = time.perf_counter()
        a @ b
        synchronize(device)
        fastest = min(fastest, time.perf_counter() - started)
    return 2 * size**3 / fastest, str(dtype).removeprefix("torch.")


def sampling_images_per_s(
    net: nn.Module, setup: Setup, latent_shape: tuple[int, ...], guidance: float, batch_size: int,
    device: torch.device, warmup: int, steps: int,
) -> float:
    """Images/s of one sampler step (one guided network evaluation) at `guidance`."""
    net = freeze(copy.deepcopy(net).to(device))
    if not setup.channels_last:
        net.to(memory_format=torch.contiguous_format)
    if setup.compile:
        net.compile()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, *latent_shape, generator=generator).to(device)
    labels = torch.randint(0, NUM_CLASSES, (batch_size,), generator=generator).to(device)
    with torch.no_grad(), autocast(device, setup.precision):
        for step in range(warmup + steps):
            if step == warmup:
                synchronize(device)
                started = time.perf_counter()
            guided(net, x, 0.5, labels, guidance)
    synchronize(device)
    return steps * batch_size / (time.perf_counter() - started)


@dataclass
class TrainingRow:
    profile: str
    stage: str
    variant: str
    setup: str
    batch_size: int
    trainer_images_per_s: float
    bare_images_per_s: float
    overhead: float  # bare / Trainer images/s: 1.0 means the loop costs nothing
    gflops_per_image: float
    achieved_tflops: float
    mfu: float
    peak_memory_mib: float | None


@dataclass
class SamplingRow:
    profile: str
    network: str  # teacher or student
    variant: str
    setup: str
    guidance: float
    batch_size: int
    images_per_s_per_evaluation: float


def run_bench(
    profiles: dict[str, dict], device: torch.device, variants: list[str], warmup: int = 2, steps: int = 5,
    batch_size: int | None = None, report: Callable[[str], None] = print,
) -> dict:
    """Every profile's training stages and samplers under each variant; a JSON-ready dict."""
    chosen = setups(device, variants)
    peak, peak_dtype = peak_flops(device)
    report(f"bench on {device_name(device)}: peak {peak / 1e12:.3f} TFLOP/s ({peak_dtype} matmul)")
    training, sampling = [], []
    for profile, params in profiles.items():
        for case in stage_cases(params, device, batch_size):
            flops = training_flops_per_image(case, device)
            for variant, setup in chosen.items():
                trainer_ips, memory = trainer_images_per_s(case, setup, device, warmup, steps)
                bare_ips = bare_images_per_s(case, setup, device, warmup, steps)
                row = TrainingRow(
                    profile, case.stage, variant, setup.label(), case.batch_size, trainer_ips, bare_ips,
                    bare_ips / trainer_ips, flops / 1e9, flops * trainer_ips / 1e12, flops * trainer_ips / peak, memory,
                )
                training.append(row)
                report(format_row(row))
        vae, diffusion, distill, fid = (params[s] for s in ("vae", "diffusion", "distill", "fid"))
        _, height, width = image_shape(params["prepare"])
        latent_shape = (vae.latent_channels, height // vae.downsample, width // vae.downsample)
        net = build_denoiser_training(diffusion, latent_shape[0], NUM_CLASSES).net
        student_guidance = 1.0 if distill_method("auto", diffusion.formulation) == "reflow" else distill.guidance
        size = batch_size or fid.batch_size
        for network, guidance in (("teacher", distill.guidance), ("student", student_guidance)):
            for variant, setup in chosen.items():
                ips = sampling_images_per_s(net, setup, latent_shape, guidance, size, device, warmup, steps)
                row = SamplingRow(profile, network, variant, setup.label(), guidance, size, ips)
                sampling.append(row)
                report(f"  sampling {profile}/{network} ({setup.label()}, guidance {guidance:g}): {ips:,.0f} images/s per evaluation")
    return {
        "device": device_name(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "peak_tflops": peak / 1e12, "peak_dtype": peak_dtype,
        "training": [asdict(row) for row in training], "sampling": [asdict(row) for row in sampling],
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({torch.get_num_threads()} threads)"


def format_row(row: TrainingRow) -> str:
    memory = "" if row.peak_memory_mib is None else f"{row.peak_memory_mib:,.0f}"
    return (
        f"  {row.profile:<8} {row.stage:<9} {row.setup:<18} {row.batch_size:>5} {row.trainer_images_per_s:>10,.0f} "
        f"{row.bare_images_per_s:>10,.0f} {row.overhead:>8.2f} {row.gflops_per_image:>8.4f} "
        f"{row.achieved_tflops:>8.3f} {100 * row.mfu:>6.1f}% {memory:>8}"
    )


HEADER = (
    f"  {'profile':<8} {'stage':<9} {'setup':<18} {'batch':>5} {'Trainer':>10} {'bare':>10} {'overhead':>8} "
    f"{'GFLOP/img':>8} {'TFLOP/s':>8} {'MFU':>7} {'peak MiB':>8}"
)


def table(result: dict) -> str:
    """The training rows (images/s of the Trainer and the bare loop) and the sampling rows, as text."""
    lines = [f"device: {result['device']}, torch {result['torch']}, peak {result['peak_tflops']:.3f} TFLOP/s ({result['peak_dtype']} matmul)",
             "training (images/s)", HEADER]
    lines += [format_row(TrainingRow(**row)) for row in result["training"]]
    lines.append("sampling (images/s per network evaluation)")
    for row in result["sampling"]:
        lines.append(
            f"  {row['profile']:<8} {row['network']:<9} {row['setup']:<18} guidance {row['guidance']:<4g} "
            f"batch {row['batch_size']:>5} {row['images_per_s_per_evaluation']:>10,.0f}"
        )
    return "\n".join(lines)

