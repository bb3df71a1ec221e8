"""Reliability (issue 6): a killed training resumes with --c, bad data and bad settings stop with a message that
names the case and file before training starts, non-finite losses are skipped and counted, seeded CPU runs
repeat, and malformed unlabeled images never crash preprocess-unlabeled without a message.

Everything runs the real commands (nnUNetv2_train, nnunetv2_smms preprocess-unlabeled) as subprocesses on
copies of the session's tiny prepared dataset (24^3, conftest.prepared_dataset)."""
import gzip
import json
import pickle
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import DATASET_ID, run, smms_cli

TESTS = Path(__file__).resolve().parent
TRAIN = ["nnUNetv2_train", DATASET_ID, "3d_fullres", "0", "-tr", "nnUNetTrainerSMMS", "-device", "cpu"]
SHORT = dict(nnUNet_smms_epochs="1", nnUNet_smms_iterations_per_epoch="2", nnUNet_smms_val_iterations="1")


def copy_env(prepared: dict, root: Path, subs=("raw", "preprocessed"), **extra) -> dict:
    """Copies of the prepared nnU-Net folders under root and an environment pointing at them (results empty)."""
    for sub in subs:
        shutil.copytree(Path(prepared["env"][f"nnUNet_{sub}"]), root / sub)
    env = dict(prepared["env"], nnUNet_results=str(root / "results"))
    env.update({f"nnUNet_{sub}": str(root / sub) for sub in subs})
    env.update({k: str(v) for k, v in extra.items()})
    return env


def model_folder(env: dict, name: str) -> Path:
    return Path(env["nnUNet_results"]) / name / "nnUNetTrainerSMMS__nnUNetPlans__3d_fullres"


def files_under(folder: Path) -> list:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


# ------------------------------------------------------------------------------------ 1. kill and resume

def _training_log(fold: Path) -> str:
    logs = sorted(fold.glob("training_log_*.txt"))
    return logs[-1].read_text() if logs else ""


def _epoch_started(log: str, epoch: int) -> bool:
    return f": Epoch {epoch} \n" in log  # print_to_log_file writes each argument followed by a space


def test_sigkill_mid_epoch_then_resume_with_c(prepared_dataset, tmp_path):
    env = dict(prepared_dataset["env"], nnUNet_results=str(tmp_path / "results"), nnUNet_smms_epochs="4",
               nnUNet_smms_iterations_per_epoch="3", nnUNet_smms_val_iterations="1")
    fold = model_folder(env, prepared_dataset["raw"].name) / "fold_0"
    latest = fold / "checkpoint_latest.pth"
    # own session: nnU-Net's augmentation workers are children; SIGKILL goes to the whole process group
    out = tmp_path / "train_killed.out"
    with open(out, "w") as stdout:
        proc = subprocess.Popen([str(c) for c in TRAIN], env=env, stdout=stdout, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (latest.is_file() and _epoch_started(_training_log(fold), 1)):
            assert proc.poll() is None, f"training ended before it could be killed:\n{out.read_text()[-3000:]}"
            assert time.time() < deadline, "epoch 1 did not start within 300 s"
            time.sleep(0.05)
        time.sleep(0.3)  # inside epoch 1 (3 iterations take longer than this on 2 cores)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_log = _training_log(fold)
    assert _epoch_started(killed_log, 1) and not _epoch_started(killed_log, 2), "not killed during epoch 1"
    assert not list(fold.glob("*.tmp")), "a half-written checkpoint was left behind"
    assert not (fold / "checkpoint_final.pth").exists()

    saved = load(latest)  # complete and loadable after SIGKILL
    assert saved["current_epoch"] == 1  # epoch 0 is kept: at most the running epoch is lost
    assert saved["optimizer_state"]["state"], "optimizer state (momentum) not in the checkpoint"
    assert any(k.startswith("branch_a.") for k in saved["network_weights"])
    assert any(k.startswith("branch_b.") for k in saved["network_weights"])
    assert "grad_scaler_state" in saved  # None on CPU (no AMP)
    for key in ("train_losses", "train_loss_sup_a", "train_loss_unsup", "mean_fg_dice_a", "skipped_steps"):
        assert len(saved["logging"][key]) == 1, key

    p = run(TRAIN + ["--c"], env, timeout=600)
    assert "Epoch 1\n" in p.stdout and "Epoch 0\n" not in p.stdout  # continues from the saved epoch
    final = load(fold / "checkpoint_final.pth")
    assert final["current_epoch"] == 4
    for key in ("train_losses", "train_loss_sup_a", "train_loss_sup_b", "train_loss_unsup", "mean_fg_dice",
                "mean_fg_dice_a", "mean_fg_dice_b", "skipped_steps", "lrs"):
        assert len(final["logging"][key]) == 4, key
        assert final["logging"][key][:1] == saved["logging"][key], key  # pre-kill history unchanged
    assert all(np.isfinite(final["logging"]["train_losses"]))
    # the weights continued from the checkpoint: 9 small SGD steps move the convolutions by a few percent;
    # a restart from a new random initialisation would differ by about sqrt(2) (independent He inits)
    conv = [k for k, v in saved["network_weights"].items() if v.ndim >= 4]
    diff = sum(float((final["network_weights"][k] - saved["network_weights"][k]).norm() ** 2) for k in conv) ** 0.5
    norm = sum(float(saved["network_weights"][k].norm() ** 2) for k in conv) ** 0.5
    assert diff / norm < 0.3, f"weights moved by {diff / norm:.2f} of their norm: not resumed from the checkpoint"
    assert not list(fold.glob("*.tmp")) and not latest.exists()  # nnU-Net removes latest after the final one


# ------------------------------------------------------------------ 2. bad data and settings: fail before training

def _assert_fails_before_training(env: dict, name: str, *texts, timeout=300):
    p = run(TRAIN, env, timeout=timeout, expect_ok=False)
    out = p.stdout + p.stderr
    assert p.returncode != 0, out[-3000:]
    for text in texts:
        assert text in out, f"{text!r} not in the output:\n{out[-3000:]}"
    assert "Epoch 0" not in p.stdout
    written = files_under(model_folder(env, name))
    assert all(f.startswith("fold_0/training_log_") for f in written), written  # nothing but the log
    return out


def test_one_channel_dataset_stops_at_start_up(prepared_dataset, tmp_path):
    env = copy_env(prepared_dataset, tmp_path, subs=("preprocessed",))
    name = prepared_dataset["raw"].name
    ds_file = tmp_path / "preprocessed" / name / "dataset.json"  # the copy nnUNetv2_train reads
    ds = json.loads(ds_file.read_text())
    ds["channel_names"] = {"0": "CoreMod"}
    ds.pop("smms", None)
    ds_file.write_text(json.dumps(ds))
    _assert_fails_before_training(env, name, "ChannelSplitError", "at least two input channels")


def test_channel_split_that_does_not_match_the_channels(prepared_dataset, tmp_path):
    # every wrong split is unit-tested in test_channel_split.py; here: the real command stops before training
    env = dict(prepared_dataset["env"], nnUNet_results=str(tmp_path / "results"), nnUNet_smms_channel_split="0|5")
    _assert_fails_before_training(env, prepared_dataset["raw"].name, "ChannelSplitError", "out of range")


def _unlabeled(root: Path, name: str) -> Path:
    return root / "raw" / name / "imagesUnlabeled"


def test_unlabeled_case_with_an_extra_channel(prepared_dataset, tmp_path):
    env = copy_env(prepared_dataset, tmp_path)
    name, unl = prepared_dataset["raw"].name, _unlabeled(tmp_path, prepared_dataset["raw"].name)
    shutil.copy(unl / "unl_003_0001.nii.gz", unl / "unl_003_0002.nii.gz")
    _assert_fails_before_training(env, name, "unlabeled case 'unl_003'", "unexpected unl_003_0002.nii.gz",
                                  "exactly the channels of imagesTr")


def test_unlabeled_file_with_the_wrong_ending(prepared_dataset, tmp_path):
    env = copy_env(prepared_dataset, tmp_path)
    name, unl = prepared_dataset["raw"].name, _unlabeled(tmp_path, prepared_dataset["raw"].name)
    sitk.WriteImage(sitk.ReadImage(str(unl / "unl_001_0000.nii.gz")), str(unl / "unl_001_0000.nrrd"))
    (unl / "unl_001_0000.nii.gz").unlink()
    _assert_fails_before_training(env, name, str(unl / "unl_001_0000.nrrd"), "file_ending")


def test_unlabeled_file_corrupted_after_preprocessing_is_stale_then_named(prepared_dataset, tmp_path):
    env = copy_env(prepared_dataset, tmp_path)
    name, unl = prepared_dataset["raw"].name, _unlabeled(tmp_path, prepared_dataset["raw"].name)
    broken = unl / "unl_004_0000.nii.gz"
    broken.write_bytes(broken.read_bytes()[:200])
    _assert_fails_before_training(env, name, "stale: the raw unlabeled images changed",
                                  f"Run: nnunetv2_smms preprocess-unlabeled -d {name} -c 3d_fullres")
    p = run(smms_cli("preprocess-unlabeled", "-d", DATASET_ID, "-c", "3d_fullres"), env, expect_ok=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "unlabeled case 'unl_004'" in p.stderr and str(broken) in p.stderr and "truncated or corrupt" in p.stderr


def test_unlabeled_preprocessing_made_with_other_plans(prepared_dataset, tmp_path):
    env = copy_env(prepared_dataset, tmp_path, subs=("preprocessed",))
    name = prepared_dataset["raw"].name
    plans_file = tmp_path / "preprocessed" / name / "nnUNetPlans.json"
    plans = json.loads(plans_file.read_text())
    plans["configurations"]["3d_fullres"]["normalization_schemes"] = ["NoNormalization", "NoNormalization"]
    plans_file.write_text(json.dumps(plans))  # as after re-planning: preprocessing changed, unlabeled folder not
    _assert_fails_before_training(env, name, "stale: it was made with other plans",
                                  f"Run: nnunetv2_smms preprocess-unlabeled -d {name} -c 3d_fullres")


def test_no_unlabeled_cases_names_the_fix(prepared_dataset, tmp_path):
    env = copy_env(prepared_dataset, tmp_path)
    name = prepared_dataset["raw"].name
    shutil.rmtree(_unlabeled(tmp_path, name))
    shutil.rmtree(tmp_path / "preprocessed" / name / "nnUNetPlans_3d_fullres_unlabeled")
    _assert_fails_before_training(env, name, f"No unlabeled cases for {name}", str(_unlabeled(tmp_path, name)),
                                  "nnUNetTrainerSMMS_MMF_MAE")
    p = run(smms_cli("preprocess-unlabeled", "-d", DATASET_ID, "-c", "3d_fullres"), env, expect_ok=False)
    assert p.returncode == 2 and "No unlabeled cases found" in p.stderr and "Traceback" not in p.stderr


def test_an_all_background_labeled_case_trains(prepared_dataset, tmp_path):
    """Legal in nnU-Net: the loader crops such a case at random (no foreground to oversample). SMMS trains on a
    fold whose only training case is empty, with finite losses and no skipped steps."""
    env = copy_env(prepared_dataset, tmp_path, nnUNet_n_proc_DA="0", **SHORT)
    name = prepared_dataset["raw"].name
    label = tmp_path / "raw" / name / "labelsTr" / "case_000.nii.gz"
    image = sitk.ReadImage(str(label))
    empty = sitk.GetImageFromArray(np.zeros_like(sitk.GetArrayFromImage(image)))
    empty.CopyInformation(image)
    sitk.WriteImage(empty, str(label), True)
    run(["nnUNetv2_preprocess", "-d", DATASET_ID, "-c", "3d_fullres", "-np", "1"], env)
    pre = tmp_path / "preprocessed" / name
    (pre / "splits_final.json").write_text(json.dumps([{"train": ["case_000"], "val": ["case_001"]}]))
    props = pickle.loads((pre / "nnUNetPlans_3d_fullres" / "case_000.pkl").read_bytes())
    assert all(len(v) == 0 for v in props["class_locations"].values())  # really empty after preprocessing

    run(TRAIN, env, timeout=600)
    final = load(model_folder(env, name) / "fold_0" / "checkpoint_final.pth")
    log = final["logging"]
    assert final["current_epoch"] == 1 and log["skipped_steps"] == [0]
    for key in ("train_losses", "train_loss_sup_a", "train_loss_sup_b", "train_loss_unsup"):
        assert np.isfinite(log[key][0]), key


# ------------------------------------------------------------------------------------- 3. numerical faults

def test_nonfinite_loss_is_skipped_counted_and_stops_the_run(prepared_dataset, tmp_path):
    env = dict(prepared_dataset["env"], nnUNet_results=str(tmp_path / "results"), nnUNet_n_proc_DA="0")
    p = run([sys.executable, TESTS / "_nonfinite_step_script.py", str(DATASET_ID)], env, timeout=300)
    lines = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, p.stdout[-3000:] + p.stderr[-3000:]
    r = json.loads(lines[-1][len("RESULT "):])

    assert r["nan_step"]["skipped"] == 1.0 and np.isnan(r["nan_step"]["loss"])
    assert r["nan_step_weights_unchanged"] and r["bad_in_a_row_after_nan"] == 1
    assert r["good_step"]["skipped"] == 0.0 and np.isfinite(r["good_step"]["loss"])
    assert r["good_step_weights_changed"] and r["bad_in_a_row_after_good"] == 0  # a good step resets the count
    assert r["inf_step"]["skipped"] == 1.0  # inf voxels: the same
    assert r["unlabeled_nan_step"]["skipped"] == 1.0 and np.isnan(r["unlabeled_nan_step"]["loss_unsup"])
    assert r["unlabeled_nan_weights_unchanged"]  # the labeled pass's gradients were dropped, not applied
    # the epoch's log: 2 of 3 steps skipped, the losses are the mean over the good step
    assert r["logged_skipped_steps"] == 2
    assert r["logged_train_loss"] == pytest.approx(r["good_step"]["loss"], rel=1e-5)
    assert r["logged_loss_sup_a"] == pytest.approx(r["good_step"]["loss_sup_a"], rel=1e-5)
    log = Path(r["log_file"]).read_text()
    assert log.count("non-finite loss") >= 2 and "step skipped (1 in a row)" in log

    assert r["default_max_consecutive_bad_steps"] == 25
    assert r["bad_steps_returned_before_stop"] == 2  # the 3rd bad step in a row stops the run
    assert r["weights_unchanged_by_bad_steps"]
    assert "3 consecutive training steps had a non-finite loss" in r["stop_error"]
    assert os.path.join(r["output_folder"], "checkpoint_latest.pth") in r["stop_error"]


# ------------------------------------------------------------------------------------- 4. reproducibility

def test_seeded_cpu_runs_give_the_same_losses(prepared_dataset, tmp_path):
    """The same seed samples the same batches and augmentations, so the losses agree to float32 summation order
    (rel 1e-4). Not bit for bit: MKL/OpenMP pick the number of threads from the machine's load, which reorders
    sums in the 6th-7th digit. A run with seeding broken samples other batches and differs by percents."""
    losses = []
    for i in range(2):
        env = dict(prepared_dataset["env"], nnUNet_results=str(tmp_path / f"results{i}"), nnUNet_n_proc_DA="0",
                   nnUNet_smms_seed="1234", nnUNet_smms_epochs="1", nnUNet_smms_iterations_per_epoch="3",
                   nnUNet_smms_val_iterations="1")
        run(TRAIN, env, timeout=600)
        log = load(model_folder(env, prepared_dataset["raw"].name) / "fold_0" / "checkpoint_final.pth")["logging"]
        losses.append({k: log[k] for k in ("train_losses", "train_loss_sup_a", "train_loss_sup_b",
                                           "train_loss_unsup", "val_losses")})
    assert all(np.isfinite(losses[0]["train_losses"]))
    assert losses[0].keys() == losses[1].keys()
    for key in losses[0]:
        assert len(losses[0][key]) == len(losses[1][key]) == 1, key
        assert float(losses[0][key][0]) == pytest.approx(float(losses[1][key][0]), rel=1e-4), key


# ---------------------------------------------------- 6. malformed unlabeled images: exit 2, a message, no output

def _write_like(reference: Path, path: Path, array=None, **geometry):
    ref = sitk.ReadImage(str(reference))
    img = sitk.GetImageFromArray(sitk.GetArrayFromImage(ref) if array is None else array, isVector=False)
    if img.GetDimension() == ref.GetDimension():
        img.SetSpacing(ref.GetSpacing())
        img.SetOrigin(ref.GetOrigin())
        img.SetDirection(ref.GetDirection())
    for key, value in geometry.items():
        getattr(img, "Set" + key)(value)
    path.unlink(missing_ok=True)
    sitk.WriteImage(img, str(path), True)


def _with_nan(a):
    a = a.copy()
    a[3, 4, 5] = np.nan
    return a


def _with_inf(a):
    a = a.copy()
    a[0, 0, :3] = -np.inf
    return a


MALFORMED = {
    # name: (how to break unl_002_0001.nii.gz, text the message must contain)
    "nan_voxels": (lambda f: _write_like(f, f, _with_nan(sitk.GetArrayFromImage(sitk.ReadImage(str(f))))),
                   "non-finite voxels (1 NaN, 0 inf"),
    "inf_voxels": (lambda f: _write_like(f, f, _with_inf(sitk.GetArrayFromImage(sitk.ReadImage(str(f))))),
                   "(0 NaN, 3 inf"),
    "4d_image": (lambda f: _write_like(f, f, np.stack([sitk.GetArrayFromImage(sitk.ReadImage(str(f)))] * 2)),
                 "is a 4D image"),
    "vector_image": (lambda f: sitk.WriteImage(sitk.Compose([sitk.ReadImage(str(f))] * 3), str(f), True),
                     "3 components per voxel"),
    "other_origin": (lambda f: _write_like(f, f, Origin=(7.0, 0.0, 0.0)), "do not share one voxel grid (origin"),
    "other_size": (lambda f: _write_like(f, f, sitk.GetArrayFromImage(sitk.ReadImage(str(f)))[:, :, :20]),
                   "do not share one voxel grid (size"),
    "garbage_header": (lambda f: f.write_bytes(b"this is not a NIfTI file" * 40), "truncated or corrupt"),
    "cut_in_data": (lambda f: f.write_bytes(gzip.compress(gzip.decompress(f.read_bytes())[:5000])),
                    "truncated or corrupt"),
}


@pytest.fixture(scope="module")
def unlabeled_copy(prepared_dataset, tmp_path_factory):
    """One copy of raw + preprocessed for all malformed-input cases (each restores the file it breaks)."""
    root = tmp_path_factory.mktemp("malformed")
    return {"env": copy_env(prepared_dataset, root), "root": root, "name": prepared_dataset["raw"].name}


@pytest.mark.parametrize("fault", list(MALFORMED))
def test_preprocess_unlabeled_rejects_malformed_images(unlabeled_copy, fault):
    root, name, env = unlabeled_copy["root"], unlabeled_copy["name"], unlabeled_copy["env"]
    target = root / "preprocessed" / name / "nnUNetPlans_3d_fullres_unlabeled"
    before = {f: (target / f).read_bytes() for f in files_under(target)}
    listing = sorted(os.listdir(target.parent))
    path = _unlabeled(root, name) / "unl_002_0001.nii.gz"
    good = path.read_bytes()
    try:
        MALFORMED[fault][0](path)
        p = run(smms_cli("preprocess-unlabeled", "-d", DATASET_ID, "-c", "3d_fullres"), env, expect_ok=False)
    finally:
        path.write_bytes(good)
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-3000:]
    message = p.stderr.strip().splitlines()[-1]  # after the progress bar
    assert message.startswith("error: ") and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert "unlabeled case 'unl_002'" in p.stderr and "unl_002_0001.nii.gz" in p.stderr, p.stderr
    assert MALFORMED[fault][1] in p.stderr, p.stderr
    # no partial output: the previous complete folder is untouched, no staging folder is left
    assert {f: (target / f).read_bytes() for f in files_under(target)} == before
    assert sorted(os.listdir(target.parent)) == listing


# ---------------------------------------------- 6. malformed converter input: exit 2, case and file named, nothing


def _array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _rewrite(path: Path, array: np.ndarray, is_vector=False):
    path.unlink()  # may be a symlink into the shared data: never write through it
    sitk.WriteImage(sitk.GetImageFromArray(array, isVector=is_vector), str(path), True)


def _rewrite_keeping_geometry(path: Path, array: np.ndarray):
    reference = sitk.ReadImage(str(path))
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    path.unlink()
    sitk.WriteImage(image, str(path), True)


CONVERTER_FAULTS = {
    # name: (how to break a source file, text the message must contain)
    "garbage_header": (lambda f: (f.unlink(), f.write_bytes(b"this is not a NIfTI file" * 40)), "cannot read"),
    "empty_file": (lambda f: (f.unlink(), f.write_bytes(b"")), "cannot read"),
    "cut_in_header": (lambda f: (lambda data: (f.unlink(), f.write_bytes(gzip.compress(data[:200]))))(
        gzip.decompress(f.read_bytes())), "cannot read"),
    "4d_image": (lambda f: _rewrite(f, np.stack([_array(f)] * 2)), "not a 3D single-channel image (dimension 4"),
    "2d_image": (lambda f: _rewrite(f, _array(f)[0]), "not a 3D single-channel image (dimension 2"),
    "vector_image": (lambda f: _rewrite(f, np.stack([_array(f)] * 3, -1), is_vector=True), "3 components"),
    "nan_voxels": (lambda f: _rewrite_keeping_geometry(f, _with_nan(_array(f).astype(np.float32))),
                   "non-finite voxels (1 NaN"),
}
# every fault on one file per converter; the other files get the first fault only (same code path per file)
CT_MR_CASES = [(fault, "mr.nii.gz") for fault in CONVERTER_FAULTS] + \
    [("garbage_header", "ct.nii.gz"), ("garbage_header", "label.nii.gz")]
BRATS_CASES = [(fault, "t2") for fault in CONVERTER_FAULTS] + [("garbage_header", "seg")]


@pytest.fixture(scope="module")
def phantom_source(tmp_path_factory):
    from _conversion_helpers import euler_transform, make_phantom_patient
    src = tmp_path_factory.mktemp("phantoms")
    for seed, case in enumerate(("P01", "P02")):
        make_phantom_patient(src / case, euler_transform((3, -2, 4), (2, -3, 1)), seed=seed)
    return src


@pytest.mark.parametrize("fault,file", CT_MR_CASES)
def test_convert_ct_mr_rejects_malformed_input(phantom_source, tmp_path, capsys, fault, file):
    from _conversion_helpers import assert_nothing_written, run_subcommand
    from nnunetv2_smms.dataset_conversion import ct_mr
    src = tmp_path / "src"
    shutil.copytree(phantom_source, src)
    broken = src / "P02" / file
    CONVERTER_FAULTS[fault][0](broken)
    argv = ["convert-ct-mr", str(src), "-d", "502", "-n", "Phantom", "--output-root", str(tmp_path / "out"),
            "--labeled", "1", "--val", "1", "--test", "0"]
    assert run_subcommand(ct_mr.register, argv) == 2
    err = capsys.readouterr().err
    # the error may follow a progress bar (voxel checks run while the staged cases are written)
    assert "\nerror: " in "\n" + err.replace("\r", "\n") and "Traceback" not in err, err
    assert "case P02" in err and str(broken) in err and CONVERTER_FAULTS[fault][1] in err, err
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("fault,modality", BRATS_CASES)
def test_convert_brats_rejects_malformed_input(tmp_path, capsys, fault, modality):
    from _conversion_helpers import BRATS18, BRATS18_MISSING, assert_nothing_written, brats_source, run_subcommand
    from nnunetv2_smms.dataset_conversion import brats
    if not BRATS18.is_dir():
        pytest.skip(BRATS18_MISSING)
    cases = sorted(p.name for p in BRATS18.iterdir())[:3]
    src = brats_source(tmp_path / "src", cases)
    broken = src / cases[1] / f"{cases[1]}_{modality}.nii.gz"
    CONVERTER_FAULTS[fault][0](broken)
    argv = ["convert-brats", str(src), "-d", "501", "-n", "BraTS18", "--output-root", str(tmp_path / "out"),
            "--labeled", "1", "--val", "1", "--test", "1"]
    assert run_subcommand(brats.register, argv) == 2
    err = capsys.readouterr().err
    # the error may follow a progress bar (voxel checks run while the staged cases are written)
    assert "\nerror: " in "\n" + err.replace("\r", "\n") and "Traceback" not in err, err
    assert f"case {cases[1]}" in err and str(broken) in err and CONVERTER_FAULTS[fault][1] in err, err
    assert_nothing_written(tmp_path / "out")


def test_preprocess_unlabeled_without_nnunet_folders_or_dataset_is_a_message(prepared_dataset):
    env = dict(prepared_dataset["env"])
    for unset, text in (("nnUNet_preprocessed", "nnUNet_preprocessed is not set"),
                        ("nnUNet_raw", "nnUNet_raw is not set")):
        p = run(smms_cli("preprocess-unlabeled", "-d", DATASET_ID, "-c", "3d_fullres"),
                {k: v for k, v in env.items() if k != unset}, expect_ok=False)
        assert p.returncode == 2 and "Traceback" not in p.stderr and text in p.stderr, p.stderr[-3000:]
    p = run(smms_cli("preprocess-unlabeled", "-d", "977", "-c", "3d_fullres"), env, expect_ok=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr and "977" in p.stderr, p.stderr[-3000:]
