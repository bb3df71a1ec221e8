"""The real-data protocol and the GPU suite run end to end in their CPU-sized dry runs, so neither can rot
between the sessions that have the time (protocol) or the GPU (suite) to run them for real."""
import json
import shutil
import sys

from pathlib import Path

import torch

from conftest import REPO, nnunet_env, run


def test_accuracy_protocol_dry_run(tmp_path):
    out = tmp_path / "accuracy_2d_dry_run.json"
    run([sys.executable, REPO / "benchmarks" / "bench_accuracy_2d.py", "--dry-run", "--root", tmp_path / "w",
         "--out", out], nnunet_env(tmp_path), timeout=1500)
    r = json.loads(out.read_text())
    assert len(r["split"]["test"]) == 8 and len(r["split"]["labeled_5"]) == 2 and len(r["split"]["val"]) == 1
    assert not set(r["split"]["test"]) & set(r["split"]["train"])
    rows = {k.split("|")[1].strip() for k in r["table"]}
    assert rows == {"nnU-Net", "SMMS"}
    smms = next(v for k, v in r["table"].items() if "SMMS" in k)
    assert set(smms["outputs"]) == {"fused", "T1ce", "T2"} and smms["outputs"]["fused"]["n"] == 8
    assert any("fused - nnU-Net" in k for k in r["paired"])
    assert all(len(run_["curve"]["mean_fg_dice"]) >= 1 for run_ in r["runs"])
    assert (tmp_path / "figures" / "accuracy_2d_dry_run_curves.png").stat().st_size > 5000
    assert (tmp_path / "figures" / "accuracy_2d_dry_run_dice_box.png").stat().st_size > 5000
    assert all(run_["resumed_from_epoch"] == [] for run_ in r["runs"])

    # Killed runs. SMMS: after its last epoch's checkpoint (the final one, renamed as nnU-Net's latest): it goes on
    # from there with --c, trains nothing more (its weights stay those of the checkpoint) and is evaluated.
    # nnU-Net: while its checkpoint was being written (an unreadable file): it trains again from scratch.
    runs = {run_["row"]: tmp_path / "w" / "runs" / Path(run_["model"]).relative_to(tmp_path / "w" / "runs").parts[0]
            for run_ in r["runs"]}
    fold = {run_["row"]: Path(run_["model"]) / f"fold_{run_['fold']}" for run_ in r["runs"]}
    for row in ("SMMS", "nnU-Net"):
        (runs[row] / "record.json").unlink()
        shutil.rmtree(runs[row] / "eval")
    (fold["SMMS"] / "checkpoint_final.pth").rename(fold["SMMS"] / "checkpoint_latest.pth")
    before = torch.load(fold["SMMS"] / "checkpoint_latest.pth", map_location="cpu", weights_only=False)
    (fold["nnU-Net"] / "checkpoint_final.pth").unlink()
    (fold["nnU-Net"] / "checkpoint_latest.pth").write_bytes(b"half a checkpoint")
    p = run([sys.executable, REPO / "benchmarks" / "bench_accuracy_2d.py", "--dry-run", "--root", tmp_path / "w",
             "--out", out], nnunet_env(tmp_path), timeout=1500)
    assert "resuming from" in p.stdout and "cannot be read" in p.stdout, p.stdout[-3000:]
    again = {run_["row"]: run_ for run_ in json.loads(out.read_text())["runs"]}
    assert again["SMMS"]["resumed_from_epoch"] == [before["current_epoch"]]
    assert again["nnU-Net"]["resumed_from_epoch"] == []
    after = torch.load(fold["SMMS"] / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    for k, v in before["network_weights"].items():
        assert torch.equal(v, after["network_weights"][k]), k
    assert again["SMMS"]["train_seconds"] >= sum(e - s for s, e in zip(before["logging"]["epoch_start_timestamps"],
                                                                        before["logging"]["epoch_end_timestamps"]))
    assert not (fold["nnU-Net"] / "checkpoint_latest.pth").exists()
    assert (fold["nnU-Net"] / "checkpoint_final.pth").is_file()
    assert len(again["SMMS"]["per_case"]) == 3 and len(again["nnU-Net"]["per_case"]) == 1


def test_gpu_suite_dry_run(tmp_path):
    out = tmp_path / "gpu_suite_dry_run.json"
    run([sys.executable, REPO / "benchmarks" / "gpu_suite.py", "--dry-run", "--root", tmp_path / "w", "--out", out],
        nnunet_env(tmp_path), timeout=1500)
    r = json.loads(out.read_text())
    parts = r["parts"]
    assert set(parts) >= {"data", "training", "predict", "plan_gpu"}, r["skipped"]
    for name in ("nnUNetTrainer", "nnUNetTrainerSMMS"):
        assert parts["training"][name]["nan_losses"] == 0 and parts["training"][name]["steps"] == 4
        assert parts["predict"][name]["s_per_case"] > 0
    assert parts["training"]["smms_over_plain_s_per_step"] > 0
    assert any(k.startswith("3d_fullres_smms_12GB") for k in parts["plan_gpu"])
