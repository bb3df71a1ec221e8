"""The evaluation's figures from its files: picks the example cases, reads their images and masks, and has
figures.py draw the Dice box plot and the example-case figure."""
import os
from typing import List, Optional, Sequence

import numpy as np

from nnunetv2_smms.evaluation.inputs import EvaluationError, Labels, Source, case_images


def figure_cases(rows: Sequence[dict], n: int) -> List[str]:
    """Up to ``n`` cases spread over the Dice range of the first source and region: worst, ..., best."""
    first = rows[0]
    ranked = sorted((r["dice"], r["case"]) for r in rows
                    if (r["method"], r["output"], r["region"]) == (first["method"], first["output"], first["region"]))
    picks = np.unique(np.round(np.linspace(0, len(ranked) - 1, min(n, len(ranked)))).astype(int))
    return [ranked[i][1] for i in picks]


def write_figures(out_folder: str, rows: Sequence[dict], labels: Labels, sources: Sequence[Source],
                  images_folder: Optional[str], dataset_json: Optional[dict], reader, file_ending: str,
                  reference_folder: str, n_cases: int) -> List[str]:
    """The Dice box plot, and the example-case figure (needs the images) for the first label/region."""
    from nnunetv2.evaluation.evaluate_predictions import region_or_label_to_mask

    from nnunetv2_smms.evaluation.figures import plot_cases, plot_dice_boxplot

    written = [os.path.join(out_folder, "figures", "dice_boxplot.png")]
    plot_dice_boxplot(written[0], rows, labels.names)
    if images_folder is None or n_cases <= 0:
        return written
    channels = (dataset_json or {}).get("channel_names", {})
    n_channels = len(channels) or len(case_images(images_folder, rows[0]["case"], file_ending))
    channel_names = [channels.get(str(i), f"channel {i}") for i in range(n_channels)]
    region = labels.regions[0]
    cases = []
    for case in figure_cases(rows, n_cases):
        images, props = reader.read_images(case_images(images_folder, case, file_ending, n_channels))
        ref = reader.read_seg(os.path.join(reference_folder, case + file_ending))[0][0]
        preds = {(s.method, s.output): region_or_label_to_mask(
            reader.read_seg(os.path.join(s.folder, case + file_ending))[0][0], region) for s in sources}
        cases.append(dict(case=case, images=images, reference=region_or_label_to_mask(ref, region),
                          predictions=preds, spacing=props["spacing"]))
    check_figure_images(cases, reference_folder)
    written.append(os.path.join(out_folder, "figures", "cases.png"))
    plot_cases(written[-1], cases, channel_names)
    return written


def check_figure_images(cases: Sequence[dict], reference_folder: str) -> None:
    for case in cases:
        if case["images"].shape[1:] != case["reference"].shape:
            raise EvaluationError(f"case {case['case']}: images of shape {case['images'].shape[1:]} do not match "
                                  f"the reference {os.path.join(reference_folder, case['case'])} of shape "
                                  f"{case['reference'].shape}")

