"""Time the evaluation metrics on one whole-volume BraTS case (240x240x155).

The prediction is the reference whole tumor moved by --shift voxels along x. Each metric is timed the way
``nnunetv2_smms evaluate`` computes it (medpy on the union bounding box plus one voxel) and, for comparison,
as medpy on the uncropped volume. Prints a table and writes JSON with the machine's details to --out.

    python benchmarks/bench_metrics.py [--case DIR] [--repeats 5] [--out benchmarks/results/metrics.json]
"""
import argparse
import json
import os
import platform
import sys
import time
from importlib.metadata import version

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BRATS = os.path.join(REPO, "..", "shared", "data", "brats18")


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
            "load_average_1min": os.getloadavg()[0], "python": sys.version.split()[0],
            **{p: version(p) for p in ("numpy", "scipy", "medpy")}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", help="BraTS case folder (default: the first in ../shared/data/brats18)")
    parser.add_argument("--shift", type=int, default=3, help="voxels the prediction is moved along x")
    parser.add_argument("--repeats", type=int, default=5, help="timings per metric (the best is reported)")
    parser.add_argument("--full-repeats", type=int, default=1, help="timings per uncropped medpy metric")
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "metrics.json"))
    args = parser.parse_args(argv)

    import SimpleITK as sitk
    from medpy.metric.binary import asd, assd, hd95

    from nnunetv2_smms.evaluation.metrics import binary_metrics, crop_to_union, dice
    from nnunetv2_smms.evaluation.report import atomic_path

    case_dir = args.case or os.path.join(BRATS, sorted(os.listdir(BRATS))[0])
    case = os.path.basename(os.path.normpath(case_dir))
    image = sitk.ReadImage(os.path.join(case_dir, f"{case}_seg.nii.gz"))
    ref = sitk.GetArrayFromImage(image) > 0
    spacing = tuple(image.GetSpacing())[::-1]
    pred = np.roll(ref, args.shift, axis=2)
    pred_crop, ref_crop = crop_to_union(pred, ref)

    cropped = {
        "crop": lambda: crop_to_union(pred, ref),
        "dice": lambda: dice(pred, ref),
        "asd": lambda: asd(pred_crop, ref_crop, spacing),
        "assd": lambda: assd(pred_crop, ref_crop, spacing),
        "hd95": lambda: hd95(pred_crop, ref_crop, spacing),
        "all (binary_metrics)": lambda: binary_metrics(pred, ref, spacing),
    }
    full = {"asd": lambda: asd(pred, ref, spacing), "assd": lambda: assd(pred, ref, spacing),
            "hd95": lambda: hd95(pred, ref, spacing)}
    seconds = {name: best_of(fn, args.repeats) for name, fn in cropped.items()}
    seconds_full = {name: best_of(fn, args.full_repeats) for name, fn in full.items()}
    values = binary_metrics(pred, ref, spacing)

    print(f"case {case}: volume {ref.shape}, spacing {spacing} mm, whole tumor {int(ref.sum())} voxels, "
          f"prediction moved {args.shift} voxels along x, crop {pred_crop.shape}")
    print(f"{'metric':<22}{'value':>10}{'cropped (s)':>14}{'uncropped medpy (s)':>22}")
    for name, s in seconds.items():
        value = f"{values[name]:.4f}" if name in values else ""
        uncropped = f"{seconds_full[name]:.3f}" if name in seconds_full else ""
        print(f"{name:<22}{value:>10}{s:>14.3f}{uncropped:>22}")

    result = {"case": case, "shape": list(ref.shape), "spacing_mm": list(spacing), "shift_voxels": args.shift,
              "crop_shape": list(pred_crop.shape), "repeats": args.repeats, "timing": "best of repeats, seconds",
              "seconds_cropped": seconds, "seconds_uncropped_medpy": seconds_full,
              "values": {k: v for k, v in values.items() if k != "empty"}, "machine": machine()}
    with atomic_path(args.out) as tmp, open(tmp, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
