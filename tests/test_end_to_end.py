"""The user's pipeline through nnU-Net's own commands (subprocesses): plan + preprocess, preprocess-unlabeled,
nnUNetv2_train -tr nnUNetTrainerSMMS (CPU), resume with --c, --val, nnUNetv2_predict with TTA,
nnUNetv2_evaluate_folder."""
import json
import shutil
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from conftest import DATASET_ID, TRAIN_EPOCHS, run

TRAIN = ["nnUNetv2_train", DATASET_ID, "3d_fullres", "0", "-tr", "nnUNetTrainerSMMS", "-device", "cpu"]


def _checkpoint(folder: Path, name="checkpoint_final.pth") -> dict:
    return torch.load(folder / "fold_0" / name, map_location="cpu", weights_only=False)


def test_training_writes_an_smms_model(trained_smms_model):
    model = trained_smms_model["model_folder"]
    ckpt = _checkpoint(model)
    assert ckpt["trainer_name"] == "nnUNetTrainerSMMS" and ckpt["current_epoch"] == TRAIN_EPOCHS
    assert any(k.startswith("branch_a.") for k in ckpt["network_weights"])
    assert any(k.startswith("mmf.") for k in ckpt["network_weights"])
    log = ckpt["logging"]
    for key in ("train_loss_sup_a", "train_loss_sup_b", "train_loss_unsup", "mean_fg_dice_a", "mean_fg_dice_b"):
        assert len(log[key]) == TRAIN_EPOCHS and all(np.isfinite(v) for v in log[key]), key
    assert log["train_loss_unsup"][0] > 0  # the unlabeled part really entered the loss
    plans = json.loads((model / "plans.json").read_text())
    assert plans["configurations"]["3d_fullres"]["smms"]["channels_a"] == [0]
    preprocessed_plans = Path(trained_smms_model["env"]["nnUNet_preprocessed"]) / model.parent.name / "nnUNetPlans.json"
    assert "smms" not in json.loads(preprocessed_plans.read_text())["configurations"]["3d_fullres"]
    assert (model / "fold_0" / "progress.png").stat().st_size > 10_000
    assert (model / "fold_0" / "validation" / "summary.json").is_file()
    assert "unlabeled cases from" in trained_smms_model["train_stdout"]


def test_resume_with_c_continues_and_val_reruns(trained_smms_model, tmp_path):
    src = trained_smms_model["root"]
    shutil.copytree(src / "results", tmp_path / "results")
    env = dict(trained_smms_model["env"], nnUNet_results=str(tmp_path / "results"),
               nnUNet_smms_epochs=str(TRAIN_EPOCHS + 1))
    model = tmp_path / "results" / trained_smms_model["model_folder"].parent.name / trained_smms_model["model_folder"].name
    before = _checkpoint(model)["logging"]
    p = run(TRAIN + ["--c"], env)
    assert f"Epoch {TRAIN_EPOCHS}" in p.stdout and "Epoch 0\n" not in p.stdout
    after = _checkpoint(model)
    assert after["current_epoch"] == TRAIN_EPOCHS + 1
    for key in ("train_losses", "train_loss_sup_a", "mean_fg_dice_b"):
        assert len(after["logging"][key]) == TRAIN_EPOCHS + 1
        assert after["logging"][key][:TRAIN_EPOCHS] == before[key]  # history kept, not restarted
    assert not list(model.glob("fold_0/*.tmp"))

    (model / "fold_0" / "validation" / "summary.json").unlink()
    p = run(TRAIN + ["--val"], env)
    summary = json.loads((model / "fold_0" / "validation" / "summary.json").read_text())
    assert 0.0 <= summary["foreground_mean"]["Dice"] <= 1.0


def test_resume_and_val_with_other_settings_stop_and_change_nothing(trained_smms_model, tmp_path):
    """A model trained with split 0|1 must not be resumed or re-validated as 1|0 (it would load silently: the
    shapes match), nor with another unlabeled batch: an error naming both values, the model folder untouched."""
    shutil.copytree(trained_smms_model["root"] / "results", tmp_path / "results")
    model = tmp_path / "results" / trained_smms_model["model_folder"].parent.name / trained_smms_model["model_folder"].name
    files = {p: p.read_bytes() for p in model.rglob("*") if p.is_file()}
    for extra, flag, message in ((dict(nnUNet_smms_channel_split="1|0"), "--c",
                                  "smms.channels_a: trained with [0], this call asks for [1]"),
                                 (dict(nnUNet_smms_channel_split="1|0"), "--val", "smms.channels_b: trained with [1]"),
                                 (dict(nnUNet_smms_unlabeled_batch_size="1"), "--c",
                                  "semi_supervised.unlabeled_batch_size: trained with 2, this call asks for 1")):
        env = dict(trained_smms_model["env"], nnUNet_results=str(tmp_path / "results"), **extra)
        p = run(TRAIN + [flag], env, expect_ok=False)
        assert p.returncode != 0 and message in p.stdout + p.stderr, (p.stdout + p.stderr)[-3000:]
        for f, content in files.items():
            assert f.read_bytes() == content, f"{f} was changed"
        assert not [f for f in model.rglob("*") if f.is_file() and f not in files
                    and not f.name.startswith("training_log")]


def test_predict_with_tta_keeps_geometry_and_evaluates(trained_smms_model, tmp_path):
    env, model = trained_smms_model["env"], trained_smms_model["model_folder"]
    out = tmp_path / "pred"
    run(["nnUNetv2_predict", "-i", trained_smms_model["images_ts"], "-o", out, "-d", DATASET_ID, "-c", "3d_fullres",
         "-f", "0", "-tr", "nnUNetTrainerSMMS", "-device", "cpu", "-npp", "1", "-nps", "1"], env)
    cases = sorted(p.name for p in trained_smms_model["labels_ts"].glob("*.nii.gz"))
    assert sorted(p.name for p in out.glob("*.nii.gz")) == cases
    for case in cases:
        pred = sitk.ReadImage(str(out / case))
        ref = sitk.ReadImage(str(trained_smms_model["images_ts"] / case.replace(".nii.gz", "_0000.nii.gz")))
        assert pred.GetSize() == ref.GetSize()
        assert np.allclose(pred.GetSpacing(), ref.GetSpacing()) and np.allclose(pred.GetOrigin(), ref.GetOrigin())
        assert np.allclose(pred.GetDirection(), ref.GetDirection())
        assert set(np.unique(sitk.GetArrayFromImage(pred))) <= {0, 1}
    run(["nnUNetv2_evaluate_folder", trained_smms_model["labels_ts"], out, "-djfile", model / "dataset.json",
         "-pfile", model / "plans.json"], env)
    assert 0.0 <= json.loads((out / "summary.json").read_text())["foreground_mean"]["Dice"] <= 1.0


def test_predict_single_branch_via_environment(trained_smms_model, tmp_path):
    env = trained_smms_model["env"]
    probs = {}
    for branch in ("fused", "a", "b"):
        out = tmp_path / branch
        run(["nnUNetv2_predict", "-i", trained_smms_model["images_ts"], "-o", out, "-d", DATASET_ID, "-c",
             "3d_fullres", "-f", "0", "-tr", "nnUNetTrainerSMMS", "-device", "cpu", "--disable_tta",
             "--save_probabilities", "-npp", "1", "-nps", "1"], dict(env, nnUNet_smms_output_branch=branch))
        probs[branch] = np.load(sorted(out.glob("*.npz"))[0])["probabilities"]
    assert not np.allclose(probs["a"], probs["b"])
    assert not np.allclose(probs["fused"], probs["a"]) and not np.allclose(probs["fused"], probs["b"])


def test_training_without_preprocessed_unlabeled_data_stops_with_the_command(prepared_dataset, tmp_path):
    for sub in ("raw", "preprocessed"):
        shutil.copytree(Path(prepared_dataset["env"][f"nnUNet_{sub}"]), tmp_path / sub)
    name = prepared_dataset["raw"].name
    shutil.rmtree(tmp_path / "preprocessed" / name / "nnUNetPlans_3d_fullres_unlabeled")
    env = dict(prepared_dataset["env"], nnUNet_raw=str(tmp_path / "raw"),
               nnUNet_preprocessed=str(tmp_path / "preprocessed"), nnUNet_results=str(tmp_path / "results"))
    p = run(TRAIN, env, expect_ok=False)
    assert p.returncode != 0
    assert f"Run: nnunetv2_smms preprocess-unlabeled -d {name} -c 3d_fullres" in p.stderr


def test_light_mmf_trainer_records_its_kernel_and_the_predictor_rebuilds_it(prepared_dataset, monkeypatch, tmp_path):
    """nnUNetTrainerSMMS_LightMMF (found through nnUNet_extTrainer) builds pointwise MMF convolutions and records
    that in the plans, from which nnU-Net's predictor rebuilds the network (same parameters, same shapes)."""
    from nnunetv2.run.run_training import get_trainer_from_args
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_extTrainer"):
        monkeypatch.setenv(k, prepared_dataset["env"][k])
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    trainer = get_trainer_from_args(str(DATASET_ID), "3d_fullres", 0, "nnUNetTrainerSMMS_LightMMF",
                                    device=torch.device("cpu"))
    trainer.initialize()
    kernels = {m.kernel_size for n, m in trainer.network.named_modules()
               if n.startswith("mmf.") and isinstance(m, torch.nn.Conv3d)}
    assert kernels == {(1, 1, 1)}
    plans = json.loads(json.dumps(trainer.plans_manager.plans))  # what on_train_start writes to plans.json
    assert plans["configurations"]["3d_fullres"]["smms"]["mmf_kernel_size"] == 1
    cm = PlansManager(plans).get_configuration("3d_fullres")
    rebuilt = type(trainer).build_network_architecture(None, cm, trainer.num_input_channels,
                                                       trainer.label_manager.num_segmentation_heads, False)
    rebuilt.load_state_dict(trainer.network.state_dict())  # strict: same names and shapes
