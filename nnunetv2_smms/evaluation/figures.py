"""PNG figures: example cases drawn like the paper's Fig. 2, and a box plot of Dice per method and output.

Plotting only: the arrays come from the caller. matplotlib is used through ``Figure`` objects (Agg canvas),
so no pyplot state or display is involved.
"""
from typing import Dict, List, Sequence, Tuple

import numpy as np

from nnunetv2_smms.evaluation.report import atomic_path

REFERENCE_COLOR = "lime"
PREDICTION_COLOR = "red"
PANEL_INCHES = 2.4


def axial_slice(reference: np.ndarray, predictions: Sequence[np.ndarray]) -> int:
    """Index along axis 0 (axial for nnU-Net's z, y, x arrays) with the largest reference area; the largest
    predicted area if the reference is empty; the middle slice if everything is."""
    for masks in ([reference], list(predictions)):
        area = sum(m.sum(axis=tuple(range(1, m.ndim))) for m in masks)
        if np.any(area):
            return int(np.argmax(area))
    return reference.shape[0] // 2


def _show(ax, image: np.ndarray, aspect: float) -> None:
    low, high = np.percentile(image, (0.5, 99.5))
    ax.imshow(image, cmap="gray", vmin=low, vmax=high if high > low else low + 1, aspect=aspect,
              interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def _contour(ax, mask: np.ndarray, color: str) -> None:
    if mask.any() and not mask.all():
        ax.contour(mask.astype(float), levels=[0.5], colors=color, linewidths=1.0)


def plot_cases(path: str, cases: Sequence[dict], channel_names: Sequence[str]) -> None:
    """One row per case: first each modality with the reference contour, then one panel per (method, output)
    with its prediction (red) over the reference (green), drawn on the modality named like the output
    (an SMMS branch) or on the first one.

    ``cases``: dicts with "case" (id), "images" (channels, z, y, x), "reference" (z, y, x bool), "predictions"
    {(method, output): (z, y, x) bool}, "spacing" (z, y, x) in mm.
    """
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    sources: List[Tuple[str, str]] = list(cases[0]["predictions"])
    n_cols = len(channel_names) + len(sources)
    fig = Figure(figsize=(PANEL_INCHES * n_cols, PANEL_INCHES * len(cases) + 0.8), layout="constrained")
    axes = fig.subplots(len(cases), n_cols, squeeze=False)
    for row, case in zip(axes, cases):
        z = axial_slice(case["reference"], list(case["predictions"].values()))
        aspect = case["spacing"][1] / case["spacing"][2]
        reference = case["reference"][z]
        for ax, channel, name in zip(row, case["images"], channel_names):
            _show(ax, channel[z], aspect)
            _contour(ax, reference, REFERENCE_COLOR)
            ax.set_title(name, fontsize=9)
        for ax, (method, output) in zip(row[len(channel_names):], sources):
            channel = list(channel_names).index(output) if output in channel_names else 0
            _show(ax, case["images"][channel][z], aspect)
            _contour(ax, reference, REFERENCE_COLOR)
            _contour(ax, case["predictions"][(method, output)][z], PREDICTION_COLOR)
            ax.set_title(f"{method}\n{output}", fontsize=9)
        row[0].set_ylabel(f"{case['case']}\nslice {z}", fontsize=9)
    fig.legend(handles=[Line2D([], [], color=REFERENCE_COLOR, label="reference"),
                        Line2D([], [], color=PREDICTION_COLOR, label="prediction")],
               loc="outside lower center", ncol=2, frameon=False)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def plot_dice_boxplot(path: str, rows: Sequence[dict], region_names: Dict[str, str]) -> None:
    """One panel per region, one box of per-case Dice (%) per (method, output), in the order of ``rows``."""
    from matplotlib.figure import Figure

    regions = list(dict.fromkeys(r["region"] for r in rows))
    sources = list(dict.fromkeys((r["method"], r["output"]) for r in rows))
    fig = Figure(figsize=(max(4.0, 1.0 + 0.9 * len(sources)), 3.6 * len(regions)), layout="constrained")
    axes = fig.subplots(len(regions), 1, squeeze=False)[:, 0]
    for ax, region in zip(axes, regions):
        values = [[100 * r["dice"] for r in rows if r["region"] == region and (r["method"], r["output"]) == s]
                  for s in sources]
        ax.boxplot(values, showmeans=True)
        # trainer names share nnU-Net's prefix; without it (and slanted) a dozen methods stay readable
        ax.set_xticks(range(1, len(sources) + 1), [f"{m.removeprefix('nnUNetTrainer') or m}\n{o}"
                                                   for m, o in sources], fontsize=8, rotation=30, ha="right")
        ax.set_ylabel("DSC (%)")
        ax.set_title(f"Region {region_names.get(region, region)}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
