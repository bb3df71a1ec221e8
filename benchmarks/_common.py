"""Shared helpers of the benchmark scripts: machine description, nnU-Net environments, the 4 mm BraTS dataset."""
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BRATS_DIR = REPO.parent / "shared" / "data" / "brats18"
RESULTS = REPO / "benchmarks" / "results"
BENCH_TRAINER_DIR = REPO / "benchmarks" / "ext_trainers"


def machine_info() -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    try:
        info["load_average_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    try:
        import torch
        import nnunetv2  # noqa: F401
        from importlib.metadata import version
        info["torch"] = torch.__version__
        info["nnunetv2"] = version("nnunetv2")
        info["cuda"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info["gpu"] = p.name
            info["gpu_memory_gb"] = round(p.total_memory / 2 ** 30, 1)
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return info


def nnunet_env(root: Path, **extra) -> dict:
    """Environment for nnU-Net subprocesses rooted at `root`: our trainers + the benchmark's plain short trainer."""
    from nnunetv2_smms.ext_trainer_dir import ext_trainer_env
    env = dict(os.environ)
    env.update(nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "preprocessed"),
               nnUNet_results=str(root / "results"),
               nnUNet_extTrainer=ext_trainer_env(str(BENCH_TRAINER_DIR)),
               nnUNet_compile="f", nnUNet_def_n_proc="1", PYTHONUNBUFFERED="1")
    env.setdefault("nnUNet_n_proc_DA", "2")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run(cmd, env, timeout=None) -> subprocess.CompletedProcess:
    p = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def smms_cli(*args):
    return [sys.executable, "-m", "nnunetv2_smms.cli", *args]


def stats(values) -> dict:
    values = list(values)
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values),
            "values": [round(v, 4) for v in values]}


def brats_cases():
    return sorted(p.name for p in BRATS_DIR.iterdir() if p.is_dir()) if BRATS_DIR.is_dir() else []


def _resample(img, spacing, is_label: bool):
    import SimpleITK as sitk
    size = [int(round(sz * sp / ns)) for sz, sp, ns in zip(img.GetSize(), img.GetSpacing(), spacing)]
    interp = sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear
    return sitk.Resample(img, size, sitk.Transform(), interp, img.GetOrigin(), spacing, img.GetDirection(), 0,
                         img.GetPixelID())


def write_brats_case(case: str, spacing, image_folder: Path, label_folder: Path = None, src: Path = None):
    """T1ce (channel 0) + T2 (channel 1) and the whole tumour (labels 1, 2, 4 -> 1), resampled to `spacing`.
    `src`: the case's folder (default: ../shared/data/brats18/<case>)."""
    import SimpleITK as sitk
    src = src or BRATS_DIR / case
    for c, mod in enumerate(("t1ce", "t2")):
        img = sitk.ReadImage(str(src / f"{case}_{mod}.nii.gz"))
        if spacing is not None:
            img = _resample(img, spacing, False)
        sitk.WriteImage(img, str(image_folder / f"{case}_{c:04d}.nii.gz"))
    if label_folder is not None:
        seg = sitk.ReadImage(str(src / f"{case}_seg.nii.gz"))
        whole = sitk.Cast(sitk.BinaryThreshold(seg, 1, 255, 1, 0), sitk.sitkUInt8)
        if spacing is not None:
            whole = _resample(whole, spacing, True)
        sitk.WriteImage(whole, str(label_folder / f"{case}.nii.gz"))


def prepare_brats(root: Path, dataset_id: int, spacing=(4.0, 4.0, 4.0), n_labeled=2, n_unlabeled=2,
                  name="BraTSBench") -> dict:
    """The 6 BraTS 2018 cases as one nnU-Net dataset: imagesTr = the labeled cases AND the 'unlabeled' cases with
    their labels (so that plain nnU-Net 'with all labels' uses the same plans), imagesUnlabeled = the images of
    the unlabeled cases, imagesTs/labelsTs = the rest. splits_final.json: fold 0 trains on the labeled cases
    only (validation: the unlabeled ones), fold 1 trains on labeled + unlabeled cases with labels. Planned with
    nnU-Net (3d_fullres), unlabeled cases preprocessed."""
    cases = brats_cases()
    if len(cases) < n_labeled + n_unlabeled + 1:
        raise RuntimeError(f"need {n_labeled + n_unlabeled + 1} BraTS cases in {BRATS_DIR}, found {len(cases)}")
    labeled, unlabeled, test = cases[:n_labeled], cases[n_labeled:n_labeled + n_unlabeled], \
        cases[n_labeled + n_unlabeled:]
    raw = root / "raw" / f"Dataset{dataset_id}_{name}"
    env = nnunet_env(root)
    done = root / f".prepared_{dataset_id}"
    info = {"root": root, "raw": raw, "env": env, "labeled": labeled, "unlabeled": unlabeled, "test": test,
            "dataset_id": dataset_id, "spacing": spacing}
    if done.is_file():
        return info
    for sub in ("imagesTr", "labelsTr", "imagesUnlabeled", "imagesTs", "labelsTs"):
        (raw / sub).mkdir(parents=True, exist_ok=True)
    for c in labeled + unlabeled:
        write_brats_case(c, spacing, raw / "imagesTr", raw / "labelsTr")
    for c in unlabeled:
        write_brats_case(c, spacing, raw / "imagesUnlabeled")
    for c in test:
        write_brats_case(c, spacing, raw / "imagesTs", raw / "labelsTs")
    (raw / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1ce", "1": "T2"}, "labels": {"background": 0, "whole_tumor": 1},
        "numTraining": len(labeled) + len(unlabeled), "file_ending": ".nii.gz"}))
    run(["nnUNetv2_plan_and_preprocess", "-d", dataset_id, "-c", "3d_fullres", "-np", "1"], env)
    (root / "preprocessed" / raw.name / "splits_final.json").write_text(json.dumps([
        {"train": labeled, "val": unlabeled}, {"train": labeled + unlabeled, "val": labeled}]))
    run(smms_cli("preprocess-unlabeled", "-d", dataset_id, "-c", "3d_fullres"), env)
    done.write_text("ok")
    return info


def write_result(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    print(f"written to {path}")
