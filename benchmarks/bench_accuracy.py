"""Accuracy on the real BraTS 2018 cases (T1ce + T2, whole tumour): nnUNetTrainerSMMS vs plain nnU-Net trained on
the same labeled cases vs plain nnU-Net trained with all labels, Dice and ASD per branch / fused on the same test
cases, through nnU-Net's own commands (nnUNetv2_plan_and_preprocess, nnUNetv2_train) and `nnunetv2_smms evaluate`.

    python benchmarks/bench_accuracy.py --scale smoke|cpu|gpu [--root DIR] [--out benchmarks/results/accuracy_<scale>.json]

Cases (sorted names of ../shared/data/brats18): 2 labeled, 2 unlabeled (their labels are used ONLY by "nnU-Net, all
labels"), 2 test. fold 0 of splits_final.json trains on the 2 labeled cases (SMMS: + the 2 unlabeled ones),
fold 1 on all 4 with labels.
Plain nnU-Net with a short schedule is benchmarks/ext_trainers' nnUNetTrainerBenchShort: nnUNetTrainer with only
the number of epochs / iterations changed, read from the same variables as the SMMS trainer.

Scales:
  smoke  4 mm, 2 epochs x 5 iterations: the pipeline runs, the numbers mean nothing (minutes)
  cpu    4 mm (BraTS is 1 mm: 64x fewer voxels), patch and network as nnU-Net plans them for 4 mm data,
         8 epochs x 12 iterations (nnU-Net: 1000 x 250; one SMMS step takes ~12 s on an idle 2-core CPU, a plain
         one ~2 s), about 30 min on a 2-core CPU. The numbers show the pipeline and the direction, not the
         paper's accuracy: every model sees 96 steps.
  gpu    native 1 mm, nnU-Net's 3d_fullres plans, 100 epochs x 250 iterations (nnU-Net's real configuration,
         shortened to 1/10 of the epochs); needs CUDA. SMMS on the default plans needs about 6x plain nnU-Net's
         memory (docs/gpu_memory.md); pass --configuration-for-smms 3d_fullres_smms_24GB etc. after plan-gpu to fit.
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine_info, prepare_brats, run, smms_cli, write_result  # noqa: E402

SCALES = {
    "smoke": {"spacing": (4.0, 4.0, 4.0), "epochs": 2, "iterations": 5, "val_iterations": 2, "device": "cpu",
              "dataset_id": 611},
    "cpu": {"spacing": (4.0, 4.0, 4.0), "epochs": 8, "iterations": 12, "val_iterations": 3, "device": "cpu",
            "dataset_id": 611},
    "gpu": {"spacing": None, "epochs": 100, "iterations": 250, "val_iterations": 50, "device": "cuda",
            "dataset_id": 613},
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=sorted(SCALES), required=True)
    parser.add_argument("--root", default=None, help="work folder (kept; default: a temporary folder)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--smms-configuration", default="3d_fullres",
                        help="configuration SMMS trains (e.g. a plan-gpu one); plain nnU-Net always trains 3d_fullres")
    parser.add_argument("--smms-trainers", default="nnUNetTrainerSMMS",
                        help="comma-separated SMMS trainers, one row each (e.g. nnUNetTrainerSMMS,"
                             "nnUNetTrainerSMMS_LightMMF)")
    parser.add_argument("--seed", type=int, default=None, help="nnUNet_smms_seed for the SMMS trainer")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    s = dict(SCALES[args.scale])
    s["epochs"] = args.epochs or s["epochs"]
    s["iterations"] = args.iterations or s["iterations"]
    root = Path(args.root or tempfile.mkdtemp(prefix=f"smms_bench_acc_{args.scale}_"))
    t_start = time.perf_counter()
    info = prepare_brats(root, s["dataset_id"], spacing=s["spacing"], name="BraTSBench" if s["spacing"] else
                         "BraTSBench1mm")
    env = dict(info["env"], nnUNet_smms_epochs=str(s["epochs"]), nnUNet_smms_iterations_per_epoch=str(s["iterations"]),
               nnUNet_smms_val_iterations=str(s["val_iterations"]))
    if args.seed is not None:
        env["nnUNet_smms_seed"] = str(args.seed)
    d, raw = info["dataset_id"], info["raw"]
    smms_rows = [(("SMMS" if t == "nnUNetTrainerSMMS" else t.replace("nnUNetTrainer", "")) +
                  " (2 labeled + 2 unlabeled)", t, args.smms_configuration, 0) for t in args.smms_trainers.split(",")]
    models = smms_rows + [  # (row name, trainer, configuration, fold)
        ("nnU-Net (same 2 labeled)", "nnUNetTrainerBenchShort", "3d_fullres", 0),
        ("nnU-Net (all 4 labeled)", "nnUNetTrainerBenchShort", "3d_fullres", 1),
    ]
    timings = {}
    for row, trainer, cfg, fold in models:
        folder = root / "results" / raw.name / f"{trainer}__nnUNetPlans__{cfg}" / f"fold_{fold}"
        if (folder / "checkpoint_final.pth").is_file():
            print(f"{row}: {folder} exists, not retrained")
            continue
        t0 = time.perf_counter()
        run(["nnUNetv2_train", d, cfg, fold, "-tr", trainer, "-device", s["device"]], env)
        timings[row] = round(time.perf_counter() - t0, 1)
        print(f"trained {row} in {timings[row]} s", flush=True)

    evals = {}
    t0 = time.perf_counter()
    for fold in (0, 1):
        cmd = smms_cli("evaluate", "-i", raw / "imagesTs", "-r", raw / "labelsTs", "-o", root / f"eval_fold{fold}",
                       "-f", fold, "--device", s["device"], "-np", "1", "--n-figure-cases", "0")
        for row, trainer, cfg, f in models:
            if f == fold:
                cmd += ["-m", f"{row}={root / 'results' / raw.name / f'{trainer}__nnUNetPlans__{cfg}'}"]
        run(cmd, env)
        evals[fold] = json.loads((root / f"eval_fold{fold}" / "summary.json").read_text())
    timings["evaluate"] = round(time.perf_counter() - t0, 1)

    results = {}
    for fold, doc in evals.items():
        for method, outputs in doc["results"].items():
            results[method] = {}
            for output, regions in outputs.items():
                r = regions[next(iter(regions))]
                results[method][output] = {"dice_mean": r["dice"]["mean"], "dice_std": r["dice"]["std"],
                                           "asd_mean": r["asd"]["mean"], "asd_std": r["asd"]["std"],
                                           "hd95_mean": r["hd95"]["mean"], "n_cases": r["n_cases"],
                                           "empty": r["empty"]}
    per_case = {}
    for fold in (0, 1):
        csvs = list((root / f"eval_fold{fold}").glob("*.csv"))
        per_case[fold] = [str(p) for p in csvs]

    smms = results.get(models[0][0], {}).get("fused", {}).get("dice_mean")
    same = results.get("nnU-Net (same 2 labeled)", {}).get("fused", {}).get("dice_mean")
    result = {"machine": machine_info(),
              "command": "python benchmarks/bench_accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "scale": args.scale, "settings": {**s, "spacing": s["spacing"] or "native (1 mm)"},
              "cases": {"labeled": info["labeled"], "unlabeled": info["unlabeled"], "test": info["test"]},
              "seconds": timings, "total_seconds": round(time.perf_counter() - t_start, 1), "results": results,
              "smms_fused_dice_minus_nnunet_same_labels": None if smms is None or same is None else smms - same}
    print(f"\n{args.scale}: {s['epochs']} epochs x {s['iterations']} iterations, spacing {result['settings']['spacing']}, "
          f"test cases {info['test']}")
    print(f"{'method':34s} {'output':8s} {'Dice %':>14s} {'ASD mm':>14s}")
    for method, outputs in results.items():
        for output, r in outputs.items():
            def f(m, sd, scale):
                return "nan" if m is None else f"{m * scale:.1f} +- {(sd or 0) * scale:.1f}"
            print(f"{method:34s} {output:8s} {f(r['dice_mean'], r['dice_std'], 100):>14s} "
                  f"{f(r['asd_mean'], r['asd_std'], 1):>14s}")
    print(f"time: {timings}, total {result['total_seconds']} s")
    write_result(Path(args.out or RESULTS / f"accuracy_{args.scale}.json"), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
