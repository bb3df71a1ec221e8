"""`nnunetv2_smms demo`: the whole SMMS pipeline on a small synthetic dataset (or on your own raw dataset),
through nnU-Net's own commands, in a work folder it names. No environment variables needed.

Steps: generate data -> nnUNetv2_plan_and_preprocess -> nnunetv2_smms preprocess-unlabeled ->
nnUNetv2_train -tr nnUNetTrainerSMMS -> nnUNetv2_predict (fused, branch a, branch b) -> Dice per test case.
"""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

DEMO_ID = 501
DEMO_NAME = "SMMSDemo"


def _step(i: int, n: int, text: str) -> None:
    print(f"\n=== [{i}/{n}] {text}", flush=True)


def _run(cmd, env) -> None:
    print("$ " + " ".join(str(c) for c in cmd), flush=True)
    t = time.time()
    p = subprocess.run([str(c) for c in cmd], env=env)
    if p.returncode != 0:
        raise SystemExit(f"error: {' '.join(map(str, cmd))} failed with exit code {p.returncode} (see above)")
    print(f"    done in {time.time() - t:.0f} s", flush=True)


def dice_table(pred_dirs: dict, labels_dir: Path):
    """{column: {case: dice}} for the foreground (label > 0) of each prediction folder."""
    import SimpleITK as sitk
    table = {}
    for col, d in pred_dirs.items():
        table[col] = {}
        for ref_file in sorted(labels_dir.iterdir()):
            if ref_file.name.startswith("."):
                continue
            ref = sitk.GetArrayFromImage(sitk.ReadImage(str(ref_file))) > 0
            pred = sitk.GetArrayFromImage(sitk.ReadImage(str(Path(d) / ref_file.name))) > 0
            denom = ref.sum() + pred.sum()
            table[col][ref_file.name.split(".")[0]] = float(2 * (ref & pred).sum() / denom) if denom else 1.0
    return table


def print_table(table: dict) -> None:
    import numpy as np
    cols = list(table)
    cases = list(next(iter(table.values())))
    width = max(12, *(len(c) + 2 for c in cols))
    print("case".ljust(14) + "".join(c.rjust(width) for c in cols))
    for case in cases:
        print(case.ljust(14) + "".join(f"{table[c][case]:.3f}".rjust(width) for c in cols))
    print("mean".ljust(14) + "".join(f"{np.mean(list(table[c].values())):.3f}".rjust(width) for c in cols))


def run_demo(workdir: Path, raw_dataset: Path = None, epochs: int = 5, iterations: int = 10, device: str = None,
             overwrite: bool = False) -> dict:
    import json
    import torch
    from nnunetv2_smms.architectures.config import branch_channel_names, resolve_channel_split
    from nnunetv2_smms.dataset_conversion.synthetic import make_synthetic_dataset
    from nnunetv2_smms.ext_trainer_dir import ext_trainer_env

    workdir = workdir.resolve()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    n = 5
    if overwrite and workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if raw_dataset is None:
        raw_root = workdir / "nnUNet_raw"
        _step(1, n, f"Generating the synthetic two-modality dataset in {raw_root}")
        target = raw_root / f"Dataset{DEMO_ID:03d}_{DEMO_NAME}"
        if not target.exists():
            make_synthetic_dataset(raw_root, DEMO_ID, DEMO_NAME, n_labeled=6, n_unlabeled=12, n_test=4,
                                   shape=(32, 32, 32))
        raw_dataset = target
    else:
        raw_dataset = raw_dataset.resolve()
        raw_root = raw_dataset.parent
        _step(1, n, f"Using the raw dataset {raw_dataset}")
    name = raw_dataset.name
    if not name.startswith("Dataset") or not name[7:10].isdigit():
        raise SystemExit(f"error: {raw_dataset} is not an nnU-Net raw dataset folder (DatasetXXX_Name)")
    dataset_id = int(name[7:10])

    env = dict(os.environ, nnUNet_raw=str(raw_root), nnUNet_preprocessed=str(workdir / "nnUNet_preprocessed"),
               nnUNet_results=str(workdir / "nnUNet_results"), nnUNet_extTrainer=ext_trainer_env(),
               nnUNet_def_n_proc=os.environ.get("nnUNet_def_n_proc", "1"),
               nnUNet_smms_epochs=str(epochs), nnUNet_smms_iterations_per_epoch=str(iterations),
               nnUNet_smms_val_iterations=str(max(1, iterations // 4)))
    if device == "cpu":
        env.setdefault("nnUNet_compile", "f")
        env.setdefault("nnUNet_n_proc_DA", "1")
    smms = [sys.executable, "-m", "nnunetv2_smms.cli"]

    _step(2, n, "Planning and preprocessing the labeled cases (nnU-Net), then the unlabeled ones")
    _run(["nnUNetv2_plan_and_preprocess", "-d", dataset_id, "-c", "3d_fullres", "-np", "1",
          "--verify_dataset_integrity"], env)
    _run(smms + ["preprocess-unlabeled", "-d", dataset_id, "-c", "3d_fullres"], env)

    _step(3, n, f"Training nnUNetTrainerSMMS on {device} ({epochs} epochs x {iterations} iterations)")
    model = workdir / "nnUNet_results" / name / "nnUNetTrainerSMMS__nnUNetPlans__3d_fullres"
    if (model / "fold_0" / "checkpoint_final.pth").is_file():
        print(f"    a trained model is already in {model} (use --overwrite to retrain)")
    else:
        _run(["nnUNetv2_train", dataset_id, "3d_fullres", "0", "-tr", "nnUNetTrainerSMMS", "-device", device], env)

    images_ts, labels_ts = raw_dataset / "imagesTs", raw_dataset / "labelsTs"
    if not images_ts.is_dir():
        print(f"\nNo imagesTs in {raw_dataset}: nothing to predict. Model: {model}")
        return {"model": model}
    ds_json = json.loads((raw_dataset / "dataset.json").read_text())
    ch_a, ch_b = resolve_channel_split(ds_json)
    columns = {f"branch a ({branch_channel_names(ds_json, ch_a)})": "a",
               f"branch b ({branch_channel_names(ds_json, ch_b)})": "b", "fused": "fused"}
    _step(4, n, "Predicting the test cases with nnUNetv2_predict (with TTA): fused, branch a, branch b")
    pred_dirs = {}
    for col, branch in columns.items():
        out = workdir / "predictions" / branch
        _run(["nnUNetv2_predict", "-i", images_ts, "-o", out, "-d", dataset_id, "-c", "3d_fullres", "-f", "0",
              "-tr", "nnUNetTrainerSMMS", "-device", device, "-npp", "1", "-nps", "1"],
             dict(env, nnUNet_smms_output_branch=branch))
        pred_dirs[col] = out
    result = {"model": model, "predictions": pred_dirs}
    if labels_ts.is_dir():
        _step(5, n, f"Dice (foreground) on the {len(list(labels_ts.glob('*')))} test cases")
        result["dice"] = dice_table(pred_dirs, labels_ts)
        print_table(result["dice"])
    print(f"\nModel folder:  {model}  (training curves per branch: {model / 'fold_0' / 'progress.png'})")
    print(f"Predictions:   {workdir / 'predictions'}/{{fused,a,b}}")
    print(f"To use the model yourself: export nnUNet_results={workdir / 'nnUNet_results'} "
          f"nnUNet_extTrainer=$(nnunetv2_smms trainer-dir)")
    return result


def _cli(args) -> int:
    run_demo(Path(args.workdir), Path(args.dataset) if args.dataset else None, args.epochs, args.iterations,
             args.device, args.overwrite)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="run the whole SMMS pipeline on a small synthetic dataset (CPU-sized, a few minutes)",
        description="Generate a synthetic two-modality dataset (labeled, unlabeled and test cases), run "
                    "nnU-Net planning/preprocessing, preprocess-unlabeled, train nnUNetTrainerSMMS, predict the "
                    "test cases per branch and fused, and print Dice. Needs no environment variables.")
    p.add_argument("--workdir", default="smms_demo", help="work folder (default: ./smms_demo)")
    p.add_argument("--dataset", help="an nnU-Net raw dataset folder (DatasetXXX_Name with imagesTr, labelsTr, "
                                     "imagesUnlabeled, optionally imagesTs/labelsTs) to use instead of the "
                                     "synthetic one")
    p.add_argument("--epochs", type=int, default=5, help="training epochs (default: 5)")
    p.add_argument("--iterations", type=int, default=10, help="iterations per epoch (default: 10)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
    p.add_argument("--overwrite", action="store_true", help="delete the work folder first")
    p.set_defaults(func=_cli)
