"""probe: linear probe and kNN on the frozen embeddings, label efficiency, and two baselines
(raw pixels, a randomly initialised encoder of the trained one's own architecture)."""


from prefect import flow

from runtime.stage import StageRun
from runtime.stage_flow import stage_task
from runtime.stage_process import main
from tasks.artifacts import artifacts_dir, write_json
from tasks.data import SPLITS, load_manifest, load_split
from tasks.encoder import embed, load_embeddings, random_encoder
from tasks.params import ProbeParams
from tasks.plots import confusion, lines
from tasks.probe import Features, Labels, evaluate_features, export_probe


def feature_sets(params: ProbeParams, labels: Labels, device) -> dict[str, Features]:
    """SSL embeddings, and (with baselines) raw pixels and the features of a random network of the
    encoder's architecture."""
    encoder_dir = artifacts_dir("encoder")
    sets = {"ssl": Features(*(load_embeddings(encoder_dir, name, len(getattr(labels, name)), device) for name in SPLITS))}
    if params.baselines:
        splits = [load_split(name, device) for name in SPLITS]
        sets["raw_pixels"] = Features(*(s.floats().flatten(1) for s in splits))
        baseline = random_encoder(encoder_dir, params.seed, device)
        sets["random_encoder"] = Features(*(embed(baseline, s) for s in splits))
    return sets


@flow(name="probe", log_prints=True)
def probe(params: ProbeParams) -> None:
    with StageRun("probe", params) as run:
        class_names = load_manifest()["class_names"]
        labels = Labels(*(load_split(name, run.device).labels for name in SPLITS))
        evaluate = stage_task(evaluate_features, name="evaluate")
        report = {}
        for name, features in feature_sets(params, labels, run.device).items():
            result = evaluate(
                features, labels, len(class_names), list(params.weight_decays), list(params.label_fractions),
                params.knn_k, params.seed,
            )
            report[name] = result
            prefix = "" if name == "ssl" else f"{name}."
            run.metrics[f"{prefix}probe_top1"] = result["probe_top1"]
            run.metrics[f"{prefix}knn_top1"] = result["knn_top1"]
            for fraction, top1 in result["label_efficiency"].items():
                run.metrics[f"{prefix}probe_top1_at_{fraction:g}_labels"] = top1
        ssl = report["ssl"]
        export_probe(ssl["probe"], run.outputs.artifacts)  # the kd stage's teacher, with the encoder
        run.metrics["probe_weight_decay"] = ssl["probe_weight_decay"]
        plots = run.outputs.plots
        confusion(ssl["confusion"], class_names, f"linear probe on SSL features: top-1 {ssl['probe_top1']:.3f}", plots / "confusion.png")
        fractions = sorted(params.label_fractions)
        lines(
            {name: (fractions, [r["label_efficiency"][f] for f in fractions]) for name, r in report.items()},
            "share of training labels", "test top-1", "label efficiency", plots / "label_efficiency.png", logx=True,
        )
        write_json(run.outputs.artifacts / "report.json", {
            name: {
                "probe_top1": r["probe_top1"], "knn_top1": r["knn_top1"], "weight_decay": r["probe_weight_decay"],
                "per_class_top1": dict(zip(class_names, r["per_class"], strict=True)),
                "label_efficiency": {f"{f:g}": v for f, v in r["label_efficiency"].items()},
                "confusion": r["confusion"].tolist(),
            } for name, r in report.items()
        })
        summary = ", ".join(f"{name} {r['probe_top1']:.3f}" for name, r in report.items())
        print(f"probe top-1 — {summary}")


if __name__ == "__main__":
    main("probe", probe)
