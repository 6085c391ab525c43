"""Curves as CSV tables in plots/<stage>/: what the stages' `plots:` in dvc.yaml draw with
`dvc plots show` (x/y columns, one row per point)."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path


def write_csv(path: Path, rows: list[dict[str, float]]) -> None:
    """Rows as a CSV table; the columns are every key in the rows, in first-seen order."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        writer.writerows({key: _cell(value) for key, value in row.items()} for row in rows)


def _cell(value: float | str) -> str:
    """Numbers to 6 significant digits (integers whole); text (a row's name) as it is."""
    return value if isinstance(value, str) else str(value) if isinstance(value, int) else f"{value:.6g}"


class StepCurves:
    """The step metrics a stage logs (the training loop's `train/<name>` and `eval/<name>`), kept
    to be written as `train.csv` and `eval.csv`: a `step` column and a column per name.

    A stage that runs several training loops one after another (distill's rounds) counts steps on
    from the previous loop's last, so its curves read left to right.
    """

    def __init__(self):
        self.tables: dict[str, list[dict[str, float]]] = defaultdict(list)
        self._offset = 0
        self._last_train_step = 0

    def add(self, metrics: dict[str, float], step: int) -> None:
        rows: dict[str, dict[str, float]] = defaultdict(dict)
        for name, value in metrics.items():
            table, _, column = name.rpartition("/")
            if table:
                rows[table][column] = float(value)
        if "train" in rows:
            if step <= self._last_train_step:  # a new training loop started at step 0
                self._offset += self._last_train_step
            self._last_train_step = step
        for table, row in rows.items():
            self.tables[table].append({"step": step + self._offset, **row})

    def combine(self, name: str, tables: list[str]) -> None:
        """Put `tables` into one table `name`, their rows one after another with a `series` column
        naming the table each came from: one chart draws them as a line each (`by_series`)."""
        self.tables[name] = [{"series": table, **row} for table in tables for row in self.tables.pop(table, [])]

    def write(self, folder: Path) -> None:
        for table, rows in self.tables.items():
            write_csv(Path(folder) / f"{table}.csv", rows)
