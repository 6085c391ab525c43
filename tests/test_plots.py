"""What the stages write for `dvc plots show`: step curves as CSV, labelled sample figures."""

import csv

import numpy as np
import torch

from tasks.curves import StepCurves
from tasks.images import captioned
from tasks.params import TrainParams
from tasks.training import Trainer
from tests.tiny_training import Regression


def read_csv(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_the_curves_of_two_training_loops_count_steps_on_and_keep_evaluations_apart(tmp_path):
    curves = StepCurves()
    train = TrainParams(epochs=1, batch_size=8, log_every=2, warmup_fraction=0.0)
    for seed in (0, 1):  # two loops one after another, as distill's rounds run
        trainer = Trainer(Regression(), train, steps_per_epoch=6, seed=seed, log=curves.add)
        trainer.fit(lambda step: (torch.randn(8, 8), torch.randn(8, 4)), evaluate=lambda module: {"score": 0.5}, evaluate_every=4)
    curves.write(tmp_path)

    rows = read_csv(tmp_path / "train.csv")
    assert [int(row["step"]) for row in rows] == [2, 4, 6, 8, 10, 12]
    assert {"loss", "lr", "images_per_s"} <= set(rows[0]) and all(float(row["loss"]) >= 0 for row in rows)
    evaluations = read_csv(tmp_path / "eval.csv")
    assert [int(row["step"]) for row in evaluations] == [4, 6, 10, 12] and set(evaluations[0]) == {"step", "score"}


def has_block(image: np.ndarray, value: int, height: int, width: int) -> bool:
    """Whether `image` holds a height x width block of pixels all equal to `value`."""
    inside = np.pad((image == value).astype(int).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    sums = inside[height:, width:] - inside[:-height, width:] - inside[height:, :-width] + inside[:-height, :-width]
    return bool((sums == height * width).any())


def test_a_captioned_figure_keeps_each_grid_s_pixels_under_its_caption():
    grids = {f"{steps} steps": np.full((30, 20, 1), 10 * steps, np.uint8) for steps in (1, 2, 4)}
    figure = captioned(grids, ncols=2)
    assert figure.ndim == 3 and figure.shape[2] == 1
    assert all(has_block(figure[..., 0], 10 * steps, 30, 20) for steps in (1, 2, 4))  # whole, not overdrawn
    first_caption = figure[:20, :40, 0]
    assert (first_caption < 128).any()  # dark text above the first grid
    assert captioned({"one": np.zeros((30, 20, 3), np.uint8)}).shape[2] == 3


def test_the_fid_chart_s_log_axis_ends_just_below_its_lowest_point_whatever_the_rows_order(monkeypatch, tmp_path):
    """The floor is a band from 0, which a log axis cannot reach: drawn after a lone marker it once
    stretched the axis down to 1e-16 and squashed every line into its top tenth."""
    from tasks import plots

    limits = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: limits.append(fig.axes[0].get_ylim()))
    rows = [{"generator": "ar", "nfe": 16, "fid": 0.215}, {"generator": "prior", "nfe": 0, "fid": 5.3},
            {"generator": "floor", "nfe": 0, "fid": 0.0855}, {"generator": "teacher", "nfe": 1, "fid": 1.6},
            {"generator": "teacher", "nfe": 2, "fid": 0.68}]
    for order in (rows, rows[::-1]):
        plots.fid_chart(order, "floor", "prior", tmp_path / "fid.png")
    assert all(0.05 < bottom < 0.0855 and 5.3 < top < 20 for bottom, top in limits), limits
