"""`nnunetv2_smms plan-gpu`: a configuration that inherits, keeps data_identifier (reuses the preprocessed labeled
and unlabeled data), has a smaller patch for a small memory target, and trains."""
import json
import shutil
from pathlib import Path

import pytest

from conftest import DATASET_ID, nnunet_env, run, smms_cli


def _copy(prepared_dataset, root: Path) -> dict:
    """A private copy of the session's prepared dataset (plan-gpu writes into the plans file)."""
    for sub in ("raw", "preprocessed"):
        shutil.copytree(Path(prepared_dataset["env"][f"nnUNet_{sub}"]), root / sub)
    return nnunet_env(root)


def test_plan_gpu_adds_a_smaller_inheriting_configuration_that_trains(prepared_dataset, tmp_path):
    env = _copy(prepared_dataset, tmp_path)
    name = prepared_dataset["raw"].name
    plans_file = tmp_path / "preprocessed" / name / "nnUNetPlans.json"
    parent = json.loads(plans_file.read_text())["configurations"]["3d_fullres"]

    # what the parent configuration needs for SMMS, by nnU-Net's estimate (in-process, nothing written)
    from nnunetv2_smms.planning import fit_configuration
    plans = json.loads(plans_file.read_text())
    ds_json = json.loads((tmp_path / "preprocessed" / name / "dataset.json").read_text())
    need = fit_configuration(plans, "3d_fullres", ds_json, 1000)["smms_gpu_plan"]
    assert need["estimate_gb_parent_smms"] > 2 * need["estimate_gb_parent_plain_nnunet"]  # 2 branches + fusion
    joint = fit_configuration(plans, "3d_fullres", ds_json, 1000, separate_passes=False)["smms_gpu_plan"]
    # one pass over labeled + unlabeled cases (2 + 2) holds both parts' activations at once
    assert joint["estimate_gb_parent_smms"] == pytest.approx(2 * need["estimate_gb_parent_smms"], rel=0.02, abs=0.02)
    target = round(need["estimate_gb_parent_smms"] * 0.6, 6)

    p = run(smms_cli("plan-gpu", "-d", DATASET_ID, "-c", "3d_fullres", "--gpu-memory", target, "--name",
                     "3d_fullres_smms_small"), env)
    assert "nnUNetv2_train" in p.stdout
    configs = json.loads(plans_file.read_text())["configurations"]
    new = configs["3d_fullres_smms_small"]
    assert set(configs) >= {"3d_fullres", "3d_fullres_smms_small"}
    assert configs["3d_fullres"] == parent  # the default configuration is untouched
    assert new["inherits_from"] == "3d_fullres" and new["data_identifier"] == parent["data_identifier"]
    assert all(n <= o for n, o in zip(new["patch_size"], parent["patch_size"]))
    assert sum(new["patch_size"]) < sum(parent["patch_size"])
    assert new["smms_gpu_plan"]["estimate_gb_smms"] <= target + 0.005  # written rounded to 0.01 GB

    # the unlabeled folder of the parent is valid for the new configuration (same stamp): no re-preprocessing
    from nnunetv2_smms.unlabeled.preprocess import plans_hash
    plans = json.loads(plans_file.read_text())
    assert plans_hash(plans, "3d_fullres_smms_small", ds_json) == plans_hash(plans, "3d_fullres", ds_json)

    # bad input: an exit code 2 and a message, the plans file untouched
    before = plans_file.read_text()
    p = run(smms_cli("plan-gpu", "-d", DATASET_ID, "-c", "2d_nope", "--gpu-memory", "12"), env, expect_ok=False)
    assert p.returncode == 2 and "2d_nope" in p.stderr
    assert plans_file.read_text() == before

    # one training iteration with the new configuration, then the default still trains from the same data
    short = dict(nnUNet_smms_epochs="1", nnUNet_smms_iterations_per_epoch="1", nnUNet_smms_val_iterations="1")
    env_train = dict(env, **short)
    p = run(["nnUNetv2_train", DATASET_ID, "3d_fullres_smms_small", "0", "-tr", "nnUNetTrainerSMMS", "-device", "cpu",
             "--disable_checkpointing"], env_train)
    model = tmp_path / "results" / name / "nnUNetTrainerSMMS__nnUNetPlans__3d_fullres_smms_small"
    used = json.loads((model / "plans.json").read_text())
    assert used["configurations"]["3d_fullres_smms_small"]["patch_size"] == new["patch_size"]
    assert "unlabeled cases" in p.stdout
