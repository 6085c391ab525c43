"""The bench, through its door (`python -m flows bench`), at a tiny size: every training stage and
sampler measured, the JSON written, and no Prefect, MLflow or DVC imported on the way."""

import json
import math
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

RUN_AND_LIST_IMPORTS = (
    "import sys; from flows.__main__ import main; main(sys.argv[1:]); "
    "print('orchestration imported:', sorted({m.split('.')[0] for m in sys.modules} & {'prefect', 'mlflow', 'dvc'}))"
)


@pytest.mark.slow  # `python -m flows bench`: every training stage, in a process of its own
def test_bench_measures_every_training_stage_and_sampler_with_torch_alone(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-c", RUN_AND_LIST_IMPORTS, "bench", "--profile", "smoke", "--steps", "1", "--warmup", "1",
         "--batch-size", "4", "--variants", "defaults,channels_last", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "orchestration imported: []" in done.stdout
    result = json.loads(out.read_text())
    assert result["peak_tflops"] > 0 and result["peak_dtype"] == "float32"
    rows = result["training"]
    assert [(row["stage"], row["variant"]) for row in rows] == [
        (stage, variant) for stage in ("ssl", "vae", "diffusion", "distill", "gan") for variant in ("defaults", "channels_last")
    ]
    assert {row["setup"] for row in rows} == {"fp32 NHWC", "fp32 NCHW"}
    for row in rows:
        for key in ("trainer_images_per_s", "bare_images_per_s", "overhead", "gflops_per_image", "mfu"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["stage"], key)
        assert row["peak_memory_mib"] > 0
        assert math.isclose(row["mfu"], row["achieved_tflops"] / result["peak_tflops"], rel_tol=1e-6)
    # the flow-free smoke profile trains a DDPM: its students sample with guidance, like the teacher
    assert {(row["network"], row["guidance"]) for row in result["sampling"]} == {("teacher", 2.0), ("student", 2.0)}
    assert all(row["images_per_s_per_evaluation"] > 0 for row in result["sampling"])
    assert "MFU" in done.stdout and "sampling (images/s per network evaluation)" in done.stdout
