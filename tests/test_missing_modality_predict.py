"""``nnunetv2_smms predict`` on a folder where a case lacks a modality's file (inference/missing_modality.py), each
behaviour pinned by a test that fails without it: the incomplete case is predicted by the present modality's branch
(its probabilities are that branch's on a zero-filled channel, not the fused output's), its segmentation has the
image's geometry, the log and missing_modalities.json name the missing file and the branch; a complete case gives
nnUNetv2_predict's segmentation and probabilities exactly; a plain nnU-Net model predicts with the channel
zero-filled and says so; unknown files and cases that no branch can predict stop before anything is written; a
failure leaves no temporary files; nnUNetv2_predict itself stops with an error naming this command. Tiny models
trained by nnUNetv2_train into a temporary nnUNet_results (never the prepared dataset's)."""
import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import DATASET_ID, REPO, run, smms_cli
from nnunetv2_smms.ext_trainer_dir import ext_trainer_env
from nnunetv2_smms.inference.missing_modality import Case, MissingModalityError, plan_cases

SMMS = "nnUNetTrainerSMMS_ModalityDropout"
PLAIN = "nnUNetTrainerBenchShort"  # nnU-Net's own trainer, short schedule (benchmarks/ext_trainers)


@pytest.fixture(scope="module")
def models(prepared_dataset, tmp_path_factory):
    results = tmp_path_factory.mktemp("missing_modality_results")
    env = dict(prepared_dataset["env"], nnUNet_results=str(results), nnUNet_smms_epochs="1",
               nnUNet_smms_iterations_per_epoch="2", nnUNet_smms_val_iterations="1", nnUNet_n_proc_DA="0",
               nnUNet_extTrainer=ext_trainer_env(str(REPO / "benchmarks" / "ext_trainers")))
    for trainer in (SMMS, PLAIN):
        run(["nnUNetv2_train", DATASET_ID, "3d_fullres", "0", "-tr", trainer, "-device", "cpu"], env)
    raw = prepared_dataset["raw"]
    return {"env": env, "raw": raw,
            "folder": {t: results / raw.name / f"{t}__nnUNetPlans__3d_fullres" for t in (SMMS, PLAIN)}}


def _input_copy(raw, folder, drop=()):
    shutil.copytree(raw / "imagesTs", folder)
    for name in drop:
        (folder / name).unlink()
    return folder


def _predict(env, inp, out, trainer, *extra, expect_ok=True):
    return run(smms_cli("predict", "-i", inp, "-o", out, "-d", DATASET_ID, "-c", "3d_fullres", "-f", "0", "-tr",
                        trainer, "-device", "cpu", "--disable_tta", *extra), env, expect_ok=expect_ok)


def _geometry(path):
    img = sitk.ReadImage(str(path))
    return img.GetSize(), img.GetSpacing(), img.GetOrigin(), img.GetDirection()


def _branch_probabilities(model_folder, present, like, tmp_path, branch):
    """Probabilities of the model with `branch` as output on [present, zeros] (a zero image written here with
    SimpleITK, not by the code under test)."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunetv2_smms.architectures import set_output_branch
    from nnunetv2_smms.ext_trainer_dir import ext_trainers_visible

    ref = sitk.ReadImage(str(like))
    zero = sitk.Image(ref.GetSize(), sitk.sitkFloat32)
    zero.CopyInformation(ref)
    zero_file = tmp_path / "zero_0001.nii.gz"
    sitk.WriteImage(zero, str(zero_file))
    predictor = nnUNetPredictor(use_mirroring=False, perform_everything_on_device=False, device=torch.device("cpu"),
                                allow_tqdm=False)
    with ext_trainers_visible():
        predictor.initialize_from_trained_model_folder(str(model_folder), (0,))
    image, props = predictor.plans_manager.image_reader_writer_class().read_images([str(present), str(zero_file)])
    set_output_branch(predictor.network, branch)
    return predictor.predict_single_npy_array(image, props, None, None, True)[1]


def test_a_case_without_a_file_is_predicted_by_the_present_branch(models, tmp_path):
    env, raw = models["env"], models["raw"]
    inp = _input_copy(raw, tmp_path / "in", drop=["test_001_0001.nii.gz"])
    before = sorted(p.name for p in inp.iterdir())
    out = tmp_path / "out"
    p = _predict(env, inp, out, SMMS, "--save_probabilities", "-npp", "1", "-nps", "1")
    assert "test_001_0001.nii.gz" in p.stdout and "predicted by branch a (CoreMod)" in p.stdout
    report = json.loads((out / "missing_modalities.json").read_text())
    assert report["complete_cases"] == ["test_000"]
    assert report["incomplete_cases"]["test_001"]["missing_files"] == ["test_001_0001.nii.gz"]
    assert report["incomplete_cases"]["test_001"]["predicted_by"] == "branch a (CoreMod)"
    for case in ("test_000", "test_001"):
        assert _geometry(out / f"{case}.nii.gz") == _geometry(raw / "imagesTs" / f"{case}_0000.nii.gz")
    assert not [p.name for p in out.iterdir() if p.name.startswith(".smms_predict_")]  # temporary files removed
    assert sorted(p.name for p in inp.iterdir()) == before                             # input untouched
    # what predicted: branch a on the zero-filled channel, not the fused output
    probs = np.load(out / "test_001.npz")["probabilities"]
    present, like = raw / "imagesTs" / "test_001_0000.nii.gz", raw / "imagesTs" / "test_001_0001.nii.gz"
    prob_a = _branch_probabilities(models["folder"][SMMS], present, like, tmp_path, "a")
    prob_fused = _branch_probabilities(models["folder"][SMMS], present, like, tmp_path, "fused")
    # equal up to float32 summation order (the command and this process may run a different number of threads);
    # the fused output is much further away than that
    to_a, to_fused = np.abs(probs - prob_a), np.abs(probs - prob_fused)
    print(f"|probs - branch a|: mean {to_a.mean():.2e} max {to_a.max():.2e}; "
          f"|probs - fused|: mean {to_fused.mean():.2e} max {to_fused.max():.2e}")
    assert to_a.mean() < 1e-5 and to_a.max() < 5e-3
    assert to_fused.max() > 10 * to_a.max() and to_fused.mean() > 100 * to_a.mean()
    # the complete case: exactly nnUNetv2_predict's segmentation and probabilities
    ref = tmp_path / "ref"
    run(["nnUNetv2_predict", "-i", raw / "imagesTs", "-o", ref, "-d", DATASET_ID, "-c", "3d_fullres", "-f", "0",
         "-tr", SMMS, "-device", "cpu", "--disable_tta", "--save_probabilities", "-npp", "1", "-nps", "1"], env)
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "test_000.nii.gz"))),
                          sitk.GetArrayFromImage(sitk.ReadImage(str(ref / "test_000.nii.gz"))))
    assert np.array_equal(probs_000 := np.load(out / "test_000.npz")["probabilities"],
                          np.load(ref / "test_000.npz")["probabilities"]) and probs_000.size > 0


def test_a_plain_nnunet_model_predicts_with_the_channel_zero_filled(models, tmp_path):
    env, raw = models["env"], models["raw"]
    inp = _input_copy(raw, tmp_path / "in", drop=["test_001_0000.nii.gz"])
    out = tmp_path / "out"
    p = _predict(env, inp, out, PLAIN, "-npp", "0", "-nps", "0")
    assert "test_001_0000.nii.gz" in p.stdout and "no per-modality branches" in p.stdout
    assert "whole network" in p.stdout and "zero-filled" in p.stdout
    assert _geometry(out / "test_001.nii.gz") == _geometry(raw / "imagesTs" / "test_001_0001.nii.gz")
    assert (out / "test_000.nii.gz").is_file()


@pytest.mark.parametrize("extra", ["test_000_0002.nii.gz", "notes.nii.gz"])
def test_an_unknown_file_stops_before_anything_is_written(models, tmp_path, extra):
    inp = _input_copy(models["raw"], tmp_path / "in")
    shutil.copy(inp / "test_000_0000.nii.gz", inp / extra)
    out = tmp_path / "out"
    p = _predict(models["env"], inp, out, SMMS, expect_ok=False)
    assert p.returncode == 2 and extra in p.stderr and "not an image of this model's dataset" in p.stderr
    assert not out.exists() or not list(out.iterdir())


def test_a_failure_mid_way_leaves_no_temporary_or_partial_files(models, tmp_path):
    inp = _input_copy(models["raw"], tmp_path / "in", drop=["test_001_0001.nii.gz"])
    (inp / "test_000_0001.nii.gz").write_bytes(b"not an image")  # nnU-Net's reader fails on the complete case
    out = tmp_path / "out"
    p = _predict(models["env"], inp, out, SMMS, "-npp", "0", "-nps", "0", expect_ok=False)
    assert p.returncode != 0
    assert sorted(x.name for x in out.iterdir()) == []  # test_001's zero-filled input and work folder removed


def test_a_case_that_no_branch_can_predict_is_an_error_naming_it():
    dataset_json = {"file_ending": ".nii.gz", "channel_names": {"0": "T1", "1": "T1ce", "2": "T2"}}
    branches = {"a": [0, 1], "b": [2]}
    plans = plan_cases([Case("ok", {0: "x", 1: "y", 2: "z"}, 3), Case("t2only", {2: "z"}, 3)], dataset_json,
                       branches, ["ZScoreNormalization"] * 3)
    assert [p.branch for p in plans] == [None, "b"] and "branch b (T2)" in plans[1].note
    with pytest.raises(MissingModalityError, match=r"case broken: missing broken_0001.nii.gz, broken_0002.nii.gz"):
        plan_cases([Case("broken", {0: "x"}, 3)], dataset_json, branches)
    # a scheme for which zero is not the normalised mean is named in the log line
    plans = plan_cases([Case("c", {0: "x", 1: "y"}, 3)], dataset_json, branches, ["CTNormalization"] * 3)
    assert "CTNormalization" in plans[0].note


def test_nnunetv2_predict_on_a_case_without_a_file_names_the_command_that_can():
    """nnUNetv2_predict reads the files a case has: a missing modality reaches the network as a missing channel."""
    import torch
    from test_network import build
    net = build(dim=2, n_stages=3).eval()
    with pytest.raises(ValueError, match="nnunetv2_smms predict"):
        net(torch.zeros(1, 1, 8, 8))
