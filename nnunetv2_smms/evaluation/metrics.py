"""Per-case segmentation metrics: Dice, surface distances in mm and volumes in ml.

Surface distances come from medpy (``medpy.metric.binary``), the library behind the published SMMS tables
and the semi-supervised baselines they compare with. The definitions (medpy 0.5.2, connectivity 1):

* surface of a mask: its voxels that the 6-neighbourhood erosion removes (objects touching the array edge
  have a surface there);
* ``asd`` = medpy ``asd(prediction, reference)``: mean distance from each prediction surface voxel to the
  nearest reference surface voxel. One-directional; the convention of the published tables;
* ``assd`` = medpy ``assd``: mean of the pooled distances of both directions (prediction -> reference and
  reference -> prediction), i.e. weighted by the surface sizes, not the mean of the two directed ASDs;
* ``hd95`` = medpy ``hd95``: 95th percentile of the same pooled distances.

Both masks are cropped to the bounding box of their union plus a one-voxel margin before medpy sees them.
This changes no number: every surface voxel of either mask lies inside the crop, the margin (or the array
edge, where the crop ends at it) gives the erosion the same neighbourhood as in the full array, and a
Euclidean distance transform measures straight-line distances, which do not depend on what lies outside.

Empty masks (see ``EMPTY_*``): both empty -> Dice 1, distances 0 (a correct "nothing there"); exactly one
empty -> Dice 0 and distances NaN with an ``EmptySegmentationWarning`` (there is no surface to measure to,
and 0 would reward a missed structure); the summaries leave NaN out of means and count it.
"""
import warnings
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np

LabelOrRegion = Union[int, Tuple[int, ...]]

EMPTY_NONE = ""
EMPTY_BOTH = "both"
EMPTY_PREDICTION = "prediction"
EMPTY_REFERENCE = "reference"

METRIC_NAMES = ("dice", "asd", "assd", "hd95", "volume_pred_ml", "volume_ref_ml")


class EmptySegmentationWarning(UserWarning):
    """Exactly one of prediction and reference is empty: the surface distances are NaN."""


def crop_to_union(prediction: np.ndarray, reference: np.ndarray, margin: int = 1) -> Tuple[np.ndarray, np.ndarray]:
    """Both masks cut to the bounding box of ``prediction | reference`` grown by ``margin`` voxels (clipped to
    the array). The union must not be empty."""
    union = prediction | reference
    box = []
    for axis, size in enumerate(union.shape):
        occupied = np.flatnonzero(np.any(union, axis=tuple(a for a in range(union.ndim) if a != axis)))
        box.append(slice(max(int(occupied[0]) - margin, 0), min(int(occupied[-1]) + 1 + margin, size)))
    return prediction[tuple(box)], reference[tuple(box)]


def dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty."""
    total = int(np.count_nonzero(prediction)) + int(np.count_nonzero(reference))
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(prediction & reference)) / total


def surface_distances(prediction: np.ndarray, reference: np.ndarray,
                      spacing: Sequence[float]) -> Dict[str, float]:
    """ASD, ASSD and HD95 (medpy, see module doc) in the unit of ``spacing``; both masks must be non-empty."""
    from medpy.metric.binary import asd, assd, hd95

    prediction, reference = crop_to_union(prediction, reference)
    return {
        "asd": float(asd(prediction, reference, voxelspacing=spacing)),
        "assd": float(assd(prediction, reference, voxelspacing=spacing)),
        "hd95": float(hd95(prediction, reference, voxelspacing=spacing)),
    }


def binary_metrics(prediction: np.ndarray, reference: np.ndarray, spacing: Sequence[float],
                   what: str = "masks") -> Dict[str, Union[float, str]]:
    """All metrics of two boolean masks of equal shape; ``spacing`` in mm per array axis.

    Returns the ``METRIC_NAMES`` plus ``empty`` (one of the ``EMPTY_*`` values). ``what`` names the masks in
    the warning given when exactly one of them is empty.
    """
    if prediction.shape != reference.shape:
        raise ValueError(f"{what}: prediction shape {prediction.shape} != reference shape {reference.shape}")
    if len(spacing) != prediction.ndim:
        raise ValueError(f"{what}: spacing {tuple(spacing)} does not have one entry per axis of {prediction.shape}")
    prediction = prediction.astype(bool, copy=False)
    reference = reference.astype(bool, copy=False)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    n_pred, n_ref = int(np.count_nonzero(prediction)), int(np.count_nonzero(reference))
    result = {"dice": dice(prediction, reference),
              "volume_pred_ml": n_pred * voxel_ml, "volume_ref_ml": n_ref * voxel_ml}
    if n_pred and n_ref:
        result.update(surface_distances(prediction, reference, spacing), empty=EMPTY_NONE)
    elif not n_pred and not n_ref:
        result.update(asd=0.0, assd=0.0, hd95=0.0, empty=EMPTY_BOTH)
    else:
        empty = EMPTY_PREDICTION if not n_pred else EMPTY_REFERENCE
        warnings.warn(f"{what}: the {empty} is empty, the other is not: Dice 0, surface distances NaN",
                      EmptySegmentationWarning, stacklevel=2)
        result.update(asd=float("nan"), assd=float("nan"), hd95=float("nan"), empty=empty)
    return result


def case_metrics(prediction: np.ndarray, reference: np.ndarray, spacing: Sequence[float],
                 labels_or_regions: Sequence[LabelOrRegion], ignore_label: Optional[int] = None,
                 case: str = "case") -> Dict[LabelOrRegion, Dict[str, Union[float, str]]]:
    """Metrics per label or region (nnU-Net's notion: an int, or a tuple of labels whose union is the region)
    of two label maps. Voxels that carry ``ignore_label`` in the reference are removed from the prediction
    first (as nnU-Net's own Dice leaves them out)."""
    from nnunetv2.evaluation.evaluate_predictions import region_or_label_to_mask

    keep = None if ignore_label is None else reference != ignore_label
    results = {}
    for r in labels_or_regions:
        mask_pred = region_or_label_to_mask(prediction, r)
        if keep is not None:
            mask_pred &= keep
        results[r] = binary_metrics(mask_pred, region_or_label_to_mask(reference, r), spacing,
                                    what=f"{case}, label/region {r}")
    return results
