"""Unlabeled cases: raw layout checks, preprocessing with the labeled plans, stamps, and the data loader."""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from conftest import DATASET_ID, run, smms_cli
from nnunetv2_smms.unlabeled.loader import UnlabeledDataLoader, batch_share
from nnunetv2_smms.unlabeled.preprocess import (STAMP_FILE, UnlabeledDataError, check_unlabeled_ready,
                                                collect_unlabeled_cases)

DS_JSON = {"channel_names": {"0": "A", "1": "B"}, "file_ending": ".nii.gz"}


def _touch(folder: Path, *names):
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        (folder / n).write_bytes(b"")


def test_collect_groups_channels_and_rejects_bad_layouts(tmp_path):
    _touch(tmp_path / "imagesUnlabeled", "x_0000.nii.gz", "x_0001.nii.gz", "y_0001.nii.gz", "y_0000.nii.gz")
    cases = collect_unlabeled_cases(str(tmp_path), DS_JSON)
    assert list(cases) == ["x", "y"] and cases["y"][0].endswith("y_0000.nii.gz")

    _touch(tmp_path / "imagesUnlabeled", "z_0000.nii.gz")
    with pytest.raises(UnlabeledDataError, match=r"'z'.*missing z_0001.nii.gz"):
        collect_unlabeled_cases(str(tmp_path), DS_JSON)
    os.remove(tmp_path / "imagesUnlabeled" / "z_0000.nii.gz")
    _touch(tmp_path / "imagesUnlabeled", "w_0000.nii.gz", "w_0001.nii.gz", "w_0002.nii.gz")
    with pytest.raises(UnlabeledDataError, match=r"'w'.*unexpected w_0002.nii.gz"):
        collect_unlabeled_cases(str(tmp_path), DS_JSON)
    for f in (tmp_path / "imagesUnlabeled").glob("w_*"):
        f.unlink()
    _touch(tmp_path / "imagesUnlabeled", "v_0000.nrrd")
    with pytest.raises(UnlabeledDataError, match=r"v_0000.nrrd.*file_ending"):
        collect_unlabeled_cases(str(tmp_path), DS_JSON)
    assert collect_unlabeled_cases(str(tmp_path / "nothing"), DS_JSON) == {}


def test_batch_share_splits_like_nnunet():
    assert [batch_share(5, 2, r) for r in range(2)] == [3, 2]
    assert sum(batch_share(7, 3, r) for r in range(3)) == 7
    with pytest.raises(ValueError, match="smaller than the number of GPUs"):
        batch_share(1, 2, 0)


def _context(prepared):
    pre = Path(prepared["env"]["nnUNet_preprocessed"]) / prepared["raw"].name
    plans = load_json(str(pre / "nnUNetPlans.json"))
    return pre, plans, load_json(str(pre / "dataset.json"))


def test_preprocessed_unlabeled_cases_have_no_labels_and_load_without_them(prepared_dataset):
    pre, plans, ds_json = _context(prepared_dataset)
    folder = check_unlabeled_ready(prepared_dataset["raw"].name, str(pre), str(prepared_dataset["raw"]), plans,
                                   "3d_fullres", ds_json, "nnUNetPlans")
    assert folder == str(pre / "nnUNetPlans_3d_fullres_unlabeled")
    ds = nnUNetDatasetBlosc2(folder)
    assert len(ds.identifiers) == 6 and all(i.startswith("unl_") for i in ds.identifiers)
    data, mask, _, props = ds.load_case(ds.identifiers[0])
    assert "class_locations" not in props  # preprocessed without segmentation
    assert set(np.unique(mask[:])) <= {-1, 0}  # only nnU-Net's nonzero mask, no label values

    pm = PlansManager(plans)
    cm = pm.get_configuration("3d_fullres")
    lm = pm.get_label_manager(ds_json)
    # nnU-Net's own loader needs labels (class locations) and cannot read these cases ...
    with pytest.raises(KeyError, match="class_locations"):
        nnUNetDataLoader(ds, 2, cm.patch_size, cm.patch_size, lm, oversample_foreground_percent=1.0).generate_train_batch()
    # ... ours crops at random and returns images only
    batch = UnlabeledDataLoader(ds, 3, cm.patch_size, cm.patch_size, lm).generate_train_batch()
    assert set(batch) == {"data", "keys"}
    assert batch["data"].shape == (3, 2, *cm.patch_size) and np.isfinite(batch["data"].numpy()).all()
    assert all(k in ds.identifiers for k in batch["keys"])


def test_stale_or_missing_unlabeled_data_names_the_fix(prepared_dataset, tmp_path):
    pre, plans, ds_json = _context(prepared_dataset)
    name, raw = prepared_dataset["raw"].name, str(prepared_dataset["raw"])
    replanned = json.loads(json.dumps(plans))
    replanned["configurations"]["3d_fullres"]["spacing"] = [2.0, 2.0, 2.0]
    with pytest.raises(UnlabeledDataError, match=rf"stale: it was made with other plans.*preprocess-unlabeled -d {name} -c 3d_fullres"):
        check_unlabeled_ready(name, str(pre), raw, replanned, "3d_fullres", ds_json, "nnUNetPlans")

    raw_copy = tmp_path / name
    shutil.copytree(raw, raw_copy)
    shutil.copy(raw_copy / "imagesUnlabeled" / "unl_000_0000.nii.gz", raw_copy / "imagesUnlabeled" / "new_0000.nii.gz")
    shutil.copy(raw_copy / "imagesUnlabeled" / "unl_000_0001.nii.gz", raw_copy / "imagesUnlabeled" / "new_0001.nii.gz")
    with pytest.raises(UnlabeledDataError, match="raw unlabeled images changed"):
        check_unlabeled_ready(name, str(pre), str(raw_copy), plans, "3d_fullres", ds_json, "nnUNetPlans")

    shutil.rmtree(raw_copy / "imagesUnlabeled")
    empty_pre = tmp_path / "pre"
    empty_pre.mkdir()
    with pytest.raises(UnlabeledDataError, match="No unlabeled cases.*use nnUNetTrainerSMMS_MMF_MAE"):
        check_unlabeled_ready(name, str(empty_pre), str(raw_copy), plans, "3d_fullres", ds_json, "nnUNetPlans",
                              supervised_alternative="nnUNetTrainerSMMS_MMF_MAE")
    from nnunetv2_smms.trainers import nnUNetTrainerSMMS  # what the SMMS trainers name
    assert "nnUNetTrainerSMMS_MMF_MAE" in nnUNetTrainerSMMS.supervised_only_alternative


def test_cli_reports_corrupt_file_and_leaves_nothing_half_written(prepared_dataset, tmp_path):
    root = tmp_path / "copy"
    for sub in ("raw", "preprocessed"):
        shutil.copytree(Path(prepared_dataset["env"][f"nnUNet_{sub}"]), root / sub)
    env = dict(prepared_dataset["env"], nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "preprocessed"))
    name = prepared_dataset["raw"].name
    unl = root / "raw" / name / "imagesUnlabeled"
    target = root / "preprocessed" / name / "nnUNetPlans_3d_fullres_unlabeled"
    before = sorted(os.listdir(target))

    p = run(smms_cli("preprocess-unlabeled", "-d", DATASET_ID, "-c", "3d_fullres"), env)
    assert "up to date" in p.stdout

    good = (unl / "unl_002_0001.nii.gz").read_bytes()
    (unl / "unl_002_0001.nii.gz").write_bytes(good[: len(good) // 3])  # truncated file
    p = run(smms_cli("preprocess-unlabeled", "-d", DATASET_ID, "-c", "3d_fullres"), env, expect_ok=False)
    assert p.returncode == 2
    assert "unl_002" in p.stderr and "unl_002_0001.nii.gz" in p.stderr and "Traceback" not in p.stderr
    assert sorted(os.listdir(target)) == before  # the previous complete folder is untouched
    assert not [d for d in os.listdir(target.parent) if d.startswith(".")]  # no temporary leftovers

    (unl / "unl_002_0001.nii.gz").write_bytes(good)
    (unl / "unl_005_0000.nii.gz").rename(unl / "extra_0000.nii.gz")
    (unl / "unl_005_0001.nii.gz").rename(unl / "extra_0001.nii.gz")
    run(smms_cli("preprocess-unlabeled", "-d", DATASET_ID, "-c", "3d_fullres"), env)
    after = sorted(os.listdir(target))
    assert "extra.b2nd" in after and "unl_005.b2nd" not in after and STAMP_FILE in after
