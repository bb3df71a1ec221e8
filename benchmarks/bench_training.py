"""Training speed of nnUNetTrainerSMMS (and its ablation trainers) against plain nnU-Net's nnUNetTrainer on the same
plans and configuration, in one process, alternating the trainers, several repetitions.

    python benchmarks/bench_training.py [--data brats4mm|synthetic] [--reps 5] [--steps 3] [--device auto]
                                        [--out benchmarks/results/training.json]

Each trainer is created as nnUNetv2_train creates it (get_trainer_from_args, initialize(), on_train_start(): nnU-Net's
data loaders and augmentation workers, and for SMMS the unlabeled loader), then per repetition and trainer:
- `loader`:    train_step(next(dataloader_train))      (SMMS also draws its unlabeled batch inside train_step)
- `preloaded`: train_step(the same pre-loaded batch)   (SMMS: the unlabeled loader replaced by one pre-loaded batch)
Seconds per step (median over repetitions of the median of `--steps` steps) and per sample x branch:
plain nnU-Net has batch B and 1 branch; SMMS has B labeled + B_u unlabeled samples and 2 branches.
A trainer name with a suffix `@N` (default: `nnUNetTrainer@4`) runs with batch size N instead of the planned one: plain
nnU-Net with as many samples per step as SMMS (2 + 2) separates the cost of SMMS from the cost of a bigger batch
(on a CPU, convolution time grows faster than the batch). A suffix `:joint` runs an SMMS trainer with one forward +
backward pass over labeled + unlabeled cases joined instead of the default two passes (separate_unlabeled_pass).
On CUDA the timings are synchronized and the peak GPU memory of each trainer's steps is recorded.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine_info, nnunet_env, prepare_brats, stats, write_result  # noqa: E402

from nnunetv2_smms.trainers import TRAINER_NAMES  # noqa: E402

TRAINERS = ("nnUNetTrainer", *[t for t in TRAINER_NAMES if t != "nnUNetTrainerSMMS_MMF_MCML"], "nnUNetTrainerSMMS:joint",
            "nnUNetTrainer@4")


class Repeat:
    """An iterator that returns the same pre-loaded batch forever (stands in for a data loader)."""

    def __init__(self, batch):
        self.batch = batch

    def __iter__(self):
        return self

    def __next__(self):
        return self.batch


def prepare_synthetic(root: Path, shape) -> dict:
    from _common import run, smms_cli
    from nnunetv2_smms.dataset_conversion.synthetic import make_synthetic_dataset
    env = nnunet_env(root)
    done = root / ".prepared_612"
    if not done.is_file():
        make_synthetic_dataset(root / "raw", dataset_id=612, name="BenchSynth", shape=shape, n_labeled=6,
                               n_unlabeled=6, n_test=2)
        run(["nnUNetv2_plan_and_preprocess", "-d", 612, "-c", "3d_fullres", "-np", "1"], env)
        run(smms_cli("preprocess-unlabeled", "-d", 612, "-c", "3d_fullres"), env)
        done.write_text("ok")
    return {"root": root, "env": env, "dataset_id": 612}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=("brats4mm", "synthetic"), default="brats4mm")
    parser.add_argument("--root", default=None, help="work folder (kept; default: a temporary folder)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per repetition, trainer and mode")
    parser.add_argument("--trainers", default=",".join(TRAINERS))
    parser.add_argument("--configuration", default="3d_fullres")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--out", default=str(RESULTS / "training.json"))
    args = parser.parse_args(argv)

    root = Path(args.root or tempfile.mkdtemp(prefix="smms_bench_train_"))
    info = prepare_brats(root, 611) if args.data == "brats4mm" else prepare_synthetic(root, (48, 48, 48))
    # nnU-Net reads its paths at import: set them first
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer", "nnUNet_compile",
              "nnUNet_n_proc_DA"):
        os.environ[k] = info["env"][k]
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    device = torch.device("cuda" if (args.device == "auto" and torch.cuda.is_available()) or args.device == "cuda"
                          else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    names = args.trainers.split(",")
    trainers, preloaded = {}, {}
    for name in names:
        trainer_class, _, joint = name.partition(":")
        trainer_class, _, batch_size = trainer_class.partition("@")
        tr = get_trainer_from_args(str(info["dataset_id"]), args.configuration, 0, trainer_class, "nnUNetPlans",
                                   device=device)
        if batch_size:  # this trainer's own ConfigurationManager (each trainer loads the plans file itself)
            tr.configuration_manager.configuration["batch_size"] = int(batch_size)
        if joint:
            tr.separate_unlabeled_pass = False
        tr.on_train_start()
        tr.network.train()
        batch = next(tr.dataloader_train)
        unl = next(tr.dataloader_unlabeled) if getattr(tr, "dataloader_unlabeled", None) is not None else None
        trainers[name], preloaded[name] = tr, (batch, unl)
        for _ in range(2):  # warm-up (allocator, cudnn autotuning, worker start)
            tr.train_step(next(tr.dataloader_train))
        sync()

    def samples_and_branches(tr):
        b = tr.batch_size
        if hasattr(tr, "smms_config"):
            return b + (tr.global_unlabeled_batch_size() if tr.use_mcml else 0), 2
        return b, 1

    times = {n: {"loader": [], "preloaded": []} for n in names}
    peak = {n: 0 for n in names}
    for rep in range(args.reps):
        for name in names:  # alternate trainers and modes within each repetition
            tr = trainers[name]
            for mode in ("loader", "preloaded") if rep % 2 == 0 else ("preloaded", "loader"):
                real_unl = getattr(tr, "dataloader_unlabeled", None)
                if mode == "preloaded" and real_unl is not None:
                    tr.dataloader_unlabeled = Repeat(preloaded[name][1])
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                step_times = []
                for _ in range(args.steps):
                    sync()
                    t0 = time.perf_counter()
                    tr.train_step(next(tr.dataloader_train) if mode == "loader" else preloaded[name][0])
                    sync()
                    step_times.append(time.perf_counter() - t0)
                if device.type == "cuda":
                    peak[name] = max(peak[name], torch.cuda.max_memory_allocated())
                tr.dataloader_unlabeled = real_unl if real_unl is not None else getattr(tr, "dataloader_unlabeled", None)
                times[name][mode].append(statistics.median(step_times))
            print(f"rep {rep}: {name}: loader {times[name]['loader'][-1]:.3f} s, preloaded "
                  f"{times[name]['preloaded'][-1]:.3f} s", flush=True)

    tr0 = trainers[names[0]]
    cm = tr0.configuration_manager
    result = {"machine": machine_info(), "device": str(device), "data": args.data,
              "command": "python benchmarks/bench_training.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "configuration": args.configuration, "patch_size": list(cm.patch_size), "batch_size": cm.batch_size,
              "reps": args.reps, "steps_per_rep": args.steps, "trainers": {}}
    plain = None
    for name in names:
        tr = trainers[name]
        n_samples, n_branches = samples_and_branches(tr)
        t_loader, t_pre = stats(times[name]["loader"]), stats(times[name]["preloaded"])
        ratios = [a / b for a, b in zip(times[name]["loader"], times[name]["preloaded"])]
        r = {"samples_per_step": n_samples, "branches": n_branches,
             "s_per_step_loader": t_loader, "s_per_step_preloaded": t_pre,
             "loader_over_preloaded": stats(ratios),
             "s_per_sample_branch_preloaded": t_pre["median"] / (n_samples * n_branches),
             "s_per_sample_branch_loader": t_loader["median"] / (n_samples * n_branches),
             "parameters": sum(p.numel() for p in tr.network.parameters())}
        if device.type == "cuda":
            r["peak_gpu_memory_gb"] = round(peak[name] / 2 ** 30, 3)
        if name == "nnUNetTrainer":
            plain = r
        result["trainers"][name] = r
    if plain is not None:
        for name, r in result["trainers"].items():
            r["per_sample_branch_over_plain_per_sample"] = {
                mode: r[f"s_per_sample_branch_{mode}"] / plain[f"s_per_sample_branch_{mode}"]
                for mode in ("preloaded", "loader")}

    print(f"\n{device}, patch {result['patch_size']}, batch {result['batch_size']}, {args.reps} reps x {args.steps} steps")
    print(f"{'trainer':28s} {'samples x br':>12s} {'s/step loader':>14s} {'s/step preloaded':>17s} "
          f"{'loader/pre':>10s} {'s/(sample*br)':>13s} {'vs plain':>9s}")
    for name, r in result["trainers"].items():
        vs = r.get("per_sample_branch_over_plain_per_sample", {}).get("preloaded", float("nan"))
        print(f"{name:28s} {r['samples_per_step']:>5d} x {r['branches']:<4d} {r['s_per_step_loader']['median']:>14.3f} "
              f"{r['s_per_step_preloaded']['median']:>17.3f} {r['loader_over_preloaded']['median']:>10.3f} "
              f"{r['s_per_sample_branch_preloaded']:>13.4f} {vs:>9.3f}")
    write_result(Path(args.out), result)
    sys.stdout.flush()
    os._exit(0)  # nnU-Net's background augmentation workers of all trainers: do not wait for them


if __name__ == "__main__":
    sys.exit(main())
