"""Per-case metrics on shapes with a known answer, cross-checked against medpy 0.5.2 on the uncropped arrays,
the empty-mask rules, and a real BraTS whole tumor against a shifted copy of itself."""
import math
import os
import warnings

import numpy as np
import pytest
from medpy.metric import binary as medpy_binary

from nnunetv2_smms.evaluation.metrics import (EMPTY_BOTH, EMPTY_NONE, EMPTY_PREDICTION, EMPTY_REFERENCE,
                                              EmptySegmentationWarning, binary_metrics, case_metrics,
                                              crop_to_union)

BRATS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "brats18")


def medpy_reference(pred, ref, spacing):
    """The same numbers straight from medpy on the full arrays (no cropping)."""
    return {"dice": medpy_binary.dc(pred, ref), "asd": medpy_binary.asd(pred, ref, spacing),
            "assd": medpy_binary.assd(pred, ref, spacing), "hd95": medpy_binary.hd95(pred, ref, spacing)}


def assert_matches_medpy(result, pred, ref, spacing):
    expected = medpy_reference(pred, ref, spacing)
    for name, value in expected.items():
        assert result[name] == pytest.approx(value, rel=1e-12, abs=1e-12), name


def cube(shape, lower, size):
    mask = np.zeros(shape, bool)
    mask[tuple(slice(lo, lo + size) for lo in lower)] = True
    return mask


def ball(shape, center_mm, radius_mm, spacing):
    grid = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    return sum((g - c) ** 2 for g, c in zip(grid, center_mm)) <= radius_mm ** 2


def test_single_voxels_give_their_distance_in_mm_with_anisotropic_spacing():
    spacing = (3.0, 1.0, 0.5)
    ref, pred = np.zeros((8, 8, 8), bool), np.zeros((8, 8, 8), bool)
    ref[2, 2, 2] = True
    pred[4, 3, 6] = True
    expected = math.sqrt((2 * 3.0) ** 2 + 1.0 ** 2 + (4 * 0.5) ** 2)
    result = binary_metrics(pred, ref, spacing)
    assert result["asd"] == pytest.approx(expected)
    assert result["assd"] == pytest.approx(expected)
    assert result["hd95"] == pytest.approx(expected)
    assert result["dice"] == 0.0
    assert result["volume_pred_ml"] == pytest.approx(3.0 * 1.0 * 0.5 / 1000)
    assert result["empty"] == EMPTY_NONE


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_cube_shifted_along_one_axis(axis):
    spacing, n, k = (3.0, 1.0, 0.7), 10, 2
    ref = cube((20, 20, 20), (5, 5, 5), n)
    pred = np.roll(ref, k, axis=axis)
    result = binary_metrics(pred, ref, spacing)
    assert result["dice"] == pytest.approx((n - k) / n)
    # every shifted surface voxel lies k voxels from a reference surface voxel, and the front face no closer
    assert medpy_binary.hd(pred, ref, spacing) == pytest.approx(k * spacing[axis])
    assert 0 < result["asd"] <= k * spacing[axis] and 0 < result["hd95"] <= k * spacing[axis]
    assert result["asd"] == pytest.approx(result["assd"])  # a shift is symmetric
    assert result["volume_pred_ml"] == result["volume_ref_ml"] == pytest.approx(n ** 3 * 3.0 * 0.7 / 1000)
    assert_matches_medpy(result, pred, ref, spacing)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.5, 1.0, 1.0)])
def test_concentric_spheres_are_the_radius_difference_apart(spacing):
    shape = tuple(int(round(40 / s)) for s in spacing)
    center = (20.0, 20.0, 20.0)
    ref, pred = ball(shape, center, 8.0, spacing), ball(shape, center, 12.0, spacing)
    result = binary_metrics(pred, ref, spacing)
    # discretisation moves each surface by up to about half a voxel along the coarsest axis
    tolerance = 0.5 + max(spacing) / 2
    for name in ("asd", "assd", "hd95"):
        assert result[name] == pytest.approx(4.0, abs=tolerance), name
    assert result["dice"] == pytest.approx(2 * 8 ** 3 / (8 ** 3 + 12 ** 3), abs=0.05)
    assert_matches_medpy(result, pred, ref, spacing)


def test_shifted_sphere_hd95_bounded_by_the_shift():
    spacing, k = (1.0, 1.0, 1.0), 3
    ref = ball((40, 40, 40), (20.0, 20.0, 20.0), 9.0, spacing)
    pred = np.roll(ref, k, axis=2)
    result = binary_metrics(pred, ref, spacing)
    assert medpy_binary.hd(pred, ref, spacing) == pytest.approx(k)
    assert 0 < result["hd95"] <= k and 0 < result["asd"] < k
    assert_matches_medpy(result, pred, ref, spacing)


def test_asd_is_one_directional_and_assd_pools_both_directions():
    spacing = (1.0, 1.0, 1.0)
    ref = cube((30, 30, 30), (5, 5, 5), 12)
    pred = cube((30, 30, 30), (8, 8, 8), 4)  # small cube deep inside the big one
    result = binary_metrics(pred, ref, spacing)
    reverse = binary_metrics(ref, pred, spacing)
    assert result["asd"] != pytest.approx(reverse["asd"])
    assert result["asd"] == pytest.approx(medpy_binary.asd(pred, ref, spacing))
    assert result["assd"] == pytest.approx(reverse["assd"])
    assert_matches_medpy(result, pred, ref, spacing)


def test_masks_touching_the_array_edge_give_the_uncropped_numbers():
    spacing = (1.0, 2.0, 1.0)
    ref = cube((12, 12, 12), (0, 0, 4), 6)
    pred = cube((12, 12, 12), (0, 2, 6), 6)
    pred[11, 11, 11] = True  # a far voxel in the corner
    assert_matches_medpy(binary_metrics(pred, ref, spacing), pred, ref, spacing)


def test_crop_keeps_a_one_voxel_margin_inside_the_array():
    ref = cube((20, 20, 20), (5, 6, 0), 3)
    cropped_pred, cropped_ref = crop_to_union(np.zeros_like(ref), ref)
    assert cropped_ref.shape == (5, 5, 4)
    assert cropped_ref.sum() == ref.sum()


def test_both_empty_is_a_perfect_match_without_warning():
    empty = np.zeros((5, 5, 5), bool)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = binary_metrics(empty, empty, (1, 1, 1))
    assert result == {"dice": 1.0, "asd": 0.0, "assd": 0.0, "hd95": 0.0, "volume_pred_ml": 0.0,
                      "volume_ref_ml": 0.0, "empty": EMPTY_BOTH}


@pytest.mark.parametrize("empty_side", [EMPTY_PREDICTION, EMPTY_REFERENCE])
def test_one_empty_gives_dice_0_nan_distances_and_a_warning(empty_side):
    full, empty = cube((10, 10, 10), (2, 2, 2), 3), np.zeros((10, 10, 10), bool)
    pred, ref = (empty, full) if empty_side == EMPTY_PREDICTION else (full, empty)
    with pytest.warns(EmptySegmentationWarning, match=f"case X.*the {empty_side} is empty"):
        result = binary_metrics(pred, ref, (1, 1, 1), what="case X")
    assert result["dice"] == 0.0 and result["empty"] == empty_side
    assert all(math.isnan(result[m]) for m in ("asd", "assd", "hd95"))


def test_bad_shapes_and_spacing_are_errors():
    with pytest.raises(ValueError, match="shape"):
        binary_metrics(np.ones((3, 3, 3), bool), np.ones((3, 3, 4), bool), (1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        binary_metrics(np.ones((3, 3, 3), bool), np.ones((3, 3, 3), bool), (1, 1))


def test_case_metrics_labels_regions_and_ignore_label():
    ref = np.zeros((12, 12, 12), np.uint8)
    ref[2:6, 2:6, 2:6] = 1
    ref[6:9, 2:6, 2:6] = 2
    ref[10:, :, :] = 3  # ignore label
    pred = ref.copy()
    pred[pred == 3] = 1  # predictions inside the ignored region do not count
    pred[6:9, 2:6, 2:6] = 0  # label 2 missed entirely
    with pytest.warns(EmptySegmentationWarning, match="label/region 2"):
        result = case_metrics(pred, ref, (1, 1, 1), [1, 2, (1, 2)], ignore_label=3, case="c1")
    assert result[1]["dice"] == 1.0 and result[1]["asd"] == 0.0
    assert result[2]["dice"] == 0.0 and result[2]["empty"] == EMPTY_PREDICTION
    assert result[(1, 2)]["dice"] == pytest.approx(2 * 64 / (64 + 112))
    assert result[(1, 2)]["volume_ref_ml"] == pytest.approx(112 / 1000)


@pytest.fixture(scope="module")
def brats_whole_tumor():
    import SimpleITK as sitk

    case = sorted(os.listdir(BRATS))[0]
    image = sitk.ReadImage(os.path.join(BRATS, case, f"{case}_seg.nii.gz"))
    return sitk.GetArrayFromImage(image) > 0, tuple(image.GetSpacing())[::-1]


@pytest.mark.parametrize("spacing", [None, (1.0, 1.0, 2.5)])
def test_brats_whole_tumor_against_a_shifted_copy(brats_whole_tumor, spacing):
    ref, header_spacing = brats_whole_tumor
    assert ref.shape == (155, 240, 240) and ref.any() and header_spacing == (1.0, 1.0, 1.0)
    k, axis = 3, 2
    pred = np.roll(ref, k, axis=axis)
    result = binary_metrics(pred, ref, spacing or header_spacing)
    shift_mm = k * (spacing or header_spacing)[axis]
    assert medpy_binary.hd(*crop_to_union(pred, ref), spacing or header_spacing) == pytest.approx(shift_mm)
    assert 0 < result["asd"] < shift_mm and 0 < result["hd95"] <= shift_mm
    assert result["volume_pred_ml"] == pytest.approx(result["volume_ref_ml"])
    assert result["volume_ref_ml"] == pytest.approx(ref.sum() * np.prod(spacing or header_spacing) / 1000)
    if spacing is None:  # medpy on the whole 240x240x155 volume: the crop changes nothing
        assert result["asd"] == pytest.approx(medpy_binary.asd(pred, ref, header_spacing), rel=1e-12)
        assert result["hd95"] == pytest.approx(medpy_binary.hd95(pred, ref, header_spacing), rel=1e-12)
