"""The pipeline on the real BraTS 2018 cases in ../shared/data/brats18 (T1ce + T2, whole tumor): it proves that
real NIfTI input goes through preprocessing, unlabeled preprocessing, SMMS training and prediction. To fit CI
the volumes are resampled from 1 mm to 4 mm and trained for two iterations; accuracy is benchmarks' business."""
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import BRATS_DIR, nnunet_env, run, smms_cli

SPACING = (4.0, 4.0, 4.0)
CASES = sorted(p.name for p in BRATS_DIR.iterdir()) if BRATS_DIR.is_dir() else []
pytestmark = pytest.mark.skipif(len(CASES) < 6, reason=f"real BraTS cases not found in {BRATS_DIR}")


def _resample(img: sitk.Image, is_label: bool) -> sitk.Image:
    size = [int(round(sz * sp / ns)) for sz, sp, ns in zip(img.GetSize(), img.GetSpacing(), SPACING)]
    interp = sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear
    return sitk.Resample(img, size, sitk.Transform(), interp, img.GetOrigin(), SPACING, img.GetDirection(), 0,
                         img.GetPixelID())


def _write_case(case: str, folder: Path, out_id: str, label_folder: Path = None):
    src = BRATS_DIR / case
    for c, mod in enumerate(("t1ce", "t2")):
        img = _resample(sitk.ReadImage(str(src / f"{case}_{mod}.nii.gz")), False)
        sitk.WriteImage(img, str(folder / f"{out_id}_{c:04d}.nii.gz"))
    if label_folder is not None:
        seg = sitk.ReadImage(str(src / f"{case}_seg.nii.gz"))
        whole = sitk.Cast(sitk.BinaryThreshold(seg, 1, 255, 1, 0), sitk.sitkUInt8)  # labels 1, 2, 4
        sitk.WriteImage(_resample(whole, True), str(label_folder / f"{out_id}.nii.gz"))


def test_smms_pipeline_on_real_brats_cases(tmp_path):
    raw = tmp_path / "raw" / "Dataset502_BraTSsmall"
    for sub in ("imagesTr", "labelsTr", "imagesUnlabeled", "imagesTs", "labelsTs"):
        (raw / sub).mkdir(parents=True)
    labeled, unlabeled, test = CASES[:3], CASES[3:5], CASES[5:]
    for c in labeled:
        _write_case(c, raw / "imagesTr", c, raw / "labelsTr")
    for c in unlabeled:
        _write_case(c, raw / "imagesUnlabeled", c)
    for c in test:
        _write_case(c, raw / "imagesTs", c, raw / "labelsTs")
    (raw / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1ce", "1": "T2"}, "labels": {"background": 0, "whole_tumor": 1},
        "numTraining": len(labeled), "file_ending": ".nii.gz"}))

    env = nnunet_env(tmp_path, nnUNet_smms_epochs=1, nnUNet_smms_iterations_per_epoch=2, nnUNet_smms_val_iterations=1)
    run(["nnUNetv2_plan_and_preprocess", "-d", 502, "-c", "3d_fullres", "-np", "1", "--verify_dataset_integrity"], env)
    # the paper's protocol: a fixed split (train = labeled cases, val = validation cases)
    (tmp_path / "preprocessed" / raw.name / "splits_final.json").write_text(
        json.dumps([{"train": labeled[:2], "val": labeled[2:]}]))
    run(smms_cli("preprocess-unlabeled", "-d", 502, "-c", "3d_fullres"), env)
    unl = tmp_path / "preprocessed" / raw.name / "nnUNetPlans_3d_fullres_unlabeled"
    assert sorted(p.name for p in unl.glob("*.b2nd") if not p.name.endswith("_seg.b2nd")) == \
        [f"{c}.b2nd" for c in unlabeled]

    run(["nnUNetv2_train", 502, "3d_fullres", 0, "-tr", "nnUNetTrainerSMMS", "-device", "cpu"], env)
    model = tmp_path / "results" / raw.name / "nnUNetTrainerSMMS__nnUNetPlans__3d_fullres"
    assert (model / "fold_0" / "checkpoint_final.pth").is_file()
    val = json.loads((model / "fold_0" / "validation" / "summary.json").read_text())
    assert set(val["metric_per_case"][0]["metrics"]) == {"1"}

    out = tmp_path / "pred"
    run(["nnUNetv2_predict", "-i", raw / "imagesTs", "-o", out, "-d", 502, "-c", "3d_fullres", "-f", 0,
         "-tr", "nnUNetTrainerSMMS", "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"], env)
    pred = sitk.ReadImage(str(out / f"{test[0]}.nii.gz"))
    ref = sitk.ReadImage(str(raw / "imagesTs" / f"{test[0]}_0000.nii.gz"))
    assert pred.GetSize() == ref.GetSize() and np.allclose(pred.GetSpacing(), SPACING)
    assert np.allclose(pred.GetOrigin(), ref.GetOrigin()) and np.allclose(pred.GetDirection(), ref.GetDirection())
    assert set(np.unique(sitk.GetArrayFromImage(pred))) <= {0, 1}
