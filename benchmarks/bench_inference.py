"""Inference speed: seconds per case of nnU-Net's predictor for an SMMS model and a plain nnU-Net model trained on
the same plans, TTA (mirroring) on and off, alternating, several repetitions.

    python benchmarks/bench_inference.py --root ROOT_OF_bench_accuracy [--reps 3] [--out benchmarks/results/inference.json]
    python benchmarks/bench_inference.py --smms MODEL_DIR --plain MODEL_DIR -i imagesTs [--fold 0]

Per case: nnUNetPredictor.predict_single_npy_array on the case read with the dataset's reader (what nnUNetv2_predict
runs per case: preprocessing, sliding window with Gaussian weighting, mirroring TTA, resampling back, argmax), in
one process, models and TTA modes alternating. Once per model and mode, the whole `nnUNetv2_predict` command
is timed as well (includes process start-up and model loading).
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine_info, nnunet_env, run, stats, write_result  # noqa: E402


def find_models(root: Path):
    results = root / "results"
    ds = sorted(p for p in results.iterdir() if p.is_dir())[0]
    return (ds / "nnUNetTrainerSMMS__nnUNetPlans__3d_fullres", ds / "nnUNetTrainerBenchShort__nnUNetPlans__3d_fullres",
            root / "raw" / ds.name / "imagesTs")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None, help="work folder of bench_accuracy.py (models + imagesTs)")
    parser.add_argument("--smms", default=None)
    parser.add_argument("--plain", default=None)
    parser.add_argument("-i", "--images", default=None)
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--checkpoint", default="checkpoint_final.pth")
    parser.add_argument("--out", default=str(RESULTS / "inference.json"))
    args = parser.parse_args(argv)
    if args.root:
        smms, plain, images = find_models(Path(args.root))
        env = nnunet_env(Path(args.root))
    else:
        smms, plain, images = Path(args.smms), Path(args.plain), Path(args.images)
        env = nnunet_env(Path(tempfile.mkdtemp()))
    os.environ["nnUNet_extTrainer"] = env["nnUNet_extTrainer"]
    os.environ.setdefault("nnUNet_compile", "f")

    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    device = torch.device("cuda" if (args.device == "auto" and torch.cuda.is_available()) or args.device == "cuda"
                          else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    ds_json = load_json(str(smms / "dataset.json"))
    ending = ds_json["file_ending"]
    n_ch = len(ds_json["channel_names"])
    cases = sorted({f.name[:-len(ending) - 5] for f in images.iterdir() if f.name.endswith(ending)})
    reader = determine_reader_writer_from_dataset_json(ds_json, str(images / f"{cases[0]}_0000{ending}"))()
    loaded = {c: reader.read_images([str(images / f"{c}_{i:04d}{ending}") for i in range(n_ch)]) for c in cases}

    predictors = {}
    for name, folder in (("SMMS", smms), ("nnU-Net", plain)):
        for tta in (True, False):
            p = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=tta, device=device,
                                verbose=False, verbose_preprocessing=False, allow_tqdm=False)
            p.initialize_from_trained_model_folder(str(folder), (args.fold,), args.checkpoint)
            predictors[(name, tta)] = p
    for (name, tta), p in predictors.items():  # warm-up
        img, props = loaded[cases[0]]
        p.predict_single_npy_array(img, props)

    times = {k: [] for k in predictors}
    for rep in range(args.reps):
        keys = list(predictors) if rep % 2 == 0 else list(reversed(list(predictors)))
        for key in keys:
            per_case = []
            for c in cases:
                img, props = loaded[c]
                sync()
                t0 = time.perf_counter()
                predictors[key].predict_single_npy_array(img, props)
                sync()
                per_case.append(time.perf_counter() - t0)
            times[key].append(statistics.median(per_case))
        print(f"rep {rep}: " + ", ".join(f"{n} TTA {'on' if t else 'off'} {times[(n, t)][-1]:.3f} s/case"
                                         for n, t in predictors), flush=True)

    commands = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, folder in (("SMMS", smms), ("nnU-Net", plain)):
            for tta in (True, False):
                trainer = folder.name.split("__")[0]
                cmd = ["nnUNetv2_predict", "-i", images, "-o", Path(tmp) / f"{name}_{tta}", "-d",
                       folder.parent.name, "-c", folder.name.split("__")[2], "-f", args.fold, "-tr", trainer,
                       "-device", device.type, "-npp", 1, "-nps", 1] + ([] if tta else ["--disable_tta"])
                t0 = time.perf_counter()
                run(cmd, dict(env, nnUNet_results=str(folder.parent.parent)))
                commands[f"{name}, TTA {'on' if tta else 'off'}"] = round((time.perf_counter() - t0) / len(cases), 2)

    result = {"machine": machine_info(), "device": str(device),
              "command": "python benchmarks/bench_inference.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "models": {"SMMS": str(smms), "nnU-Net": str(plain)}, "cases": cases, "reps": args.reps,
              "s_per_case": {f"{n}, TTA {'on' if t else 'off'}": stats(v) for (n, t), v in times.items()},
              "nnUNetv2_predict_wall_s_per_case": commands}
    result["smms_over_plain"] = {}
    for tta in (True, False):
        ratios = [a / b for a, b in zip(times[("SMMS", tta)], times[("nnU-Net", tta)])]
        result["smms_over_plain"][f"TTA {'on' if tta else 'off'}"] = stats(ratios)
    print(f"\n{'model':22s} {'s/case (median)':>16s} {'min-max':>14s} {'nnUNetv2_predict s/case':>24s}")
    for key, st in result["s_per_case"].items():
        print(f"{key:22s} {st['median']:>16.3f} {st['min']:>6.3f}-{st['max']:<7.3f} {commands[key]:>24.2f}")
    for k, st in result["smms_over_plain"].items():
        print(f"SMMS / nnU-Net, {k}: {st['median']:.2f}x")
    write_result(Path(args.out), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
