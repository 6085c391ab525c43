"""Several processes: SimCLR's negatives gathered across ranks, batch norms kept plain in the
exported encoder, and a 2-process gloo run of the ssl stage through `dvc repro`."""

import json
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from models.ssl_losses import nt_xent
from tests.conftest import run, run_env

GLOBAL_BATCH, DIM, TEMPERATURE = 8, 5, 0.3


def embeddings() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(GLOBAL_BATCH, DIM, generator=generator), torch.randn(GLOBAL_BATCH, DIM, generator=generator)


def rank_loss(rank: int, world: int, store: str, out: str) -> None:
    """One gloo rank: the loss of its shard of the global batch, and the gradient of its rows."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    z1, z2 = (z.chunk(world)[rank].clone().requires_grad_() for z in embeddings())
    loss = nt_xent(z1, z2, TEMPERATURE)
    loss.backward()
    torch.save({"loss": loss.detach(), "grad1": z1.grad, "grad2": z2.grad}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow  # two processes
def test_two_rank_nt_xent_is_the_one_process_loss_of_the_global_batch(tmp_path):
    z1, z2 = (z.clone().requires_grad_() for z in embeddings())
    expected = nt_xent(z1, z2, TEMPERATURE)
    expected.backward()

    mp.spawn(rank_loss, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    # each rank scores its own rows against every rank's: the mean of the ranks' losses is the loss
    assert torch.stack([r["loss"] for r in ranks]).mean().item() == pytest.approx(expected.item(), rel=1e-5)
    assert abs(ranks[0]["loss"] - ranks[1]["loss"]) > 1e-3  # and each rank's is its own, not a copy
    # the gradient flows back through the gather; DDP's mean over ranks makes it the global one
    for name, full in (("grad1", z1.grad), ("grad2", z2.grad)):
        gathered = torch.cat([r[name] for r in ranks]) / 2
        assert torch.allclose(gathered, full, atol=1e-6), name


def test_sync_batch_norm_encoder_exports_as_plain_batch_norm(tmp_path):
    from models.backbones import build_backbone
    from tasks.encoder import export_encoder, load_encoder

    config = {"name": "resnet", "in_channels": 1, "image_size": 8, "width": 8, "depth": [1, 1], "stem_stride": 1}
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(build_backbone(**config))  # what the Trainer does on GPUs
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())
    export_encoder(synced, config, tmp_path)
    loaded = load_encoder(tmp_path)
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in loaded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in loaded.modules())
    for name, tensor in synced.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name


def test_more_processes_than_gpus_is_refused_by_name(monkeypatch):
    """No GPU here: the machine's GPU count is the one thing faked."""
    from runtime.launch import gpus_short

    assert gpus_short("ssl", 4) is None  # this CPU machine: gloo ranks share it
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert gpus_short("ssl", 2) is None
    assert "params/ssl.yaml: train.processes 4 asks for one GPU per process, but this machine has 2" in gpus_short("ssl", 4)


@pytest.mark.slow
def test_two_process_ssl_stage_through_dvc_repro_matches_one_process(reproduced):
    def ssl_run(processes: int) -> dict:
        run([sys.executable, "-m", "flows", "profile", "smoke", "--set", f"ssl.train.processes={processes}"], reproduced)
        done = run(["dvc", "repro", "ssl"], reproduced)
        assert "stale" not in run(["dvc", "status", "ssl"], reproduced).stdout
        return done, json.loads((reproduced / "metrics" / "ssl.json").read_text())

    done, two = ssl_run(2)
    assert "2 processes under torchrun" in done.stderr + done.stdout
    done, one = ssl_run(1)  # the smoke run's own: back from DVC's run cache
    assert "Stage 'ssl' is cached - skipping run" in done.stdout, done.stdout
    # Exactly: the same global batch (split 2 x 32 over the ranks) gives the same number of steps
    # and the same schedule. Only approximately: the kNN top-1 of the encoder, since each rank draws
    # its own augmentations (the seed takes the rank) and gloo ranks on CPU normalise with their own
    # half of the batch (torch's SyncBatchNorm runs on GPUs only); digits' kNN top-1 lies near 0.9
    # on this profile and moves by a few points between such draws, so 0.1 is the tolerance.
    print(f"2 processes: {two}\n1 process: {one}")
    assert two["steps"] == one["steps"]
    assert two["knn_top1"] == pytest.approx(one["knn_top1"], abs=0.1)


@pytest.mark.slow
def test_killing_the_launcher_kills_torchrun_and_its_ranks(repo_copy):
    import psutil

    run([sys.executable, "-m", "flows", "profile", "smoke", "--set", "ssl.train.processes=2"], repo_copy)
    run(["dvc", "repro", "prepare"], repo_copy)
    launcher = subprocess.Popen(
        [sys.executable, "-m", "runtime.launch", "ssl"], cwd=repo_copy, env=run_env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while len(ranks := [p for p in psutil.Process(launcher.pid).children(recursive=True) if "flows.ssl" in p.cmdline()]) < 2:
            assert time.monotonic() < deadline and launcher.poll() is None, "torchrun did not start 2 ranks"
            time.sleep(0.5)
        torchrun = psutil.Process(launcher.pid).children()
    finally:
        launcher.kill()
    launcher.wait()
    _, alive = psutil.wait_procs([*torchrun, *ranks], timeout=60)
    assert not alive, f"still running after the launcher's kill: {[p.cmdline() for p in alive]}"
    assert not (repo_copy / "metrics" / "ssl.json").exists()  # nothing put in place
