"""Matplotlib figures for the stages' plots/ folders (headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def scatter_by_class(points: np.ndarray, labels: np.ndarray, class_names: list[str], title: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 5.5))
    cmap = plt.get_cmap("tab10" if len(class_names) <= 10 else "tab20")
    for index, name in enumerate(class_names):
        chosen = labels == index
        ax.scatter(points[chosen, 0], points[chosen, 1], s=6, color=cmap(index % cmap.N), label=name)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(markerscale=3, fontsize=7, loc="best", ncol=2)
    _save(fig, path)


def confusion(matrix: np.ndarray, class_names: list[str], title: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 5.5))
    shown = ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(class_names)), class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (row, col), count in np.ndenumerate(matrix):
        if count:
            color = "white" if count > matrix.max() / 2 else "black"
            ax.text(col, row, int(count), ha="center", va="center", fontsize=7, color=color)
    fig.colorbar(shown, ax=ax, fraction=0.046)
    ax.set_title(title)
    _save(fig, path)


def bars(values: dict[str, float], lines: dict[str, float], xlabel: str, title: str, path: Path) -> None:
    """Horizontal bars, the first on top, with labelled vertical lines (baselines) across them."""
    fig, ax = plt.subplots(figsize=(6, 0.9 + 0.32 * len(values)))
    ax.barh(range(len(values)), list(values.values()), color="tab:blue")
    ax.set_yticks(range(len(values)), list(values))
    ax.invert_yaxis()
    styles = iter(["--", ":", "-."])
    for name, x in lines.items():
        ax.axvline(x, color="black", linestyle=next(styles, "--"), label=f"{name} {x:.3f}")
    low = min([*values.values(), *lines.values()])
    ax.set_xlim(max(0.0, low - 0.05), 1.0)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    if lines:
        ax.legend(fontsize=8, loc="lower right")
    _save(fig, path)


def lines(series: dict[str, tuple[list[float], list[float]]], xlabel: str, ylabel: str, title: str, path: Path,
          logx: bool = False, logy: bool = False) -> None:
    """One line per name: {name: (xs, ys)}."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=name)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def fid_chart(points: list[dict], floor: str, prior: str, path: Path) -> None:
    """FID against network evaluations (log axis), a line per generator of `points` ({"generator",
    "nfe", "fid"}); a lone point (the GAN, the AR prior) as a star, the `prior` generator as a
    dashed level and the `floor` one as a band from 0 up to it: what no generator can beat."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_generator: dict[str, list[dict]] = {}
    for point in points:
        by_generator.setdefault(point["generator"], []).append(point)
    for name, group in by_generator.items():
        nfe, fid = [p["nfe"] for p in group], [p["fid"] for p in group]
        if name == floor:
            ax.axhspan(0, fid[0], color="0.6", alpha=0.3, label=f"{name}: {fid[0]:.3g}")
        elif name == prior:
            ax.axhline(fid[0], color="0.3", linestyle="--", label=f"{name} (NFE 0): {fid[0]:.3g}")
        else:
            lone = len(group) == 1  # a generator of one point (the GAN, the AR prior): a star over the lines
            ax.plot(nfe, fid, marker="*" if lone else "o", markersize=14 if lone else 5, linestyle="none" if lone else "-",
                    markeredgecolor="white" if lone else None, zorder=3 if lone else 2, label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    fids = [p["fid"] for p in points]
    ax.set_ylim(min(fids) / 1.25, max(fids) * 1.25)  # the band's 0 would stretch a log axis's autoscale to 1e-16
    ax.set_xlabel("network evaluations per sample (NFE; Heun: 2 a step)")
    ax.set_ylabel("FID (SSL encoder features)")
    ax.set_title("FID vs NFE (lower is better)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    _save(fig, path)


def guidance_chart(points: list[dict], real_accuracy: float, chance: float, title: str, path: Path) -> None:
    """Two panels against guidance strength (CFG's w - 1, classifier guidance's s: 0 is the plain
    conditional model for both), a line per kind of guidance (`points`: {"guidance", "strength",
    "request_accuracy", "fid"}): the judge's accuracy of the requested class, with its accuracy on
    real test images and chance as levels, and FID."""
    fig, (accuracy_ax, fid_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    by_kind: dict[str, list[dict]] = {}
    for point in points:
        by_kind.setdefault(point["guidance"], []).append(point)
    for kind, group in by_kind.items():
        group = sorted(group, key=lambda p: p["strength"])
        strengths = [p["strength"] for p in group]
        accuracy_ax.plot(strengths, [p["request_accuracy"] for p in group], marker="o", label=kind)
        fid_ax.plot(strengths, [p["fid"] for p in group], marker="o", label=kind)
    accuracy_ax.axhline(real_accuracy, color="0.3", linestyle="--", label=f"real test images: {real_accuracy:.3f}")
    accuracy_ax.axhline(chance, color="0.6", linestyle=":", label=f"chance: {chance:.2f}")
    accuracy_ax.set_ylabel("share classified as the requested class")
    accuracy_ax.set_title("does it follow the request? (higher is better)")
    fid_ax.set_yscale("log")
    fid_ax.yaxis.set_minor_locator(matplotlib.ticker.LogLocator(subs=(2, 3, 5)))  # 0.2, 0.3, 0.5: no crowding near 1
    for axis_format in (fid_ax.yaxis.set_major_formatter, fid_ax.yaxis.set_minor_formatter):
        axis_format(matplotlib.ticker.FormatStrFormatter("%g"))  # 0.2, 0.3: narrow enough for the label beside them
    fid_ax.set_ylabel("FID (SSL encoder features)")
    fid_ax.set_title("FID (lower is better)")
    for ax in (accuracy_ax, fid_ax):
        ax.set_xlabel("guidance strength (CFG: w - 1; classifier: s)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    _save(fig, path)
