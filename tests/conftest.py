"""Shared fixtures: nnU-Net environments in temporary folders and ONE tiny SMMS model trained through the real
nnU-Net commands, reused by every test that needs a trained model."""
import os
import subprocess
import sys
from pathlib import Path

# Two pytest workers on two cores, each starting nnU-Net processes that run torch with one thread per core: idle
# OpenMP threads that spin (libgomp's default) steal the other worker's core. Sleeping instead made two concurrent
# tiny SMMS trainings take 51 s instead of 72 s each. Set before torch is imported; reaches every subprocess.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402

from nnunetv2_smms.ext_trainer_dir import ext_trainer_env  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BRATS_DIR = REPO.parent / "shared" / "data" / "brats18"
DATASET_ID = 501
TRAIN_EPOCHS = 2


def nnunet_env(root: Path, **extra) -> dict:
    """Environment for nnU-Net subprocesses rooted at `root` (CPU-friendly settings, our trainers visible)."""
    env = dict(os.environ)
    env.update(
        nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "preprocessed"),
        nnUNet_results=str(root / "results"), nnUNet_extTrainer=ext_trainer_env(""),
        nnUNet_compile="f", nnUNet_n_proc_DA="1", nnUNet_def_n_proc="1", PYTHONUNBUFFERED="1", PYTHONUTF8="1", PYTHONIOENCODING="utf-8")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run(cmd, env, timeout=1200, expect_ok=True) -> subprocess.CompletedProcess:
    """Run a command line tool; on an unexpected exit code fail with the end of its output."""
    p = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, timeout=timeout, encoding="utf-8",
                       errors="replace")
    if expect_ok and p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {p.returncode}\n--- stdout ---\n{p.stdout[-4000:]}"
                             f"\n--- stderr ---\n{p.stderr[-4000:]}")
    return p


def smms_cli(*args):
    return [sys.executable, "-m", "nnunetv2_smms.cli", *args]


def prepare_synthetic(root: Path, dataset_id=DATASET_ID, name="SMMSTest", shape=(24, 24, 24), **kw) -> dict:
    """Generate a synthetic dataset and run nnU-Net planning/preprocessing plus preprocess-unlabeled."""
    from nnunetv2_smms.dataset_conversion.synthetic import make_synthetic_dataset
    env = nnunet_env(root)
    raw = make_synthetic_dataset(root / "raw", dataset_id=dataset_id, name=name, shape=shape,
                                 **({"n_labeled": 6, "n_unlabeled": 6, "n_test": 2} | kw))
    run(["nnUNetv2_plan_and_preprocess", "-d", dataset_id, "-c", "3d_fullres", "-np", "1",
         "--verify_dataset_integrity"], env)
    run(smms_cli("preprocess-unlabeled", "-d", dataset_id, "-c", "3d_fullres"), env)
    return {"root": root, "raw": raw, "env": env}


@pytest.fixture(scope="session")
def prepared_dataset(tmp_path_factory) -> dict:
    """The tiny synthetic dataset, planned and preprocessed (labeled + unlabeled). For development only:
    SMMS_TEST_DATASET_CACHE=DIR reuses one prepared in DIR by an earlier run (never set in CI)."""
    cache = os.environ.get("SMMS_TEST_DATASET_CACHE")
    if cache:
        cache = Path(cache)
        if (cache / "prepared.ok").is_file():
            return {"root": cache, "raw": cache / "raw" / f"Dataset{DATASET_ID:03d}_SMMSTest",
                    "env": nnunet_env(cache)}
        prepared = prepare_synthetic(cache)
        (cache / "prepared.ok").write_text("ok")
        return prepared
    return prepare_synthetic(tmp_path_factory.mktemp("smms_prepared"))


@pytest.fixture(scope="session")
def trained_smms_model(prepared_dataset) -> dict:
    """nnUNetv2_train 501 3d_fullres 0 -tr nnUNetTrainerSMMS -device cpu, a few iterations."""
    env = dict(prepared_dataset["env"], nnUNet_smms_epochs=str(TRAIN_EPOCHS), nnUNet_smms_iterations_per_epoch="2",
               nnUNet_smms_val_iterations="1")
    p = run(["nnUNetv2_train", DATASET_ID, "3d_fullres", "0", "-tr", "nnUNetTrainerSMMS", "-device", "cpu"], env)
    root, raw = prepared_dataset["root"], prepared_dataset["raw"]
    return {"model_folder": root / "results" / raw.name / "nnUNetTrainerSMMS__nnUNetPlans__3d_fullres",
            "images_ts": raw / "imagesTs", "labels_ts": raw / "labelsTs", "env": env, "root": root, "raw": raw,
            "train_stdout": p.stdout}


def make_trainer(prepared_dataset, monkeypatch, tmp_path, trainer="nnUNetTrainerSMMS", start=True, **env):
    """A trainer of the prepared dataset in this process (augmentation in this process: no workers to clean
    up), through nnU-Net's own get_trainer_from_args; on_train_start() unless start=False."""
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_extTrainer"):
        monkeypatch.setenv(k, prepared_dataset["env"][k])
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    for k, v in env.items():
        monkeypatch.setenv(k, str(v))
    t = get_trainer_from_args(str(DATASET_ID), "3d_fullres", 0, trainer, device=torch.device("cpu"))
    if start:
        t.on_train_start()
    return t


# Slow: end-to-end tests through nnU-Net's commands or an in-process trainer on the prepared dataset, real BraTS
# data, multi-process DDP. `pytest -m "not slow"` runs the unit tests only (about 2 minutes on 2 cores).
SLOW_FIXTURES = {"prepared_dataset", "trained_smms_model"}
SLOW_MODULES = {"test_brats_real", "test_ddp", "test_reliability", "test_end_to_end", "test_evaluate_model",
                "test_convert_brats", "test_convert_ct_mr", "test_plan_gpu", "test_bench_dry_run"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or item.module.__name__ in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
