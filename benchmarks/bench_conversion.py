"""Time the dataset converters: convert-brats on the real BraTS 2018 cases in ../shared/data/brats18 and
convert-ct-mr on synthetic CT + MR phantoms (with the registration error against the known transform).

    python benchmarks/bench_conversion.py [--phantoms 4] [--out benchmarks/results/conversion.json]

Prints seconds per case and writes them, with the machine's description, as JSON.
"""
import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from _conversion_helpers import (BRATS18, euler_transform, make_phantom_patient,  # noqa: E402
                                 registration_error)

from nnunetv2_smms.dataset_conversion.brats import convert_brats  # noqa: E402
from nnunetv2_smms.dataset_conversion.ct_mr import convert_ct_mr  # noqa: E402


def timed(convert, n_cases: int) -> dict:
    start = time.perf_counter()
    dataset = convert()
    seconds = time.perf_counter() - start
    return {"cases": n_cases, "seconds": round(seconds, 2), "seconds_per_case": round(seconds / n_cases, 2),
            "dataset": dataset}


def bench_brats(work: Path) -> dict:
    n = sum(1 for p in BRATS18.iterdir() if p.is_dir())
    result = timed(lambda: convert_brats(BRATS18, 901, "BenchBraTS", output_root=work, labeled=2, val=1, test=1), n)
    result.pop("dataset")
    return {"what": "convert-brats, T1ce + T2, whole tumour (checks, copies, label rewrite)", **result}


def registration_errors(dataset: Path, truths: dict) -> dict:
    manifest = json.loads((dataset / "smms_manifest.json").read_text())
    errors = {}
    for case, truth in truths.items():
        mm, deg = registration_error(manifest["cases"][case]["registration"]["transform"], truth)
        errors[case] = {"max_error_mm": round(mm, 3), "rotation_error_deg": round(deg, 3)}
    return errors


def bench_ct_mr(work: Path, n: int) -> dict:
    rng = np.random.default_rng(0)
    truths = {f"P{i:02d}": euler_transform(rng.uniform(-10, 10, 3), rng.uniform(-10, 10, 3)) for i in range(n)}
    for seed, (case, truth) in enumerate(truths.items()):
        make_phantom_patient(work / "patients" / case, truth, seed=seed)
    result = timed(lambda: convert_ct_mr(work / "patients", 902, "BenchCTMR", output_root=work / "raw",
                                         labeled=1, val=1, test=1), n)
    errors = registration_errors(result.pop("dataset"), truths)
    return {"what": "convert-ct-mr, 64x64x40 CT at 1.5x1.5x3 mm + 72x72x44 MR, rigid registration + resampling",
            **result, "registration_errors": errors,
            "worst_error_mm": max(e["max_error_mm"] for e in errors.values()),
            "worst_rotation_error_deg": max(e["rotation_error_deg"] for e in errors.values())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phantoms", type=int, default=4, help="CT+MR phantom patients (at least 3)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "conversion.json"))
    args = parser.parse_args(argv)
    result = {"machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                          "cpu_count": os.cpu_count(), "python": platform.python_version(),
                          "simpleitk": sitk.Version.VersionString()}}
    with tempfile.TemporaryDirectory() as tmp:
        if BRATS18.is_dir():
            result["brats"] = bench_brats(Path(tmp) / "brats")
        else:
            print(f"skipping BraTS: {BRATS18} not found", file=sys.stderr)
        result["ct_mr"] = bench_ct_mr(Path(tmp) / "ct_mr", args.phantoms)
    for name in ("brats", "ct_mr"):
        if name in result:
            r = result[name]
            print(f"{name}: {r['cases']} cases in {r['seconds']} s = {r['seconds_per_case']} s per case ({r['what']})")
    print(f"ct_mr registration: worst point error {result['ct_mr']['worst_error_mm']} mm, worst rotation error "
          f"{result['ct_mr']['worst_rotation_error_deg']} deg")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
