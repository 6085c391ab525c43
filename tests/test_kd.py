"""Knowledge distillation (Hinton et al. 2015): the loss's defining properties, the student's export,
and the kd stage through `dvc repro` with its metrics and MLflow run."""

import json
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.kd import KnowledgeDistillation, StudentCNN, distillation_loss
from tasks.kd import export_student, load_student, top1_gain
from tests.conftest import run


def logits(n=16, classes=10, scale=3.0, seed=0):
    return scale * torch.randn(n, classes, generator=torch.Generator().manual_seed(seed))


def test_alpha_zero_is_the_plain_cross_entropy():
    student, teacher, labels = logits(seed=0), logits(seed=1), torch.arange(16) % 10
    loss, cross_entropy, soft = distillation_loss(student, teacher, labels, temperature=4.0, alpha=0.0)
    assert torch.equal(loss, F.cross_entropy(student, labels)) and torch.equal(cross_entropy, loss)
    assert soft > 0  # computed (and logged) all the same
    network = StudentCNN(1, 8, 10, [4])
    images = torch.rand(16, 1, 8, 8)
    no_teacher = KnowledgeDistillation(network, temperature=4.0, alpha=0.9)((images, labels))  # the cnn teacher's training
    assert set(no_teacher) == {"loss", "cross_entropy"} and torch.equal(no_teacher["loss"], F.cross_entropy(network(images), labels))


def test_the_soft_term_is_the_mean_kl_from_the_softened_teacher_pair_by_pair():
    student, teacher, labels = logits(seed=2), logits(seed=3), torch.zeros(16, dtype=torch.long)
    temperature = 2.5
    _, _, soft = distillation_loss(student, teacher, labels, temperature, alpha=0.5)
    total = 0.0
    for s, t in zip(student.tolist(), teacher.tolist(), strict=True):
        p_s = np.exp(np.array(s) / temperature) / np.exp(np.array(s) / temperature).sum()
        p_t = np.exp(np.array(t) / temperature) / np.exp(np.array(t) / temperature).sum()
        total += sum(pt * np.log(pt / ps) for pt, ps in zip(p_t, p_s, strict=True))
    assert soft.item() == pytest.approx(total / len(student), rel=1e-5)
    loss, cross_entropy, _ = distillation_loss(student, teacher, labels, temperature, alpha=0.5)
    assert loss.item() == pytest.approx(0.5 * cross_entropy.item() + 0.5 * temperature**2 * soft.item(), rel=1e-6)


def soft_gradient(student, teacher, temperature):
    student = student.clone().requires_grad_(True)
    distillation_loss(student, teacher, torch.zeros(len(student), dtype=torch.long), temperature, alpha=1.0)[0].backward()
    return student.grad


def test_the_t_squared_factor_keeps_the_soft_gradients_independent_of_the_temperature():
    """Hinton et al. 2015, section 2.1: at high T the soft term's gradient is (z_s - z_t) / (N T^2)
    for zero-mean logits, so multiplying the term by T^2 leaves it the same at every temperature."""
    student, teacher = logits(seed=4, scale=1.0), logits(seed=5, scale=1.0)
    student, teacher = student - student.mean(1, keepdim=True), teacher - teacher.mean(1, keepdim=True)
    limit = (student - teacher) / (len(student) * 10)  # the high-T limit, with T^2; 10 classes
    norms = {}
    for temperature in (2.0, 4.0, 10.0, 40.0):
        gradient = soft_gradient(student, teacher, temperature)
        assert (gradient - limit).norm() < limit.norm() / temperature  # it approaches the limit as 1/T
        norms[temperature] = gradient.norm().item()
    assert max(norms.values()) / min(norms.values()) < 1.1, norms  # without T^2: 400-fold from T 2 to 40


def test_the_student_trains_toward_the_teacher_and_exports_and_loads_back(tmp_path):
    torch.manual_seed(0)
    images = torch.rand(64, 1, 8, 8) * 2 - 1
    teacher = logits(n=64, classes=3, scale=4.0, seed=6)
    labels = teacher.argmax(1)
    student = StudentCNN(1, 8, 3, [4, 8])
    distillation = KnowledgeDistillation(student, temperature=4.0, alpha=1.0)
    optimizer = torch.optim.Adam(student.parameters(), 1e-2)
    first = distillation((images, labels, teacher))
    assert set(first) == {"loss", "cross_entropy", "soft_kl"}
    for _ in range(200):
        loss = distillation((images, labels, teacher))["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss < first["loss"] / 3
    assert (student(images).argmax(1) == labels).float().mean() > 0.8  # soft targets alone teach the classes
    export_student(student, tmp_path)
    loaded = load_student(tmp_path)
    assert not loaded.training and loaded.config == {"in_channels": 1, "image_size": 8, "num_classes": 3, "widths": (4, 8)}
    torch.testing.assert_close(loaded(images), student.eval()(images))


def test_accuracies_and_their_gain_are_as_precise_as_the_test_split_without_float_noise():
    from models.knn import share

    assert share(13, 15) == 0.867 and share(9747, 10_000) == 0.9747
    assert top1_gain(0.9747, 0.9811, 10_000) == -0.0064  # not -0.006399999999999961
    assert top1_gain(share(9, 12), share(10, 12), 12) == -0.083


def test_a_student_too_deep_for_the_image_is_refused():
    with pytest.raises(ValueError, match="use fewer widths"):
        StudentCNN(1, 8, 10, [4, 4, 4, 4])


KD_METRICS = {
    "teacher.top1", "teacher.images_per_s", "teacher.parameters", "student.parameters",
    "student.with_kd.top1", "student.with_kd.images_per_s", "student.without_kd.top1", "student.without_kd.images_per_s",
    "kd_gain", "steps", "train_seconds", "wall_seconds",
}


@pytest.mark.slow
def test_dvc_repro_kd_reports_teacher_and_students_and_tracks_them(reproduced):
    """`dvc repro --force --single-item kd` in the smoke run: metrics/kd.json and the stage's MLflow
    run hold the named metrics; the distilled student loads back through `models:/`; a probe rerun
    that refits the same probe (another knn_k) leaves kd up to date."""
    from mlflow import MlflowClient

    repo = reproduced
    done = run(["dvc", "repro", "--force", "--single-item", "kd"], repo)
    assert "Running stage 'kd'" in done.stdout
    metrics = json.loads((repo / "metrics" / "kd.json").read_text())
    assert set(metrics) == KD_METRICS, metrics
    assert 0.5 < metrics["teacher.top1"] <= 1 and metrics["student.with_kd.top1"] > 0.3 and metrics["student.without_kd.top1"] > 0.3
    assert metrics["teacher.top1"] > metrics["student.without_kd.top1"]  # the cnn teacher knows more than the student learns alone
    assert metrics["student.parameters"] < metrics["teacher.parameters"]
    # from the counts of correct images, so within the top-1s' rounding of their difference
    assert metrics["kd_gain"] == pytest.approx(metrics["student.with_kd.top1"] - metrics["student.without_kd.top1"], abs=1e-4)
    curves = (repo / "plots" / "kd" / "students.csv").read_text().splitlines()
    assert curves[0].startswith("series,step,loss,cross_entropy,soft_kl")
    for name in ("with_kd", "without_kd", "teacher"):  # a curve per network, each from its first logged step
        assert [row for row in curves if row.startswith(f"{name},")][0].startswith(f"{name},5,")

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("latentlab").experiment_id
    [stage_run] = client.search_runs([experiment], "tags.stage = 'kd'")
    assert stage_run.info.status == "FINISHED"
    for key in KD_METRICS:
        assert stage_run.data.metrics[key] == pytest.approx(metrics[key]), key
    assert stage_run.data.params["kd.alpha"] == "0.9" and stage_run.data.params["kd.temperature"] == "4.0"
    [model] = client.search_logged_models([experiment], f"source_run_id = '{stage_run.info.run_id}'")
    assert model.name == "kd_student"
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    images = np.load(repo / "artifacts/prepare/test_images.npy")[:8].astype(np.float32) / 127.5 - 1
    predicted = mlflow.pyfunc.load_model(f"models:/{model.model_id}").predict(images)
    expected = load_student(repo / "artifacts" / "kd")(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(predicted, expected, atol=1e-5)

    run([sys.executable, "-m", "flows", "profile", "smoke", "--set", "probe.knn_k=5"], repo)
    rerun = run(["dvc", "repro", "kd"], repo).stdout
    assert "Running stage 'probe'" in rerun and "Running stage 'kd'" not in rerun, rerun
    assert "up to date" in run(["dvc", "status", "kd"], repo).stdout  # kd and what it needs


def test_metrics_lose_their_float_noise_and_keep_what_was_measured():
    from tasks.artifacts import without_float_noise

    noisy = {"probe_top1": 0.8666666746139526, "kd_gain": -0.07499999999999996, "psnr": 30.107458114624023,
             "parameters": 690_970, "train_seconds": 148.79, "images_per_s": 103_000.5}
    assert without_float_noise(noisy) == {"probe_top1": 0.8666667, "kd_gain": -0.075, "psnr": 30.107458,
                                          "parameters": 690_970, "train_seconds": 148.79, "images_per_s": 103_000.5}
