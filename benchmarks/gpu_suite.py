"""The GPU suite (issue 15): one command for one H100/H200 that finishes within ~9 minutes and writes one JSON.

    python benchmarks/gpu_suite.py [--root DIR] [--budget-s 520] [--out benchmarks/results/gpu_suite.json]
    python benchmarks/gpu_suite.py --dry-run        # CPU, tiny (8 mm, a few steps): the same code path, for CI

Parts, in order, each skipped (and said so in the JSON) when the time budget is spent:
1. data: the 6 BraTS 2018 cases of ../shared/data/brats18 at their native 1 mm (T1ce + T2, whole tumour),
   nnU-Net's default 3d_fullres plans, preprocess-unlabeled (2 labeled, 2 unlabeled, 2 test);
2. training: plain nnUNetTrainer and nnUNetTrainerSMMS, as nnU-Net runs them on CUDA (AMP, torch.compile unless
   nnUNet_compile=f), alternating blocks of steps through nnU-Net's loaders: s/step, the ratio, NaN count, the
   loss over the first vs the last steps, and the real peak memory (torch.cuda.max_memory_allocated) of each on
   the default plans against the README's "fits a 24 GB card";
3. `nnunetv2_smms plan-gpu` options (12, 16, 24 GB): the real peak of a few SMMS steps on each configuration;
4. `nnUNetv2_predict` wall time per test case (TTA on), SMMS vs plain, from the models of part 2.
A short accuracy run does not fit in 9 minutes next to these; bench_accuracy.py --scale gpu is the command.
Every part appends to the JSON as soon as it ends (a run cut by the device's limit keeps what it measured).
"""
import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine_info, prepare_brats, run, smms_cli, write_result  # noqa: E402

PLAIN, SMMS = "nnUNetTrainer", "nnUNetTrainerSMMS"


class Budget:
    def __init__(self, seconds: float):
        self.t0, self.seconds = time.perf_counter(), seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)


def _trainer(dataset_id, configuration, name, device):
    from nnunetv2.run.run_training import get_trainer_from_args
    tr = get_trainer_from_args(str(dataset_id), configuration, 0, name, "nnUNetPlans", device=device)
    tr.on_train_start()
    tr.network.train()
    return tr


def train_block(tr, steps: int, sync) -> dict:
    times, losses = [], []
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        out = tr.train_step(next(tr.dataloader_train))
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(float(out["loss"]))
    return {"times": times, "losses": losses}


def part_training(info, device, steps, warmup, block, sync) -> tuple:
    import torch
    trainers = {n: _trainer(info["dataset_id"], "3d_fullres", n, device) for n in (PLAIN, SMMS)}
    for tr in trainers.values():
        train_block(tr, warmup, sync)  # compile, cudnn autotuning, worker start
    record = {n: {"times": [], "losses": []} for n in trainers}
    done = 0
    while done < steps:  # alternate blocks of steps so both trainers see the same machine state
        n_block = min(block, steps - done)
        for name, t in trainers.items():
            b = train_block(t, n_block, sync)
            record[name]["times"] += b["times"]
            record[name]["losses"] += b["losses"]
        done += n_block
    out = {}
    for n, r in record.items():
        finite = [x for x in r["losses"] if math.isfinite(x)]
        k = max(1, len(r["losses"]) // 5)
        out[n] = {"steps": len(r["times"]), "s_per_step_median": statistics.median(r["times"]),
                  "nan_losses": len(r["losses"]) - len(finite),
                  "loss_first_fifth": statistics.mean(r["losses"][:k]) if finite else None,
                  "loss_last_fifth": statistics.mean(r["losses"][-k:]) if finite else None,
                  "patch_size": list(trainers[n].configuration_manager.patch_size),
                  "batch_size": trainers[n].batch_size, "compiled": os.environ.get("nnUNet_compile", "t")}
    out["smms_over_plain_s_per_step"] = out[SMMS]["s_per_step_median"] / out[PLAIN]["s_per_step_median"]
    if device.type == "cuda":
        # the peak over the alternating blocks is the larger of the two networks' (SMMS); measure plain alone
        torch.cuda.reset_peak_memory_stats()
        train_block(trainers[PLAIN], 3, sync)
        out[PLAIN]["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
        torch.cuda.reset_peak_memory_stats()
        train_block(trainers[SMMS], 3, sync)
        out[SMMS]["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
        out["smms_fits_24gb"] = out[SMMS]["peak_memory_gb"] < 24
    return out, trainers


def save_model(tr) -> None:
    """checkpoint_final.pth in the trainer's output folder (plans.json and dataset.json were written at start)."""
    tr.save_checkpoint(os.path.join(tr.output_folder, "checkpoint_final.pth"))


def part_plan_gpu(info, device, sizes, steps, sync) -> dict:
    import torch
    out = {}
    for gb in sizes:
        cfg = f"3d_fullres_smms_{gb}GB"
        run(smms_cli("plan-gpu", "-d", info["dataset_id"], "--gpu-memory", gb), info["env"])
        tr = _trainer(info["dataset_id"], cfg, SMMS, device)
        train_block(tr, 2, sync)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        b = train_block(tr, steps, sync)
        out[cfg] = {"patch_size": list(tr.configuration_manager.patch_size), "batch_size": tr.batch_size,
                    "s_per_step_median": statistics.median(b["times"]),
                    "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
                    if device.type == "cuda" else None}
        out[cfg]["fits"] = out[cfg]["peak_memory_gb"] is None or out[cfg]["peak_memory_gb"] < gb
        tr.on_train_end()  # stops its augmentation workers
    return out


def part_predict(info, device_name, trainers) -> dict:
    out = {}
    cases = len(list((info["raw"] / "imagesTs").glob("*_0000.nii.gz")))
    for name in trainers:
        dst = info["root"] / f"pred_{name}"
        t0 = time.perf_counter()
        run(["nnUNetv2_predict", "-i", info["raw"] / "imagesTs", "-o", dst, "-d", info["dataset_id"], "-c",
             "3d_fullres", "-f", "0", "-tr", name, "-chk", "checkpoint_final.pth", "-device", device_name,
             "-npp", "2", "-nps", "2"], info["env"])
        out[name] = {"s_per_case": (time.perf_counter() - t0) / cases, "cases": cases, "tta": True}
    out["smms_over_plain"] = out[SMMS]["s_per_case"] / out[PLAIN]["s_per_case"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=None)
    p.add_argument("--budget-s", type=float, default=520.0, help="stop starting parts after this many seconds")
    p.add_argument("--steps", type=int, default=300, help="timed training steps per trainer")
    p.add_argument("--dry-run", action="store_true", help="CPU, BraTS at 8 mm, a few steps: the code path only")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    budget = Budget(float("inf") if args.dry_run else args.budget_s)  # the dry run exercises every part
    root = Path(args.root or tempfile.mkdtemp(prefix="smms_gpu_suite_"))
    spacing = (8.0, 8.0, 8.0) if args.dry_run else None
    steps, warmup, block = (4, 1, 2) if args.dry_run else (args.steps, 10, 25)
    out_path = Path(args.out or RESULTS / ("gpu_suite_dry_run.json" if args.dry_run else "gpu_suite.json"))
    result = {"machine": machine_info(), "command": "python benchmarks/gpu_suite.py " + " ".join(
        argv if argv is not None else sys.argv[1:]), "dry_run": args.dry_run, "parts": {}, "skipped": []}

    def save():
        result["seconds"] = round(time.perf_counter() - budget.t0, 1)
        write_result(out_path, result)

    t0 = time.perf_counter()
    info = prepare_brats(root, 615 if args.dry_run else 616, spacing=spacing,
                         name="BraTSGpuDry" if args.dry_run else "BraTSGpu1mm")
    info["dataset_id"] = 615 if args.dry_run else 616
    result["parts"]["data"] = {"seconds": round(time.perf_counter() - t0, 1), "spacing": spacing or "native 1 mm",
                               "cases": {k: info[k] for k in ("labeled", "unlabeled", "test")}}
    save()
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer", "nnUNet_n_proc_DA"):
        os.environ[k] = str(info["env"][k])
    if args.dry_run:
        os.environ["nnUNet_compile"] = "f"
    else:
        os.environ.pop("nnUNet_compile", None)  # nnU-Net's default on CUDA: compile
        info["env"].pop("nnUNet_compile", None)
    import torch
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type != "cuda" and not args.dry_run:
        raise SystemExit("no CUDA device: run with --dry-run on a CPU")

    trainers = {}
    if budget.left() > 120:
        t0 = time.perf_counter()
        result["parts"]["training"], trainers = part_training(info, device, steps, warmup, block, sync)
        result["parts"]["training"]["seconds"] = round(time.perf_counter() - t0, 1)
        for tr in trainers.values():
            save_model(tr)
        save()
    else:
        result["skipped"].append("training (budget)")
    if trainers and budget.left() > 60:
        t0 = time.perf_counter()
        result["parts"]["predict"] = part_predict(info, device.type, trainers)
        result["parts"]["predict"]["seconds"] = round(time.perf_counter() - t0, 1)
        save()
    else:
        result["skipped"].append("predict (budget)")
    if budget.left() > 90:
        t0 = time.perf_counter()
        result["parts"]["plan_gpu"] = part_plan_gpu(info, device, (12,) if args.dry_run else (12, 16, 24),
                                                    2 if args.dry_run else 5, sync)
        result["parts"]["plan_gpu"]["seconds"] = round(time.perf_counter() - t0, 1)
    else:
        result["skipped"].append("plan_gpu (budget)")
    result["skipped"].append("accuracy (does not fit next to the rest; python benchmarks/bench_accuracy.py --scale gpu)")
    save()
    print(json.dumps(result["parts"], indent=1, default=str))
    for tr in trainers.values():
        tr.on_train_end()  # stops nnU-Net's (and the unlabeled) augmentation workers
    return 0


if __name__ == "__main__":
    sys.exit(main())
