"""``nnunetv2_smms evaluate`` on trained model folders: the tiny SMMS model of conftest.py (branch a, branch b,
fused) next to a plain nnU-Net model folder (one output), predicted in-process and put in one table."""
import argparse
import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunetv2_smms.evaluation.evaluate import register


def run_cli(argv):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["evaluate"] + [str(a) for a in argv])
    return args.func(args)


def expected_branch_names(model_folder):
    """What the columns must be called: dataset.json channel names of plans' smms channels_a / channels_b."""
    configuration = model_folder.name.split("__")[2]
    plans = json.loads((model_folder / "plans.json").read_text(encoding="utf-8"))
    channel_names = json.loads((model_folder / "dataset.json").read_text(encoding="utf-8"))["channel_names"]
    smms = plans["configurations"][configuration]["smms"]
    return ["+".join(channel_names[str(c)] for c in smms[f"channels_{b}"]) for b in ("a", "b")]


def plain_model_folder(smms_folder, results_root):
    """A plain nnU-Net model folder (trainer nnUNetTrainer) on the same plans: nnU-Net's own network with its
    initial weights, saved the way nnUNetTrainer saves checkpoints (untrained: only its format matters)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    _, plans_name, configuration = smms_folder.name.split("__")
    folder = results_root / smms_folder.parent.name / f"nnUNetTrainer__{plans_name}__{configuration}"
    (folder / "fold_0").mkdir(parents=True)
    for name in ("plans.json", "dataset.json"):
        shutil.copy(smms_folder / name, folder / name)
    plans_manager = PlansManager(str(folder / "plans.json"))
    dataset_json = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    cm = plans_manager.get_configuration(configuration)
    network = nnUNetTrainer.build_network_architecture(
        plans_manager, cm, determine_num_input_channels(plans_manager, cm, dataset_json),
        plans_manager.get_label_manager(dataset_json).num_segmentation_heads, enable_deep_supervision=False)
    torch.save({"network_weights": network.state_dict(), "trainer_name": "nnUNetTrainer",
                "init_args": {"configuration": configuration, "fold": 0},
                "inference_allowed_mirroring_axes": (0, 1, 2)}, folder / "fold_0" / "checkpoint_final.pth")
    return folder


@pytest.fixture(scope="module")
def evaluated_models(trained_smms_model, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    for key, value in trained_smms_model["env"].items():
        mp.setenv(key, str(value))
    root = tmp_path_factory.mktemp("evaluate_models")
    smms = trained_smms_model["model_folder"]
    plain = plain_model_folder(smms, root / "results")
    out = root / "out"
    code = run_cli(["-m", f"SMMS={smms}", "-m", plain, "-i", trained_smms_model["images_ts"],
                    "-r", trained_smms_model["labels_ts"], "-o", out, "--device", "cpu", "-np", 1,
                    "--disable-tta", "--n-figure-cases", 1])
    yield {"code": code, "out": out, "smms": smms, **trained_smms_model}
    mp.undo()


def test_one_column_per_branch_and_one_for_the_plain_model(evaluated_models):
    assert evaluated_models["code"] == 0
    out = evaluated_models["out"]
    name_a, name_b = expected_branch_names(evaluated_models["smms"])
    results = json.loads((out / "summary.json").read_text(encoding="utf-8"))["results"]
    assert list(results["SMMS"]) == [name_a, name_b, "fused"]
    assert list(results["nnUNetTrainer"]) == ["fused"]
    table = (out / "table.md").read_text(encoding="utf-8")
    assert f"DSC (%) {name_a}" in table and f"ASD (mm) {name_b}" in table
    plain_row = [line for line in table.splitlines() if line.startswith("| nnUNetTrainer")][0]
    assert [c.strip() for c in plain_row.strip("|").split("|")][1:3] == ["-", "-"]
    assert (out / "figures" / "cases.png").stat().st_size > 10_000


def test_predictions_cover_every_case_with_the_reference_geometry(evaluated_models):
    out, labels_ts = evaluated_models["out"], evaluated_models["labels_ts"]
    name_a, name_b = expected_branch_names(evaluated_models["smms"])
    folders = [out / "predictions" / "SMMS" / o for o in (name_a, name_b, "fused")]
    folders.append(out / "predictions" / "nnUNetTrainer" / "fused")
    references = sorted(labels_ts.glob("*.nii.gz"))
    assert references
    for folder in folders:
        for ref_file in references:
            ref, pred = sitk.ReadImage(str(ref_file)), sitk.ReadImage(str(folder / ref_file.name))
            assert pred.GetSize() == ref.GetSize()
            assert np.allclose(pred.GetSpacing(), ref.GetSpacing()) and np.allclose(pred.GetOrigin(), ref.GetOrigin())


def test_each_column_holds_its_own_branch(evaluated_models):
    """Each written prediction equals nnU-Net's sequential prediction with that branch switched on."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunetv2_smms.architectures import set_output_branch

    out, images_ts = evaluated_models["out"], evaluated_models["images_ts"]
    case = sorted(evaluated_models["labels_ts"].glob("*.nii.gz"))[0].name[:-len(".nii.gz")]
    images = [str(p) for p in sorted(images_ts.glob(f"{case}_*.nii.gz"))]
    predictor = nnUNetPredictor(use_mirroring=False, perform_everything_on_device=False, device=torch.device("cpu"))
    predictor.initialize_from_trained_model_folder(str(evaluated_models["smms"]), None)
    for output, branch in zip(expected_branch_names(evaluated_models["smms"]) + ["fused"], ("a", "b", "fused")):
        set_output_branch(predictor.network, branch)
        expected = predictor.predict_from_files_sequential([images], None)[0]
        written = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "predictions" / "SMMS" / output / f"{case}.nii.gz")))
        np.testing.assert_array_equal(written, expected, err_msg=f"{output} (branch {branch})")
