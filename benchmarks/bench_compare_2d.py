"""The paper's Table 1 on real data: `nnunetv2_smms compare` with every semi-supervised trainer of the plugin on
the real-data CPU protocol of bench_accuracy_2d.py (22 BraTS 2018 cases, T1ce + T2, whole tumour, 2 mm, nnU-Net
`2d`, the same fixed split, 5 % = 2 labeled cases + 11 unlabeled, 8 test cases, batch and patch of the
labeled-only plan, 600 iterations for every trainer).

    python benchmarks/bench_compare_2d.py [--root DIR] [--seed 0] [--iterations 600] [--trainers T1,T2,...] [--dry-run]
    python benchmarks/bench_compare_2d.py --aggregate benchmarks/results/compare_2d_seed*_1200it*.json

Resumable (it is `compare`: finished runs are kept, an interrupted one continues with --c). Writes
benchmarks/results/compare_2d_seed<S>[_<N>it].json (compare's summary + the table + each method's per-case Dice and
its paired per-case difference to plain nnU-Net, nnUNetTrainerLabeledOnly, with the Wilcoxon signed-rank p) and
prints the tables. Each (seed, length) has its own nnUNet_results folder under --root. One seed per call;
`--aggregate` puts the calls of one length together over seeds (per case, seed means, against nnU-Net). The runs
of the protocol itself (bench_accuracy_2d.py) are separate and not reused, so that every row here comes from the
same command. `--finished-only` trains nothing: it evaluates the trainers whose runs have
finished (compare --finished-only), for a report while the rest is still to be trained.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine_info, nnunet_env, smms_cli, write_result  # noqa: E402
from bench_accuracy_2d import (CONFIG, ITERS_PER_EPOCH, all_cases, dataset_id, fixed_split,  # noqa: E402
                               paired_difference, prepare)

FRACTION = 5
REFERENCE = "nnUNetTrainerLabeledOnly"
DEFAULT_ITERATIONS = 600


def default_trainers():
    from nnunetv2_smms.trainers import TABLE1_TRAINERS
    return [t.__name__ for t in TABLE1_TRAINERS]


def read_dice(csv_path: Path) -> dict:
    """{(method, output): {case: Dice in %}} from compare's metrics_per_case.csv (one region here: whole tumour)."""
    import csv
    out = {}
    with open(csv_path, encoding="utf-8") as f:
        for r in csv.DictReader(f):
            if r["dice"] not in ("", "nan", "NaN"):
                out.setdefault((r["method"], r["output"]), {})[r["case"]] = float(r["dice"]) * 100
    return out


def paired_against_reference(dice: dict, reference: str = REFERENCE) -> dict:
    """Each (method, output) minus the reference method's fused output, per test case (paired_difference), with
    the method's mean Dice over those cases."""
    import numpy as np
    ref = dice.get((reference, "fused"))
    if ref is None:
        return {}
    paired = {}
    for (method, output), per_case in dice.items():
        if method != reference:
            d = paired_difference(per_case, ref)
            paired[f"{method} {output} - {reference}"] = {
                "method": method, "output": output, "mean": float(np.mean([per_case[c] for c in d["per_case"]])), **d}
    return paired


def format_paired(paired: dict, reference: str = REFERENCE) -> str:
    lines = [f"| method | output | Dice % | - {reference} | better | Wilcoxon p |", "|---|---|---|---|---|---|"]
    for e in paired.values():
        p = "-" if e["wilcoxon_p"] is None else f"{e['wilcoxon_p']:.3f}"
        lines.append(f"| {e['method']} | {e['output']} | {e['mean']:.1f} | {e['mean_diff_dice']:+.1f} | "
                     f"{e['n_better']}/{e['n_cases']} | {p} |")
    return "\n".join(lines) + "\n"


def length_tag(iterations: int) -> str:
    return "" if iterations == DEFAULT_ITERATIONS else f"_{iterations}it"


def results_folder(root: Path, seed: int, iterations: int = DEFAULT_ITERATIONS) -> Path:
    """nnUNet_results of one (seed, length)'s runs: nnU-Net's model folders carry neither, and compare refuses a
    finished run of another schedule (seed 0 at 600 it keeps the first runs' name, `compare_results`)."""
    return root / f"compare_results{'' if seed == 0 else f'_seed{seed}'}{length_tag(iterations)}"


def per_case_table(dice: dict) -> dict:
    """{method: {output: {case: Dice %}}} for the JSON (read_dice's (method, output) keys do not serialise)."""
    out = {}
    for (method, output), cases in dice.items():
        out.setdefault(method, {})[output] = dict(cases)
    return out


def aggregate(results: list, reference: str = REFERENCE) -> dict:
    """Seeds together: results of bench_compare_2d calls (their JSON, `per_case_dice` inside) at one length.

    Per seed, a (method, output) has the mean per-case Dice of its runs at that seed (one, unless two calls at the
    same seed trained it on different machines), and so has the reference's fused output. Over seeds, each method
    is paired per test case with the reference on the seeds the method has: its per-case mean over those seeds
    minus the reference's (Wilcoxon signed-rank, paired_difference). Returns {"seeds", "iterations", "rows"}, rows
    keyed "method | output" in the order first met: mean +- std of Dice over cases x seeds, and the pair."""
    import numpy as np
    its = {r["iterations"] for r in results}
    if len(its) != 1:
        raise SystemExit(f"the results to aggregate have different lengths ({sorted(its)} iterations): "
                         "give the files of one length")
    missing = [r.get("seed") for r in results if "per_case_dice" not in r]
    if missing:
        raise SystemExit(f"results of seed(s) {missing} have no per_case_dice (written before session 14): rerun "
                         "that call with --finished-only to rewrite them")
    seen, by_seed = [], {}  # by_seed: (method, output) -> seed -> case -> [Dice]
    for r in results:
        for method, outputs in r["per_case_dice"].items():
            for output, cases in outputs.items():
                run = (method, output, r["seed"], cases)
                if run in seen:  # the nnU-Net row is in every call of a seed: the same run counts once
                    continue
                seen.append(run)
                for case, d in cases.items():
                    by_seed.setdefault((method, output), {}).setdefault(r["seed"], {}).setdefault(case, []).append(d)
    seed_means = {k: {s: {c: float(np.mean(v)) for c, v in cs.items()} for s, cs in seeds.items()}
                  for k, seeds in by_seed.items()}
    ref = seed_means.get((reference, "fused"), {})
    rows = {}
    for (method, output), seeds in seed_means.items():
        values = [d for cs in seeds.values() for d in cs.values()]
        row = {"method": method, "output": output, "seeds": sorted(seeds), "dice_mean": float(np.mean(values)),
               "dice_std": float(np.std(values, ddof=1)) if len(values) > 1 else None, "n": len(values)}
        common = sorted(set(seeds) & set(ref))
        if method != reference and common:
            row["paired_seeds"] = common
            row["paired"] = paired_difference(over_seeds(seeds, common), over_seeds(ref, common))
        rows[f"{method} | {output}"] = row
    return {"iterations": its.pop(), "seeds": sorted({r["seed"] for r in results}), "reference": reference,
            "rows": rows}


def over_seeds(per_seed: dict, seeds: list) -> dict:
    """{case: mean Dice over the given seeds}, for the cases every one of those seeds has."""
    import numpy as np
    cases = set.intersection(*(set(per_seed[s]) for s in seeds))
    return {c: float(np.mean([per_seed[s][c] for s in seeds])) for c in cases}


def format_aggregate(agg: dict) -> str:
    lines = [f"| method | output | seeds | Dice % (cases x seeds) | - {agg['reference']} (seed means) | better | "
             "Wilcoxon p |", "|---|---|---|---|---|---|---|"]
    for row in agg["rows"].values():
        sd = "" if row["dice_std"] is None else f" +- {row['dice_std']:.1f}"
        seeds = ",".join(map(str, row["seeds"]))
        pr = row.get("paired")
        if pr is None:
            lines.append(f"| {row['method']} | {row['output']} | {seeds} | {row['dice_mean']:.1f}{sd} | - | - | - |")
            continue
        p = "-" if pr["wilcoxon_p"] is None else f"{pr['wilcoxon_p']:.3f}"
        lines.append(f"| {row['method']} | {row['output']} | {seeds} | {row['dice_mean']:.1f}{sd} | "
                     f"{pr['mean_diff_dice']:+.1f} | {pr['n_better']}/{pr['n_cases']} | {p} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=None,
                   help="work folder (kept; resumable); default ../smms_bench_2d, shared with bench_accuracy_2d.py's "
                        "prepared datasets; --dry-run needs its own")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trainers", default=None, help="comma-separated (default: the Table 1 trainers)")
    p.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS)
    p.add_argument("--val-iterations", type=int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dry-run", action="store_true", help="8 mm, 4 iterations, two trainers (the code path only)")
    p.add_argument("--finished-only", action="store_true",
                   help="train nothing; evaluate the trainers whose runs have finished")
    p.add_argument("--out", default=None)
    p.add_argument("--aggregate", nargs="+", metavar="JSON", default=None,
                   help="train nothing: put the results of earlier calls (one length, any seeds) together, per case "
                        "over seeds, against nnU-Net; writes --out (default results/compare_2d_<N>it_seeds.json)")
    args = p.parse_args(argv)
    if args.aggregate:
        agg = aggregate([json.loads(Path(f).read_text(encoding="utf-8")) for f in args.aggregate])
        agg["inputs"] = [str(f) for f in args.aggregate]
        agg["table_md"] = format_aggregate(agg)
        write_result(Path(args.out) if args.out else RESULTS / f"compare_2d_{agg['iterations']}it_seeds.json", agg)
        print(agg["table_md"])
        return 0
    trainers = args.trainers.split(",") if args.trainers else default_trainers()
    spacing = (2.0, 2.0, 2.0)
    if args.dry_run:
        spacing, args.iterations, args.val_iterations = (8.0, 8.0, 8.0), 4, 1
        trainers = trainers if args.trainers else ["nnUNetTrainerLabeledOnly", "nnUNetTrainerMeanTeacher"]
    if args.root is None:
        if args.dry_run:
            p.error("--dry-run needs its own --root (the prepared datasets there are 8 mm)")
        args.root = str(Path(__file__).resolve().parents[2] / "smms_bench_2d")
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    split = fixed_split(all_cases())
    raw = prepare(root, split, [FRACTION], spacing)[FRACTION]
    out = root / f"compare_seed{args.seed}{length_tag(args.iterations)}"
    results = results_folder(root, args.seed, args.iterations)
    env = nnunet_env(root, nnUNet_results=results)
    extra = ["--finished-only"] if args.finished_only else []
    t0 = time.perf_counter()
    # compare prints its progress (runs, training logs in OUT/logs) straight to this terminal
    subprocess.run([str(c) for c in smms_cli("compare", "-d", dataset_id(FRACTION), "-c", CONFIG, "-f", "0", "-tr", *trainers,
                      "-i", raw / "imagesTs", "-r", raw / "labelsTs", "-o", out,
                      "--epochs", max(1, args.iterations // ITERS_PER_EPOCH),
                      "--iterations-per-epoch", min(args.iterations, ITERS_PER_EPOCH),
                      "--val-iterations", args.val_iterations, "--seed", args.seed, "--device", args.device,
                      "--disable-tta", "-np", "1", *extra)], env=env, check=True)
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    trainers = summary["settings"]["trainers"]  # --finished-only: the ones in the table
    table = (out / "table.md").read_text(encoding="utf-8")
    dice = read_dice(out / "metrics_per_case.csv")
    paired = paired_against_reference(dice)
    result = {"benchmark": "compare_2d", "machine": machine_info(), "split": split, "fraction": FRACTION,
              "seed": args.seed, "iterations": args.iterations, "trainers": trainers, "spacing_mm": spacing,
              "wall_seconds": round(time.perf_counter() - t0, 1), "table_md": table,
              "paired_md": format_paired(paired), "paired": paired, "per_case_dice": per_case_table(dice),
              "summary": summary}
    write_result(Path(args.out) if args.out else RESULTS / (
        "compare_2d_dry_run.json" if args.dry_run else f"compare_2d_seed{args.seed}{length_tag(args.iterations)}.json"),
                 result)
    print(table)
    print(format_paired(paired))
    return 0


if __name__ == "__main__":
    sys.exit(main())
