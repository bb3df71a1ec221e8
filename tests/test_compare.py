"""`nnunetv2_smms compare` on the prepared synthetic dataset with every comparison trainer of the plugin (the
end-to-end smoke test of each: trained through nnUNetv2_train, predicted through nnU-Net's predictor, evaluated;
the trainers with a wrapper network also through nnUNetv2_predict): one table with every row and the per-branch
columns of the multi-modal ones; run again, nothing is retrained or re-predicted; an interrupted run resumes with
--c; a schedule that differs from a finished run's, or a trainer that ignores the schedule, is refused."""
import json
import os
import shutil

import pytest

from conftest import DATASET_ID, run, smms_cli

from nnunetv2_smms.trainers import TABLE1_TRAINERS  # noqa: E402

# SMMS itself has its own end-to-end tests (test_end_to_end.py); here a cheaper two-branch variant stands in for it
TRAINERS = tuple(t.__name__ for t in TABLE1_TRAINERS if t.__name__ != "nnUNetTrainerSMMS") + (
    "nnUNetTrainerSMMS_MMF_MAE",)
WRAPPER_NETWORKS = ("nnUNetTrainerMeanTeacher", "nnUNetTrainerCPS", "nnUNetTrainerCMC")
SCHEDULE = ("--epochs", "1", "--iterations-per-epoch", "2", "--val-iterations", "1")


def compare_cmd(raw, out, *extra, trainers=TRAINERS, schedule=SCHEDULE):
    return smms_cli("compare", "-d", DATASET_ID, "-c", "3d_fullres", "-f", "0", "-tr", *trainers,
                    "-i", raw / "imagesTs", "-r", raw / "labelsTs", "-o", out, *schedule, "--device", "cpu",
                    "--disable-tta", *extra)


def fold_folder(results, raw, trainer):
    return results / raw.name / f"{trainer}__nnUNetPlans__3d_fullres" / "fold_0"


@pytest.fixture(scope="module")
def compared(prepared_dataset, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    # augmentation in the training process (the worker path is covered by test_end_to_end and test_reliability)
    env = dict(prepared_dataset["env"], nnUNet_results=str(tmp / "results"), nnUNet_n_proc_DA="0")
    out = tmp / "out"
    first = run(compare_cmd(prepared_dataset["raw"], out), env)
    return {"env": env, "out": out, "results": tmp / "results", "raw": prepared_dataset["raw"], "first": first}


def test_one_table_with_every_trainer_and_its_outputs(compared):
    out, raw = compared["out"], compared["raw"]
    table = (out / "table.md").read_text(encoding="utf-8")
    rows = [line for line in table.splitlines() if line.startswith("| nnUNetTrainer")]
    assert [r.split("|")[1].strip() for r in rows] == list(TRAINERS)
    header = next(line for line in table.splitlines() if line.startswith("| Method"))
    # the two-branch models have a column per branch (named after the modalities) and the fused one
    for column in ("DSC (%) fused", "ASD (mm) fused", "DSC (%) CoreMod", "DSC (%) RimMod"):
        assert column in header, (column, header)
    plain = rows[0].split("|")
    assert sum(c.strip() == "-" for c in plain) >= 2, "plain nnU-Net has no branches"
    two_branch = rows[-1].split("|")
    assert sum(c.strip() == "-" for c in two_branch) == 0, "the two-branch model has every column"
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert set(summary["results"]) == set(TRAINERS)
    assert summary["settings"]["schedule"] == {"epochs": 1, "iterations_per_epoch": 2, "val_iterations": 1}
    n_test = len(os.listdir(raw / "labelsTs"))
    fused = summary["results"]["nnUNetTrainerSMMS_MMF_MAE"]["fused"]["1"]
    assert fused["n_cases"] == n_test and 0.0 <= fused["dice"]["mean"] <= 1.0
    for t in TRAINERS:
        assert (out / "logs" / f"{t}.log").is_file()
        assert (fold_folder(compared["results"], raw, t) / "checkpoint_final.pth").is_file()
    assert (out / "figures" / "dice_boxplot.png").stat().st_size > 0
    assert "training runs" in compared["first"].stdout


@pytest.mark.parametrize("trainer", WRAPPER_NETWORKS)
def test_nnunetv2_predict_loads_the_wrapper_network(compared, trainer, tmp_path):
    """nnUNetv2_predict itself (not only the predictor compare uses) on a model whose network holds more than one
    model: the output has the geometry of the image."""
    import SimpleITK as sitk
    raw = compared["raw"]
    run(["nnUNetv2_predict", "-i", raw / "imagesTs", "-o", tmp_path, "-d", DATASET_ID, "-c", "3d_fullres", "-f", "0",
         "-tr", trainer, "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"], compared["env"])
    for label in sorted((raw / "labelsTs").iterdir()):
        pred, ref = sitk.ReadImage(str(tmp_path / label.name)), sitk.ReadImage(str(label))
        assert pred.GetSize() == ref.GetSize() and pred.GetSpacing() == ref.GetSpacing()
        assert pred.GetOrigin() == ref.GetOrigin() and pred.GetDirection() == ref.GetDirection()


def test_run_again_retrains_and_repredicts_nothing(compared):
    out, raw, results = compared["out"], compared["raw"], compared["results"]
    checkpoints = {t: (fold_folder(results, raw, t) / "checkpoint_final.pth").stat().st_mtime_ns for t in TRAINERS}
    predictions = {p: p.stat().st_mtime_ns for p in (out / "predictions").rglob("*.nii.gz")}
    table = (out / "table.md").read_text(encoding="utf-8")
    again = run(compare_cmd(raw, out), compared["env"])
    for t in TRAINERS:
        assert f"{t}: trained" in again.stdout and f"{t}: predictions up to date" in again.stdout
        assert (fold_folder(results, raw, t) / "checkpoint_final.pth").stat().st_mtime_ns == checkpoints[t]
    assert {p: p.stat().st_mtime_ns for p in (out / "predictions").rglob("*.nii.gz")} == predictions
    assert (out / "table.md").read_text(encoding="utf-8") == table


def test_an_interrupted_run_resumes_with_continue_and_is_predicted_again(compared):
    out, raw, results = compared["out"], compared["raw"], compared["results"]
    trainer = TRAINERS[0]
    fold = fold_folder(results, raw, trainer)
    # an interrupted run: only checkpoint_latest.pth (here: the finished state, so --c trains no more epochs)
    shutil.move(fold / "checkpoint_final.pth", fold / "checkpoint_latest.pth")
    again = run(compare_cmd(raw, out), compared["env"])
    assert f"resuming {trainer}" in again.stdout
    assert "--c" in (out / "logs" / f"{trainer}.log").read_text(encoding="utf-8")
    assert (fold / "checkpoint_final.pth").is_file()
    assert f"{trainer}: predictions up to date" not in again.stdout  # a new checkpoint: predicted again
    assert f"{TRAINERS[1]}: predictions up to date" in again.stdout


def test_another_schedule_than_a_finished_run_is_refused(compared):
    p = run(compare_cmd(compared["raw"], compared["out"], schedule=("--epochs", "3")), compared["env"],
            expect_ok=False)
    assert p.returncode == 2
    assert "another schedule" in p.stderr and "--epochs 3 requested, the run has 1" in p.stderr


def test_a_trainer_that_ignores_the_schedule_is_refused(compared, tmp_path):
    p = run(compare_cmd(compared["raw"], tmp_path, trainers=("nnUNetTrainer",)), compared["env"], expect_ok=False)
    assert p.returncode == 2 and "nnUNetTrainerLabeledOnly" in p.stderr
    p = run(compare_cmd(compared["raw"], tmp_path, trainers=("nnUNetTrainerNoSuchThing",)), compared["env"],
            expect_ok=False)
    assert p.returncode == 2 and "nnUNetTrainerNoSuchThing not found" in p.stderr


def test_finished_only_leaves_the_unfinished_runs_out(compared, tmp_path):
    # nnUNetTrainerSMMS has no run under this nnUNet_results (its cheaper variant stands in for it above)
    folder = fold_folder(compared["results"], compared["raw"], "nnUNetTrainerSMMS")
    p = run(compare_cmd(compared["raw"], tmp_path, "--finished-only", trainers=(TRAINERS[0], "nnUNetTrainerSMMS")),
            compared["env"])
    assert "left out (not finished): nnUNetTrainerSMMS" in p.stdout
    assert not folder.parent.exists(), "--finished-only trains nothing"
    rows = [line.split("|")[1].strip() for line in (tmp_path / "table.md").read_text(encoding="utf-8").splitlines()
            if line.startswith("| nnUNetTrainer")]
    assert rows == [TRAINERS[0]]
    summary = json.loads((tmp_path / "summary.json").read_text(encoding="utf-8"))
    assert set(summary["results"]) == {TRAINERS[0]} and summary["settings"]["trainers"] == [TRAINERS[0]]
    p = run(compare_cmd(compared["raw"], tmp_path / "none", "--finished-only", trainers=("nnUNetTrainerSMMS",)),
            compared["env"], expect_ok=False)
    assert p.returncode == 2 and "none of nnUNetTrainerSMMS has finished" in p.stderr
    p = run(compare_cmd(compared["raw"], tmp_path / "none", "--evaluate-only", trainers=("nnUNetTrainerSMMS",)),
            compared["env"], expect_ok=False)
    assert p.returncode == 2 and "--finished-only to leave them out" in p.stderr
