"""fid: FID and KID against the test split in the frozen SSL encoder's feature space, for every
generator the run trained: the decoded prior (a conditional VAE's for the requested classes, one
decoder call, with the probe's verdict on whether they show them), the GAN (one network call),
the autoregressive prior over VQ-VAE codes when the ar stage trained one (a network call per code), the teacher
with each of its samplers across step counts, the students at theirs, beside real train images
(the floor) and VAE reconstructions of the test split. Class-balanced samples; sampling throughput and the
generators' training seconds for each; one FID-vs-NFE chart, table and sample grids. Then DDIM
inversion: test latents run back to noise and forward again, the error against the steps. And
whether guided samples show the class they were asked for (CFG, and classifier guidance when the
diffusion stage trained its classifier), judged by the probe, against the guidance scale. A
text-conditioned teacher and its students are asked for the caption of a random test image of each
requested class (the test split's captions, class by class). The guided samples are also judged on
each attribute, measured on the sample, against the word their caption asked for (a class-
conditioned teacher's against the caption of a random test image of their class: the control)."""

import numpy as np
import torch
from prefect import flow
from torch import nn
from tqdm import tqdm

from models.fid import FeatureExtractor
from runtime.stage import StageRun
from runtime.stage_flow import stage_task
from runtime.stage_process import main
from tasks.ar import has_prior, load_prior, timed_ar_images
from tasks.artifacts import artifacts_dir, metrics_path, read_json
from tasks.conditions import attribute_agreement, caption_requests, split_conditions
from tasks.curves import write_csv
from tasks.data import load_manifest, load_split
from tasks.diffusion import (
    SAMPLERS,
    Denoiser,
    balanced_labels,
    invert_and_regenerate,
    load_denoiser,
    timed_images,
)
from tasks.encoder import load_encoder
from tasks.fid import FidScorer, inception_weights
from tasks.gan import load_generator, timed_gan_images
from tasks.guidance import classifier_guided, load_classifier, request_accuracy
from tasks.images import captioned, grid, save_png, steps_caption, to_uint8
from tasks.params import FidParams
from tasks.plots import fid_chart, guidance_chart, lines
from tasks.probe import load_probe
from tasks.students import load_students
from tasks.vae import decode, encode_means, load_decoder, load_vae, timed_prior_images


def class_rows(images: torch.Tensor, num_classes: int, per_class: int) -> np.ndarray:
    """A grid with a row per class from class-balanced samples (label = index % num_classes)."""
    per_class = min(per_class, len(images) // num_classes)
    order = [label + num_classes * column for label in range(num_classes) for column in range(per_class)]
    return grid(to_uint8(images[order]), ncols=per_class)


def teacher_samplers(params: FidParams, teacher: Denoiser) -> list[tuple[str, Denoiser, list[int]]]:
    """(row prefix, denoiser, steps) for the teacher's own sampler (rows teacher.steps_N, at every
    teacher_steps) and each other sampler of `samplers` that applies to its formulation (rows
    teacher_<sampler>.steps_N, at the teacher_steps costing no more network calls than the own
    sampler's most, so every line spans the same NFE range)."""
    steps = sorted(params.teacher_steps)
    rows = [("teacher", teacher, steps)]
    most = teacher.evaluations(steps[-1])
    for sampler in dict.fromkeys(params.samplers):
        if sampler in SAMPLERS[teacher.formulation] and sampler != teacher.sampler:
            other = teacher.with_net(teacher.net, sampler)
            rows.append((f"teacher_{sampler}", other, [n for n in steps if other.evaluations(n) <= most]))
    return rows


def make_scorer(params: FidParams, device: torch.device) -> FidScorer:
    """The scorer against the test split, its features computed once for every row."""
    extractor = FeatureExtractor(load_encoder(artifacts_dir("encoder"), device), tuple(load_manifest()["image_shape"]))
    return FidScorer(
        extractor, load_split("test", device).floats(), kid_subset_size=params.kid_subset_size,
        kid_subsets=params.kid_subsets, inception=inception_weights(params), batch_size=params.batch_size, seed=params.seed,
    )


def load_judge(device: torch.device) -> nn.Module:
    """The project's classifier of real images, which judges whether samples show the class asked
    for: the frozen SSL encoder and its linear probe."""
    return nn.Sequential(load_encoder(artifacts_dir("encoder"), device), load_probe(artifacts_dir("probe"), device)).eval()


def prior_row(params: FidParams, scorer: FidScorer, vae, latents: torch.Tensor, labels: torch.Tensor) -> tuple[str, dict[str, float]]:
    """The decoded N(0, I) `latents`: an unconditional VAE's as row prior_vs_test (NFE 0, a level on
    the chart); a conditional VAE's, decoded as `labels`, as the generator cvae_prior (NFE 1, its
    images/s and the probe's request accuracy)."""
    if not vae.config.num_classes:
        return "prior_vs_test", {**scorer(decode(vae, latents)), "nfe": 0}
    images, images_per_s = timed_prior_images(vae, latents, labels, params.batch_size)
    accuracy = request_accuracy(load_judge(latents.device), images, labels, params.batch_size)
    return "cvae_prior", {**scorer(images), "images_per_s": images_per_s, "nfe": 1, "request_accuracy": accuracy}


def score_rows(params: FidParams, run: StageRun, scorer: FidScorer) -> dict[str, dict[str, float]]:
    """{row: {"fid", "kid"[, "fid_inception"][, "images_per_s", "nfe"][, "request_accuracy"]}}, saving a
    grid per sampled row."""
    device, plots = run.device, run.outputs.plots
    train, test = load_split("train", device), load_split("test", device)
    decoder = load_decoder(artifacts_dir("vae"), device)
    teacher = load_denoiser(artifacts_dir("diffusion"), device)
    students, guidance = load_students(artifacts_dir("distill"), device)
    num_classes = teacher.num_classes

    generator = torch.Generator().manual_seed(params.seed)
    train_subset = torch.randperm(len(train), generator=generator)[: params.samples].to(device)
    torch.manual_seed(params.seed)
    prior_latents = torch.randn(params.samples, *teacher.latent_shape, device=device)
    labels = balanced_labels(params.samples, num_classes, device)
    gan_images, gan_images_per_s = timed_gan_images(load_generator(artifacts_dir("gan"), device), decoder, labels, params.seed, params.batch_size)
    prior_name, prior = prior_row(params, scorer, decoder.vae, prior_latents, labels)
    rows = {
        "floor_train_vs_test": scorer(train.floats(train_subset)),
        "vae_recon_vs_test": scorer(decode(decoder.vae, encode_means(decoder.vae, test.floats(), test.labels), test.labels)),
        prior_name: prior,
        "gan": {**scorer(gan_images), "images_per_s": gan_images_per_s, "nfe": 1},
    }
    if has_prior(artifacts_dir("ar")):  # a VQ-VAE's: the ar stage skips a continuous latent
        prior, sampling = load_prior(artifacts_dir("ar"), device)
        ar_images, ar_images_per_s = timed_ar_images(
            prior, decoder.vae, labels, params.seed, sampling["temperature"], sampling["top_k"], params.batch_size
        )
        rows["ar"] = {**scorer(ar_images), "images_per_s": ar_images_per_s, "nfe": prior.config.length}
    grids = {"teacher": {}, "student": {}}
    sampled = [(prefix, n, denoiser, guidance) for prefix, denoiser, steps in teacher_samplers(params, teacher) for n in steps]
    sampled += [("student", s.steps, s.denoiser, s.guidance) for s in students]
    requests = teacher.requests(labels, "test", params.seed)
    for prefix, steps, denoiser, scale in tqdm(sampled, desc="fid", unit="row", disable=not run.is_main):
        images, images_per_s = timed_images(denoiser, decoder, requests, steps, scale, params.seed, params.batch_size)
        row = rows[f"{prefix}.steps_{steps}"] = {**scorer(images), "images_per_s": images_per_s, "nfe": denoiser.evaluations(steps)}
        kind, _, sampler = prefix.partition("_")
        caption = f"{steps_caption(steps)}{f' {sampler}' if sampler else ''}, FID {row['fid']:.3g}"
        grids[kind][caption] = class_rows(images, num_classes, params.samples_per_class)
    for kind, panels in grids.items():
        save_png(captioned(panels), plots / f"samples_{kind}.png")
    return rows


def request_points(params: FidParams, run: StageRun, scorer: FidScorer) -> tuple[list[dict], float]:
    """Does it follow the request? The teacher's own sampler at `guidance.steps`, at each CFG scale
    and, when the diffusion stage trained a classifier, each classifier guidance scale (with CFG
    off): a point each with the probe's accuracy of the requested class over `guidance.samples`
    class-balanced samples (the same labels and noise at every scale), FID, images/s and what a
    sample cost: denoiser and classifier evaluations (a CFG step 2 denoiser calls, batched; a
    classifier-guided step 1 denoiser call and 1 classifier forward and backward). Also the probe's
    accuracy on the real test images (from the probe stage's report), the ceiling. Saves a grid per point."""
    device, guidance = run.device, params.guidance
    decoder = load_decoder(artifacts_dir("vae"), device)
    teacher = load_denoiser(artifacts_dir("diffusion"), device)
    classifier = load_classifier(artifacts_dir("diffusion"), device)
    judge = load_judge(device)
    # the ceiling: the probe's top-1 on the real test split, as the probe stage measured it (the
    # same encoder and probe on the same images; a pass over the test split saved)
    real_accuracy = read_json(artifacts_dir("probe") / "report.json", keys=("ssl",))["ssl"]["probe_top1"]
    num_classes = teacher.num_classes
    labels = balanced_labels(guidance.samples, num_classes, device)
    requests = teacher.requests(labels, "test", params.seed)
    # the words each sample is judged on: its caption's, or for a class-conditioned teacher a random
    # test caption's of its class, the control: what asking for the class alone gets right
    captions = requests if teacher.captions else caption_requests(labels, "test", params.seed)
    settings = [("cfg", scale, teacher, scale) for scale in guidance.cfg_scales]
    if classifier is not None:
        settings += [("classifier", scale, classifier_guided(teacher, classifier, scale), 1.0) for scale in guidance.classifier_scales]
    calls, points, grids = teacher.evaluations(guidance.steps), [], {}
    for kind, scale, denoiser, cfg_scale in tqdm(settings, desc="fid/guidance", unit="scale", disable=not run.is_main):
        images, images_per_s = timed_images(denoiser, decoder, requests, guidance.steps, cfg_scale, params.seed, params.batch_size)
        point = {
            "guidance": kind, "scale": scale, "strength": scale - 1 if kind == "cfg" else scale, "steps": guidance.steps,
            "denoiser_evaluations": calls * (2 if kind == "cfg" and scale != 1 else 1),
            "classifier_evaluations": calls if kind == "classifier" and scale != 0 else 0,
            "request_accuracy": request_accuracy(judge, images, labels, params.batch_size),
            "fid": scorer(images, only=("fid",))["fid"], "images_per_s": images_per_s,
        }
        point |= {f"attribute_{name}": share for name, share in attribute_agreement(images, captions).items()}
        points.append(point)
        grids[f"{kind} {scale:g}: {point['request_accuracy']:.1%} as asked, FID {point['fid']:.3g}"] = class_rows(
            images, num_classes, params.samples_per_class)
    save_png(captioned(grids), run.outputs.plots / "samples_guidance.png")
    return points, real_accuracy


def train_seconds() -> dict[str, float]:
    """Each trained generator's training seconds, from its stage's metrics: the teacher's
    (diffusion), the students' (distill, on top of the teacher's), the GAN's, the AR prior's (when
    the ar stage trained one) and a conditional VAE's (vae)."""
    generators = [("teacher", "diffusion"), ("student", "distill"), ("gan", "gan")]
    generators += [("ar", "ar")] if has_prior(artifacts_dir("ar")) else []
    generators += [("cvae", "vae")] if load_vae(artifacts_dir("vae")).config.num_classes else []
    return {kind: read_json(metrics_path(stage), keys=("train_seconds",))["train_seconds"] for kind, stage in generators}


def inversion_errors(params: FidParams, run: StageRun) -> list[dict[str, float]]:
    """For each of inversion_steps: the mean squared error, in the scaled latent space (unit
    variance per channel), of `samples` test latents inverted to noise and regenerated."""
    test, decoder = load_split("test", run.device), load_decoder(artifacts_dir("vae"), run.device)
    teacher = load_denoiser(artifacts_dir("diffusion"), run.device)
    labels = test.labels[: params.samples]
    latents = decoder.latent_scale.normalize(encode_means(decoder.vae, test.floats(slice(params.samples)), labels))
    conditions = split_conditions("test", run.device)[: params.samples] if teacher.captions else labels
    errors = []
    for steps in sorted(params.inversion_steps):
        _, regenerated = invert_and_regenerate(teacher, latents, conditions, steps, params.batch_size)
        errors.append({"steps": steps, "mse": (regenerated - latents).square().mean().item()})
    return errors


def table(rows: dict[str, dict[str, float]]) -> str:
    """The rows as a Markdown table."""
    columns = list(dict.fromkeys(key for row in rows.values() for key in row))
    text = ["| row | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in rows.items():
        text.append(f"| {name} | " + " | ".join(f"{row[c]:.4g}" if c in row else "" for c in columns) + " |")
    return "\n".join(text) + "\n"


def series_name(row: str, own_sampler: str) -> str:
    """The chart line a row is a point of: 'teacher (euler)', 'student', 'gan', ..."""
    prefix = row.partition(".")[0]
    if prefix == "teacher":
        return f"teacher ({own_sampler})"
    return f"teacher ({prefix.removeprefix('teacher_')})" if prefix.startswith("teacher_") else prefix


def nfe_points(rows: dict[str, dict[str, float]], own_sampler: str) -> list[dict[str, float | str]]:
    """What the FID-vs-NFE chart draws: a point per sampled row (the GAN's and a conditional VAE's at
    NFE 1, the AR prior's at its number of codes), and the floor and an unconditional VAE's decoded
    prior (NFE 0) as flat lines across the sampled NFE range."""
    sampled = [(name, row) for name, row in rows.items() if row.get("nfe", 0) > 0]
    points = [{"generator": series_name(name, own_sampler), "nfe": int(row["nfe"]), "fid": row["fid"],
               "images_per_s": row["images_per_s"]} for name, row in sampled]
    span = (min(p["nfe"] for p in points), max(p["nfe"] for p in points))
    for generator, name in (("decoded prior", "prior_vs_test"), ("floor (real train vs test)", "floor_train_vs_test")):
        if name in rows:
            points += [{"generator": generator, "nfe": nfe, "fid": rows[name]["fid"]} for nfe in span]
    return sorted(points, key=lambda p: (p["generator"], p["nfe"]))


def report_requests(points: list[dict], real_accuracy: float, params: FidParams, run: StageRun) -> None:
    """request_accuracy.<guidance>.scale_<s>, request_fid.<...> and request_images_per_s.<...> metrics,
    plots/fid/guidance.csv and guidance.png (accuracy and FID against guidance strength)."""
    run.metrics["request_accuracy.real_test"] = round(real_accuracy, 5)
    for point in points:
        name = f"{point['guidance']}.scale_{point['scale']:g}"
        run.metrics[f"request_accuracy.{name}"] = round(point["request_accuracy"], 5)
        run.metrics[f"request_fid.{name}"] = round(point["fid"], 5)
        run.metrics[f"request_images_per_s.{name}"] = round(point["images_per_s"], 1)
        for key in [key for key in point if key.startswith("attribute_")]:
            run.metrics[f"request_{key.replace('_', '.', 1)}.{name}"] = round(point[key], 5)
    write_csv(run.outputs.plots / "guidance.csv",  # dvc.yaml's by_series template: a line per `series`
              [{"series": p["guidance"], **{k: v for k, v in p.items() if k != "guidance"}} for p in points])
    chance = 1 / len(load_manifest()["class_names"])
    title = f"the teacher at {params.guidance.steps} steps, {params.guidance.samples} samples a point, judged by the SSL probe"
    guidance_chart(points, real_accuracy, chance, title, run.outputs.plots / "guidance.png")
    print("fid/guidance: " + ", ".join(
        f"{p['guidance']} {p['scale']:g}: {p['request_accuracy']:.3f} as asked, FID {p['fid']:.3g}" for p in points
    ) + f" (real test images: {real_accuracy:.3f})")


@flow(name="fid", log_prints=True)
def fid(params: FidParams) -> None:
    with StageRun("fid", params) as run:
        scorer = make_scorer(params, run.device)
        rows = stage_task(score_rows, name="score")(params, run, scorer)
        for name, row in rows.items():
            for metric, value in row.items():
                if metric != "nfe":
                    run.metrics[f"{metric}.{name}"] = round(value, 1 if metric == "images_per_s" else 5)
        seconds = train_seconds()
        run.metrics.update({f"train_seconds.{kind}": value for kind, value in seconds.items()})
        for name, row in rows.items():  # the table shows what each generator cost to train
            if (kind := name.partition(".")[0].partition("_")[0]) in seconds:
                row["train_seconds"] = seconds[kind]
        (run.outputs.artifacts / "fid_table.md").write_text(table(rows))
        own_sampler = load_denoiser(artifacts_dir("diffusion")).sampler
        points = nfe_points(rows, own_sampler)
        write_csv(run.outputs.plots / "fid_vs_nfe.csv", points)  # what dvc.yaml's fid plots draw
        write_csv(run.outputs.plots / "speed.csv", [point for point in points if "images_per_s" in point])
        fid_chart(points, "floor (real train vs test)", "decoded prior", run.outputs.plots / "fid_vs_nfe.png")
        print("fid:\n" + table(rows))
        report_requests(*stage_task(request_points, name="guidance")(params, run, scorer), params, run)
        inversion = stage_task(inversion_errors, name="invert")(params, run) if params.inversion_steps else []
        for point in inversion:
            run.metrics[f"inversion_mse.steps_{point['steps']}"] = float(f"{point['mse']:.4g}")
        steps, errors = [p["steps"] for p in inversion], [p["mse"] for p in inversion]
        title = "DDIM inversion: test latents -> noise -> latents" + ("" if inversion else " (inversion_steps: [] skips it)")
        lines({"test latents": (steps, errors)}, "sampling steps (each way)", "latent MSE after the round trip", title,
              run.outputs.plots / "inversion.png", logx=bool(inversion), logy=bool(inversion))
        if inversion:
            print("fid/inversion: " + ", ".join(f"{p['steps']} steps MSE {p['mse']:.4g}" for p in inversion))


if __name__ == "__main__":
    main("fid", fid)
