"""Sweeps on DVC's own experiment queue: a grid of overrides queued as `dvc exp run --queue -S …`
(run one after another by `dvc queue start`), and the ranking of the finished experiments by their
probe, each against its own random network of the same architecture, and the raw pixels."""

from __future__ import annotations

import itertools
import json
import re
import subprocess
from datetime import datetime
from pathlib import Path

import pandas as pd

from runtime.profiles import set_overrides
from tasks.params import PATCH_TOKEN_OBJECTIVES, STAGE_PARAMS, ParamsError, flatten, load_params

TARGET = "probe"  # what a sweep point reruns: ssl, encoder, probe (the stages the ranking reads)
OBJECTIVES = "ssl.objective"
PROBE = "metrics/probe.json"
SSL = "metrics/ssl.json"
RANKED = {  # column: (metrics file, key)
    "probe_top1": (PROBE, "probe_top1"),
    "random_same_arch": (PROBE, "random_encoder.probe_top1"),  # the row's own baseline: its backbone, untrained
    "knn_top1": (PROBE, "knn_top1"),
    "probe_1%_labels": (PROBE, "probe_top1_at_0.01_labels"),
    "probe_10%_labels": (PROBE, "probe_top1_at_0.1_labels"),
    "ssl_seconds": (SSL, "wall_seconds"),
    "ssl_images_per_s": (SSL, "images_per_s"),
}
RAW, RANDOM = "raw_pixels", "random_encoder"  # the baselines the probe stage also scores, on the same split
BACKBONE = "params/ssl.yaml:backbone"
# what a point of a patch-token objective (MAE, I-JEPA) gets unless it sets that key itself: the ViT;
# its mean patch token, how I-JEPA is probed (Assran et al. 2023) and what MAE finds as good as the cls
# token (He et al. 2022); and a ViT's AdamW learning rate (MAE 1.5e-4 x batch/256, I-JEPA's peak
# 1e-3, DeiT 5e-4 x batch/512), not the ResNets' 4e-3. Measured on the default profile, 2 epochs, a
# probe on 10k training images: MAE 0.58 with the cls token at 4e-3, 0.66 mean-pooled at 4e-3, 0.82
# mean-pooled at 1e-3, against 0.70 for the random ViT; I-JEPA 0.60 at 4e-3, 0.76 at 1e-3.
PATCH_TOKEN_RECIPE = {"backbone": "vit", "vit.pool": "mean", "train.lr": "0.001"}


def parse_axis(axis: str) -> tuple[str, list[str]]:
    """`stage.key=v1,v2` (or DVC's `params/stage.yaml:key=v1,v2`) -> (key, values)."""
    key, sep, values = axis.partition("=")
    if not sep or not values:
        raise ParamsError(f"sweep axis '{axis}': expected stage.key=value1,value2,...")
    return key, values.split(",")


def points(axes: list[str]) -> list[list[str]]:
    """The grid's points, each a list of `stage.key=value` overrides. An objective that only a ViT
    can train (MAE, I-JEPA) gets PATCH_TOKEN_RECIPE's keys that the point does not set itself, so
    `ssl.objective=all` sweeps the whole menu; `all` is every objective `ssl.objective` accepts."""
    grid = []
    for key, values in map(parse_axis, axes):
        if key in (OBJECTIVES, "params/ssl.yaml:objective") and values == ["all"]:
            values = list(STAGE_PARAMS["ssl"].model_fields["objective"].annotation.__args__)
        grid.append([f"{key}={value}" for value in values])
    chosen = []
    for point in map(list, itertools.product(*grid)):
        if any(o.endswith(tuple(f"objective={name}" for name in PATCH_TOKEN_OBJECTIVES)) for o in point):
            point += [f"ssl.{key}={value}" for key, value in PATCH_TOKEN_RECIPE.items()
                      if not any(re.match(rf"(ssl\.|params/ssl\.yaml:){re.escape(key)}=", o) for o in point)]
        chosen.append(point)
    return chosen


def refusal(point: list[str], current: dict[str, dict]) -> str | None:
    """Why the stages would refuse this point (the params validation, or the ssl stage's check of
    the objective against the prepared data), or None."""
    from tasks.ssl import GRAYSCALE_SOURCES, check_fits_the_data

    try:
        full = set_overrides(current, point)
        ssl = STAGE_PARAMS["ssl"].model_validate(full["ssl"])
        prepare = full["prepare"]
        source = prepare["source"]
        check_fits_the_data(ssl, source, prepare["channels"] or (1 if source in GRAYSCALE_SOURCES else 3))
    except ParamsError as err:
        return str(err)
    return None


def dvc_set(override: str) -> str:
    """`stage.key=value` in DVC's `-S` form, `params/stage.yaml:key=value`."""
    key, _, value = override.partition("=")
    if ":" in key:
        return override
    stage, _, dotted = key.partition(".")
    return f"params/{stage}.yaml:{dotted}={value}"


def experiment_name(point: list[str], stamp: str) -> str:
    """A git-ref-safe name from the point's values, unique to this sweep: `mae-vit-1123-1734`."""
    values = "-".join(override.partition("=")[2] for override in point)
    return f"{re.sub(r'[^A-Za-z0-9._-]+', '_', values)}-{stamp}"


def queue(axes: list[str], target: str = TARGET, start: bool = False) -> list[str]:
    """Queue one DVC experiment per grid point (refused points are skipped with the reason);
    the queued names. `start` runs `dvc queue start` (one worker: one experiment at a time)."""
    current = {stage: load_params(stage).model_dump(mode="json") for stage in STAGE_PARAMS}
    stamp = datetime.now().strftime("%m%d-%H%M")
    queued = []
    for point in points(axes):
        if reason := refusal(point, current):
            print(f"skipped {' '.join(point)}: {reason}")
            continue
        name = experiment_name(point, stamp)
        sets = [arg for override in point for arg in ("-S", dvc_set(override))]
        subprocess.run(["dvc", "exp", "run", "--queue", "-n", name, *sets, target], check=True, stdout=subprocess.DEVNULL)
        print(f"queued {name}: {' '.join(point)}")
        queued.append(name)
    if queued and start:  # its worker outlives this command: it must not hold this command's output open
        subprocess.run(["dvc", "queue", "start"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        print("started DVC's queue worker: one experiment at a time")
    if queued:
        print("follow with `dvc queue status` and `dvc queue logs <name>`; rank them with `python -m flows rank`")
    return queued


def experiments() -> list[dict]:
    """The finished experiments of the workspace's commit, from `dvc exp show --json`: name,
    params and metrics of each (failed or running ones are left out)."""
    shown = subprocess.run(["dvc", "exp", "show", "--json"], check=True, capture_output=True, text=True).stdout
    found = []
    for commit in json.loads(shown):
        for experiment in commit.get("experiments") or []:
            if (experiment.get("executor") or {}).get("state") not in (None, "success"):
                continue
            data = experiment["revs"][0]["data"]
            found.append({"name": experiment.get("name") or data["rev"][:7], **_flat(data)})
    return found


def _flat(data: dict) -> dict:
    """{"params": {"params/ssl.yaml:objective": …}, "metrics": {"metrics/probe.json": {…}}}."""
    params = {f"{path}:{key}": value for path, found in data["params"].items()
              for key, value in flatten(found.get("data") or {}).items()}
    metrics = {path: found.get("data") or {} for path, found in data["metrics"].items()}
    return {"params": params, "metrics": metrics}


def ranking(found: list[dict], by: str = "probe_top1") -> pd.DataFrame:
    """One row per experiment (the params that differ between them, then RANKED, whose
    `random_same_arch` is the probe of a random network of that experiment's own backbone), best
    `by` first; then the raw-pixel baseline and, per backbone, the random network of its best
    experiment (`(random vit)`: the line MAE and I-JEPA have to beat)."""
    if by not in RANKED:
        raise ParamsError(f"cannot rank by '{by}'; choose one of {', '.join(RANKED)}")
    rows = [e for e in found if e["metrics"].get(PROBE, {}).get("probe_top1") is not None]
    if not rows:
        return pd.DataFrame()
    params = pd.DataFrame([e["params"] for e in rows])
    differing = [c for c in params.columns if params[c].astype(str).nunique() > 1]
    table = pd.DataFrame({"experiment": [e["name"] for e in rows]})
    table = table.join(params[differing].rename(columns=lambda c: c.removeprefix("params/").replace(".yaml:", ".")))
    for column, (path, key) in RANKED.items():
        table[column] = [e["metrics"].get(path, {}).get(key) for e in rows]
    table = table.sort_values(by, ascending=False, kind="stable").reset_index(drop=True)
    table.insert(0, "rank", range(1, len(table) + 1))
    by_name = {e["name"]: e for e in rows}
    best_of_each_backbone = {}  # backbone -> its best experiment, whose random network is that backbone's line
    for name in table["experiment"]:
        best_of_each_backbone.setdefault(by_name[name]["params"].get(BACKBONE), by_name[name])
    baselines = pd.DataFrame([
        _baseline_row("(raw pixels)", rows[0]["metrics"][PROBE], RAW),
        *(_baseline_row(f"(random {backbone})", e["metrics"][PROBE], RANDOM) for backbone, e in best_of_each_backbone.items()),
    ])
    return pd.concat([table, baselines], ignore_index=True)


def _baseline_row(label: str, probe: dict, baseline: str) -> dict:
    return {"experiment": label, **{column: probe.get(f"{baseline}.{key}") for column, (path, key) in RANKED.items()
                                    if path == PROBE and not key.startswith(f"{RANDOM}.")}}


def ranking_plot(table: pd.DataFrame, path: Path, by: str = "probe_top1") -> None:
    """The experiments' `by` as bars, best on top, with the baselines as lines."""
    from tasks.plots import bars

    ranked = table[table["rank"].notna()]
    labels = [_label(row) for _, row in ranked.iterrows()]
    lines = {row["experiment"].strip("()"): row[by] for _, row in table[table["rank"].isna()].iterrows()}
    bars(dict(zip(labels, ranked[by], strict=True)), lines, xlabel=by, title="self-supervised objectives, ranked", path=path)


def _label(row: pd.Series) -> str:
    """The experiment's differing params, else its name."""
    values = [str(v) for k, v in row.items() if "." in str(k) and k not in RANKED and pd.notna(v)]
    return " ".join(values) or row["experiment"]


def show(table: pd.DataFrame, csv: Path | None, plot: Path | None, by: str) -> None:
    if table.empty:
        print("no finished experiments with probe metrics: queue some with `python -m flows sweep ssl.objective=all`")
        return
    with pd.option_context("display.width", 200, "display.max_columns", 50, "display.float_format", "{:.4g}".format):
        print(table.to_string(index=False, na_rep=""))
    if csv:
        table.to_csv(csv, index=False)
        print(f"wrote {csv}")
    if plot:
        ranking_plot(table, plot, by)
        print(f"wrote {plot}")
