"""fid: FID and KID against the test split in the frozen SSL encoder's feature space, for the
teacher at each step count, the students at theirs, and three references: real train images (the
floor), VAE reconstructions of the test split, decoded prior samples. Class-balanced samples;
sampling throughput for each; FID-vs-steps plot, table and sample grids. Then DDIM inversion:
test latents run back to noise and forward again, the error against the steps."""

import numpy as np
import torch
from prefect import flow
from tqdm import tqdm

from models.fid import FeatureExtractor
from runtime.stage import StageRun, main, stage_task
from tasks.artifacts import artifacts_dir
from tasks.curves import write_csv
from tasks.data import load_manifest, load_split
from tasks.diffusion import balanced_labels, invert_and_regenerate, load_denoiser, timed_images
from tasks.encoder import load_encoder
from tasks.fid import FidScorer, inception_weights
from tasks.images import captioned, grid, save_png, steps_caption, to_uint8
from tasks.params import FidParams
from tasks.plots import lines
from tasks.students import load_students
from tasks.vae import decode, encode_means, load_decoder


def class_rows(images: torch.Tensor, num_classes: int, per_class: int) -> np.ndarray:
    """A grid with a row per class from class-balanced samples (label = index % num_classes)."""
    per_class = min(per_class, len(images) // num_classes)
    order = [label + num_classes * column for label in range(num_classes) for column in range(per_class)]
    return grid(to_uint8(images[order]), ncols=per_class)


def score_rows(params: FidParams, run: StageRun) -> dict[str, dict[str, float]]:
    """{row: {"fid", "kid"[, "fid_inception"][, "images_per_s"]}}, saving a grid per sampled row."""
    device, plots = run.device, run.outputs.plots
    train, test = load_split("train", device), load_split("test", device)
    extractor = FeatureExtractor(load_encoder(artifacts_dir("encoder"), device), tuple(load_manifest()["image_shape"]))
    scorer = FidScorer(
        extractor, test.floats(), kid_subset_size=params.kid_subset_size, kid_subsets=params.kid_subsets,
        inception=inception_weights(params), batch_size=params.batch_size, seed=params.seed,
    )
    decoder = load_decoder(artifacts_dir("vae"), device)
    teacher = load_denoiser(artifacts_dir("diffusion"), device)
    students, guidance = load_students(artifacts_dir("distill"), device)
    num_classes = teacher.net.config.num_classes

    generator = torch.Generator().manual_seed(params.seed)
    train_subset = torch.randperm(len(train), generator=generator)[: params.samples].to(device)
    torch.manual_seed(params.seed)
    prior_latents = torch.randn(params.samples, *teacher.latent_shape, device=device)
    rows = {
        "floor_train_vs_test": scorer(train.floats(train_subset)),
        "vae_recon_vs_test": scorer(decode(decoder.vae, encode_means(decoder.vae, test.floats()))),
        "prior_vs_test": scorer(decode(decoder.vae, prior_latents)),
    }
    labels = balanced_labels(params.samples, num_classes, device)
    sampled = [("teacher", steps, teacher, guidance) for steps in sorted(params.teacher_steps)]
    sampled += [("student", s.steps, s.denoiser, s.guidance) for s in students]
    grids = {"teacher": {}, "student": {}}
    for kind, steps, denoiser, scale in tqdm(sampled, desc="fid", unit="row", disable=not run.is_main):
        images, images_per_s = timed_images(denoiser, decoder, labels, steps, scale, params.seed, params.batch_size)
        row = rows[f"{kind}.steps_{steps}"] = {**scorer(images), "images_per_s": images_per_s}
        caption = f"{steps_caption(steps)}, FID {row['fid']:.3g}"
        grids[kind][caption] = class_rows(images, num_classes, params.samples_per_class)
    for kind, panels in grids.items():
        save_png(captioned(panels), plots / f"samples_{kind}.png")
    return rows


def inversion_errors(params: FidParams, run: StageRun) -> list[dict[str, float]]:
    """For each of inversion_steps: the mean squared error, in the scaled latent space (unit
    variance per channel), of `samples` test latents inverted to noise and regenerated."""
    test, decoder = load_split("test", run.device), load_decoder(artifacts_dir("vae"), run.device)
    teacher = load_denoiser(artifacts_dir("diffusion"), run.device)
    latents = decoder.latent_scale.normalize(encode_means(decoder.vae, test.floats(slice(params.samples))))
    labels = test.labels[: params.samples]
    errors = []
    for steps in sorted(params.inversion_steps):
        _, regenerated = invert_and_regenerate(teacher, latents, labels, steps, params.batch_size)
        errors.append({"steps": steps, "mse": (regenerated - latents).square().mean().item()})
    return errors


def table(rows: dict[str, dict[str, float]]) -> str:
    """The rows as a Markdown table."""
    columns = list(dict.fromkeys(key for row in rows.values() for key in row))
    text = ["| row | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in rows.items():
        text.append(f"| {name} | " + " | ".join(f"{row[c]:.4g}" if c in row else "" for c in columns) + " |")
    return "\n".join(text) + "\n"


def by_steps(rows: dict[str, dict[str, float]], kind: str) -> list[dict[str, float]]:
    """The `kind.steps_N` rows, fewest steps first, each with its `steps`."""
    found = ({"steps": int(name.rpartition("_")[2]), **row} for name, row in rows.items() if name.startswith(f"{kind}."))
    return sorted(found, key=lambda row: row["steps"])


@flow(name="fid", log_prints=True)
def fid(params: FidParams) -> None:
    with StageRun("fid", params) as run:
        rows = stage_task(score_rows, name="score")(params, run)
        for name, row in rows.items():
            for metric, value in row.items():
                run.metrics[f"{metric}.{name}"] = round(value, 1 if metric == "images_per_s" else 5)
        (run.outputs.artifacts / "fid_table.md").write_text(table(rows))
        curves = {kind: by_steps(rows, kind) for kind in ("teacher", "student")}
        floor = rows["floor_train_vs_test"]["fid"]
        curves["floor"] = [{"steps": steps, "fid": floor} for steps in (1, max(params.teacher_steps))]
        for kind, points in curves.items():  # what dvc.yaml's FID plots draw
            write_csv(run.outputs.plots / f"{kind}.csv", points)
        series = {kind: ([p["steps"] for p in points], [p["fid"] for p in points]) for kind, points in curves.items()}
        series["real train vs test (floor)"] = series.pop("floor")
        lines(series, "sampling steps", "FID (SSL encoder features)", "FID vs sampling steps (lower is better)",
              run.outputs.plots / "fid_vs_steps.png", logx=True)
        print("fid:\n" + table(rows))
        if params.inversion_steps:
            inversion = stage_task(inversion_errors, name="invert")(params, run)
            for point in inversion:
                run.metrics[f"inversion_mse.steps_{point['steps']}"] = float(f"{point['mse']:.4g}")
            steps, errors = [p["steps"] for p in inversion], [p["mse"] for p in inversion]
            lines({"test latents": (steps, errors)}, "sampling steps (each way)", "latent MSE after the round trip",
                  "DDIM inversion: test latents -> noise -> latents", run.outputs.plots / "inversion.png", logx=True, logy=True)
            print("fid/inversion: " + ", ".join(f"{p['steps']} steps MSE {p['mse']:.4g}" for p in inversion))


if __name__ == "__main__":
    main("fid", fid)
