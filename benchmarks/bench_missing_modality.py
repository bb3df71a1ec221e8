"""Missing modality at inference on the real-data CPU protocol (bench_accuracy_2d.py): Dice with both modalities,
T1ce only and T2 only, for SMMS, SMMS trained with modality dropout, and plain nnU-Net with the missing channel
zero-filled.

    python benchmarks/bench_missing_modality.py [--root DIR] [--seeds 0,1,2] [--iterations N] [--train-references]
                                                [--dry-run] [--report-only]

The protocol is bench_accuracy_2d's, imported, not copied: the 22 BraTS cases, its fixed split, the 5 % labeled
dataset (2 labeled + 11 unlabeled cases), 2 mm, `2d`, its plans (batch and patch of the 2 labeled cases), its
schedule (600 iterations = 12 x 50, 10 validation iterations), its seeds, its 8 test cases, no mirroring TTA.
Rows:
- "SMMS": nnUNetTrainerSMMS, the protocol's finished runs in --root/runs (bench_accuracy_2d.py trains them; with
  --train-references a missing one is trained here by the protocol's own do_run, the same run it would make);
- "SMMS ModalityDropout": nnUNetTrainerSMMS_ModalityDropout (per labeled sample, one branch's input is 0 with
  probability 0.5, never both), trained here by the protocol's do_run into --root/runs, same layout and schedule;
- "nnU-Net": the protocol's nnUNetTrainerBenchShort runs (plain nnU-Net, same labels), same rule as SMMS.
Conditions: "both" = the protocol's own evaluation of the run (fused output, all test files; its record.json);
"T1ce only" / "T2 only" = `nnunetv2_smms predict` on a copy of imagesTs without the other modality's files (an SMMS
model predicts with the present modality's branch, plain nnU-Net with the channel zero-filled), then `nnunetv2_smms
evaluate` of that folder. Paired per test case (seed means): ModalityDropout - SMMS, SMMS - nnU-Net,
ModalityDropout - nnU-Net, per condition, Wilcoxon signed-rank.

Resumable: each (run, condition) lives in --root/missing_modality/<run id>/<condition>/ and is skipped once its
record.json exists; after each one the JSON (benchmarks/results/missing_modality.json) and the table
(<root>/missing_modality_table.md) are rewritten. `--report-only` rewrites them from what is there.
"""
import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_accuracy_2d as protocol  # noqa: E402
from _common import REPO, RESULTS, machine_info, nnunet_env, run, smms_cli, write_result  # noqa: E402

FRACTION = 5
MODALITY_DROPOUT = "SMMS ModalityDropout"
protocol.ROWS.setdefault(MODALITY_DROPOUT, ("nnUNetTrainerSMMS_ModalityDropout", 0, {}))
ROWS = ("SMMS", MODALITY_DROPOUT, "nnU-Net")
TRAINED_HERE = (MODALITY_DROPOUT,)
# condition -> the channel whose files are removed from imagesTs (write_brats_case: 0 = T1ce, 1 = T2)
CONDITIONS = {"both": None, "T1ce only": 1, "T2 only": 0}
PAIRS = ((MODALITY_DROPOUT, "SMMS"), ("SMMS", "nnU-Net"), (MODALITY_DROPOUT, "nnU-Net"))


def slug(name: str) -> str:
    return name.replace(" ", "_")


def condition_inputs(root: Path, raw: Path, condition: str) -> Path:
    """imagesTs without the dropped channel's files (copied once; built next to it and renamed into place)."""
    folder = root / "missing_modality" / "inputs" / slug(condition)
    if folder.is_dir():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    drop = f"_{CONDITIONS[condition]:04d}.nii.gz"
    for f in sorted((raw / "imagesTs").iterdir()):
        if not f.name.endswith(drop):
            shutil.copy(f, tmp / f.name)
    os.replace(tmp, folder)
    return folder


def evaluate_condition(root: Path, raw: Path, record: dict, condition: str, device: str) -> dict:
    """{case: {"dice", "asd"}} of one run under one condition, plus what predicted the incomplete cases."""
    if CONDITIONS[condition] is None:
        fused = next(cases for out, cases in record["per_case"].items() if protocol.output_key(out) == "fused")
        return {"per_case": fused, "predicted_by": "the protocol's evaluation (fused, all files)"}
    rid = protocol.run_id(record["row"], record["fraction"], record["seed"], record["iterations"])
    out = root / "missing_modality" / rid / slug(condition)
    record_file = out / "record.json"
    if record_file.is_file():
        return json.loads(record_file.read_text())
    if out.exists():
        shutil.rmtree(out)  # a killed evaluation: start again
    model = Path(record["model"])
    env = nnunet_env(root, nnUNet_results=model.parents[1])
    pred = out / "predictions"
    p = run(smms_cli("predict", "-i", condition_inputs(root, raw, condition), "-o", pred, "-d",
                     protocol.dataset_id(record["fraction"]), "-c", protocol.CONFIG, "-f", record["fold"], "-tr",
                     record["trainer"], "-device", device, "--disable_tta", "-npp", "1", "-nps", "1",
                     "--disable_progress_bar"), env)
    (out / "predict_stdout.txt").write_text(p.stdout)
    ev = out / "eval"
    run(smms_cli("evaluate", "--pred", record["row"], condition, pred, "-r", raw / "labelsTs", "-o", ev,
                 "--dataset-json", raw / "dataset.json", "-np", "1", "--n-figure-cases", "0"), env)
    per_case = next(iter(protocol.read_per_case(ev / "metrics_per_case.csv").values()))
    report = json.loads((pred / "missing_modalities.json").read_text())
    result = {"per_case": per_case, "predicted_by": sorted({c["predicted_by"] for c in
                                                            report["incomplete_cases"].values()})}
    tmp = record_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, record_file)
    return result


def summarize(results):
    """results: [{row, seed, condition, per_case}] -> table {row: {condition: stats}}, paired {name: stats}."""
    import numpy as np
    from scipy.stats import wilcoxon
    table, means = {}, {}
    for row in ROWS:
        for condition in CONDITIONS:
            runs = [r for r in results if r["row"] == row and r["condition"] == condition]
            if not runs:
                continue
            dice = [m["dice"] for r in runs for m in r["per_case"].values() if m["dice"] is not None]
            table.setdefault(row, {})[condition] = {
                "dice_mean": float(np.mean(dice)), "dice_std": float(np.std(dice, ddof=1)) if len(dice) > 1 else None,
                "n": len(dice), "seeds": sorted(r["seed"] for r in runs),
                "predicted_by": sorted({b for r in runs for b in ([r["predicted_by"]] if isinstance(
                    r["predicted_by"], str) else r["predicted_by"])})}
            per_case = {}
            for r in runs:
                for case, m in r["per_case"].items():
                    per_case.setdefault(case, []).append(m["dice"] if m["dice"] is not None else np.nan)
            means[(row, condition)] = {c: float(np.nanmean(v)) for c, v in per_case.items()}
    paired = {}
    for a, b in PAIRS:
        for condition in CONDITIONS:
            if (a, condition) not in means or (b, condition) not in means:
                continue
            cases = sorted(set(means[(a, condition)]) & set(means[(b, condition)]))
            diff = [means[(a, condition)][c] - means[(b, condition)][c] for c in cases]
            p = float(wilcoxon(diff).pvalue) if len(diff) >= 5 and any(d != 0 for d in diff) else None
            paired[f"{condition}: {a} - {b}"] = {"mean_diff_dice": float(np.mean(diff)), "n_cases": len(cases),
                                                 "n_better": int(sum(d > 0 for d in diff)), "wilcoxon_p": p,
                                                 "per_case": dict(zip(cases, diff))}
    return table, paired


def format_table(table, paired) -> str:
    lines = ["| row | seeds | " + " | ".join(f"{c} Dice %" for c in CONDITIONS) + " |",
             "|---|---|" + "---|" * len(CONDITIONS)]
    for row, conditions in table.items():
        seeds = max((len(e["seeds"]) for e in conditions.values()), default=0)
        cells = []
        for c in CONDITIONS:
            e = conditions.get(c)
            cells.append("-" if e is None else f"{100 * e['dice_mean']:.1f}" + (
                f" +- {100 * e['dice_std']:.1f}" if e["dice_std"] is not None else ""))
        lines.append(f"| {row} | {seeds} | " + " | ".join(cells) + " |")
    lines += ["", "| paired per test case (seed means) | mean Dice diff (points) | better on | Wilcoxon p |",
              "|---|---|---|---|"]
    for name, p in paired.items():
        pv = "-" if p["wilcoxon_p"] is None else f"{p['wilcoxon_p']:.3f}"
        lines.append(f"| {name} | {100 * p['mean_diff_dice']:+.1f} | {p['n_better']}/{p['n_cases']} | {pv} |")
    return "\n".join(lines) + "\n"


def write_report(root: Path, results, settings, t_start, out_json: Path) -> str:
    table, paired = summarize(results) if results else ({}, {})
    text = format_table(table, paired)
    write_result(out_json, {
        "machine": machine_info(), "command": "python benchmarks/bench_missing_modality.py " + " ".join(sys.argv[1:]),
        "settings": settings, "table": table, "paired": paired, "results": results,
        "session_seconds": round(time.perf_counter() - t_start, 1)})
    (root / f"{out_json.stem}_table.md").write_text(text)
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=None, help="the protocol's work folder (default ../smms_bench_2d; --dry-run: "
                                                "../smms_bench_missing_dry_run)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--iterations", type=int, default=600, help="training iterations (the protocol's runs)")
    p.add_argument("--val-iterations", type=int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--train-references", action="store_true",
                   help="train SMMS / nnU-Net runs the protocol has not finished (default: skip them)")
    p.add_argument("--dry-run", action="store_true",
                   help="CI-sized: 8 mm, seed 0, 4 iterations, every row trained here (the code path only)")
    p.add_argument("--report-only", action="store_true", help="rewrite the JSON and table; train nothing")
    p.add_argument("--out", default=None, help="JSON (default benchmarks/results/missing_modality.json)")
    args = p.parse_args(argv)
    spacing = protocol.SPACING
    if args.dry_run:
        spacing, args.seeds, args.iterations, args.val_iterations = (8.0, 8.0, 8.0), "0", 4, 1
        args.train_references = True
    root = Path(args.root) if args.root else REPO.parent / ("smms_bench_missing_dry_run" if args.dry_run
                                                            else "smms_bench_2d")
    root.mkdir(parents=True, exist_ok=True)
    out_json = Path(args.out) if args.out else RESULTS / ("missing_modality_dry_run.json" if args.dry_run
                                                          else "missing_modality.json")
    seeds = [int(s) for s in args.seeds.split(",")]
    t_start = time.perf_counter()
    split = protocol.fixed_split(protocol.all_cases())
    settings = {"spacing_mm": spacing, "configuration": protocol.CONFIG, "fraction": FRACTION,
                "iterations": args.iterations, "iterations_per_epoch": protocol.ITERS_PER_EPOCH,
                "val_iterations": args.val_iterations, "seeds": seeds,
                "rows": {r: protocol.ROWS[r][:2] for r in ROWS}, "conditions": CONDITIONS, "tta": False,
                "device": args.device, "test_cases": split["test"]}
    datasets = {} if args.report_only else protocol.prepare(root, split, [FRACTION], spacing)
    raw = root / "raw" / f"Dataset{protocol.dataset_id(FRACTION)}_BraTS2d{FRACTION}pct"
    results = []
    jobs = [(seed, row) for seed in seeds for row in ROWS]  # seed by seed: each finished seed is a paired set
    for k, (seed, row) in enumerate(jobs, 1):
        rid = protocol.run_id(row, FRACTION, seed, args.iterations)
        rec_file = root / "runs" / rid / "record.json"
        if args.report_only or not (row in TRAINED_HERE or args.train_references or rec_file.is_file()):
            if not args.report_only:
                print(f"[{k}/{len(jobs)}] {row}, seed {seed}: the protocol has not finished {rid} yet; skipped "
                      f"(run bench_accuracy_2d.py first, or --train-references)", flush=True)
            if not rec_file.is_file():
                continue
            record = json.loads(rec_file.read_text())
        else:
            print(f"[{k}/{len(jobs)}] {row}, seed {seed}" + (": trained before" if rec_file.is_file() else
                                                               ": training ..."), flush=True)
            record = protocol.do_run(root, datasets, row, FRACTION, seed, args.iterations, args.val_iterations,
                                     args.device)
        for condition in CONDITIONS:
            done = (root / "missing_modality" / rid / slug(condition) / "record.json").is_file()
            if args.report_only and CONDITIONS[condition] is not None and not done:
                continue
            t0 = time.perf_counter()
            r = evaluate_condition(root, raw, record, condition, args.device)
            results.append({"row": row, "seed": seed, "condition": condition, **r})
            dice = [m["dice"] for m in r["per_case"].values() if m["dice"] is not None]
            print(f"    {condition}: Dice {100 * sum(dice) / len(dice):.1f} % ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
        if not args.report_only:
            write_report(root, results, settings, t_start, out_json)
    text = write_report(root, results, settings, t_start, out_json)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
