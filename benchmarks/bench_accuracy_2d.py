"""The real-data CPU protocol (issue 15): 22 real BraTS 2018 cases, T1ce + T2, whole tumour, 2 mm, nnU-Net's `2d`
configuration, fixed splits with two labeled fractions, every model with the same plans (patch AND batch), the
same number of iterations and several seeds, evaluated on the same 8 test cases.

    python benchmarks/bench_accuracy_2d.py [--root DIR] [--rows ROW,...] [--seeds 0,1,2] [--fractions 5,10]
                                           [--iterations N] [--dry-run] [--report-only]

Resumable: every run (row x fraction x seed) lives in its own nnUNet_results folder under --root and is skipped
once its evaluation exists. A killed run goes on from its last epoch's checkpoint_latest.pth with nnU-Net's
`--c` (every trainer here writes one each epoch; the record lists `resumed_from_epoch`, and its train_seconds add
the killed attempt's epoch times from the checkpoint's log); a half-trained model is never evaluated. A resumed
run is not bit-identical to an uninterrupted one (the data loaders restart their random streams).
On a fresh machine `--restore-from benchmarks/results/accuracy_2d.json` first puts the committed report's runs
back into --root as finished runs (their metrics and curves; not their models), so new rows join that report.
Runs go in priority order (the question first: nnU-Net vs SMMS on the same labels), one at a time, and after
each one the summary JSON (benchmarks/results/accuracy_2d.json), the table and the figures are rewritten, so a
partial protocol is already readable. The report always covers every finished run under --root (of any rows,
seeds and lengths, whatever this call's --rows); `--report-only` rewrites it from what is there.
Runs with other --iterations than the default (e.g. the 2x length check, or `--iterations 2400 --rows nnU-Net`)
are their own rows in the table, and `results/figures/accuracy_2d_length.png` draws test Dice against the
number of training iterations for every row trained at more than one length.

Data (fixed, written into the results): the 22 cases of ../shared/data/brats18 + brats18_more, shuffled once
with seed 2026: 8 test, 14 training = 1 validation + 4 labeled (the 10 % fraction; its first 2 are the 5 %
fraction) + the rest unlabeled (11 at 5 %, 9 at 10 %). One nnU-Net dataset per fraction, imagesTr = all 14
training cases (so "nnU-Net, all labels" uses the same plans); splits_final.json fold 0 = the labeled cases,
fold 1 = all 13 non-validation cases, validation = the one validation case in both. The batch size and patch
of the 2d plans are set to what nnU-Net plans for the 2 labeled cases alone, for every row.

Rows: see ROWS. Plain nnU-Net is benchmarks/ext_trainers' nnUNetTrainerBenchShort (nnUNetTrainer, only the
schedule and the seed changed). Prediction for the evaluation: nnU-Net's predictor without mirroring TTA (for
every row alike; it quadruples the cost of 2D prediction).
"""
import argparse
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, RESULTS, machine_info, nnunet_env, run, smms_cli, write_brats_case, write_result  # noqa

DATA_DIRS = [REPO.parent / "shared" / "data" / "brats18", REPO.parent / "shared" / "data" / "brats18_more"]
SPLIT_SEED = 2026
SPACING = (2.0, 2.0, 2.0)
CONFIG = "2d"
ITERS_PER_EPOCH = 50
# row -> (trainer, fold, extra environment). fold 0 = the labeled cases (+ unlabeled for SSL rows); fold 1 = all
# labels. In priority order: the runs are done in the order of PRIORITY below.
ROWS = {
    "nnU-Net": ("nnUNetTrainerBenchShort", 0, {}),
    "SMMS": ("nnUNetTrainerSMMS", 0, {}),
    "nnU-Net all labels": ("nnUNetTrainerBenchShort", 1, {}),
    "SMMS Baseline": ("nnUNetTrainerSMMS_Baseline", 0, {}),
    "SMMS MMF": ("nnUNetTrainerSMMS_MMF", 0, {}),
    "SMMS MMF+MAE": ("nnUNetTrainerSMMS_MMF_MAE", 0, {}),
    "SMMS MMF+MCML": ("nnUNetTrainerSMMS_MMF_MCML", 0, {}),
    "SMMS LightMMF": ("nnUNetTrainerSMMS_LightMMF", 0, {}),
    "SMMS replace": ("nnUNetTrainerSMMS_BenchReplace", 0, {}),
}
SMMS_REFERENCE, PLAIN_REFERENCE = "SMMS", "nnU-Net"


def all_cases():
    cases = sorted(p.name for d in DATA_DIRS if d.is_dir() for p in d.iterdir() if p.is_dir())
    if len(cases) < 22:
        raise SystemExit(f"need the 22 BraTS cases of {' and '.join(map(str, DATA_DIRS))}, found {len(cases)}")
    return cases


def fixed_split(cases, n_test=8):
    order = list(cases)
    random.Random(SPLIT_SEED).shuffle(order)
    test, train = sorted(order[:n_test]), order[n_test:]
    val, labeled = train[0], train[1:5]
    return {"test": test, "val": [val], "labeled_10": labeled, "labeled_5": labeled[:2],
            "train": sorted(train)}


def case_dir(case):
    return next(d / case for d in DATA_DIRS if (d / case).is_dir())


def dataset_id(fraction):
    return {5: 621, 10: 622}[fraction]


def prepare(root: Path, split: dict, fractions, spacing=SPACING) -> dict:
    """Write, plan and preprocess one dataset per fraction (once; marked done), fix batch and patch."""
    env = nnunet_env(root)
    datasets = {}
    for fraction in fractions:
        did = dataset_id(fraction)
        raw = root / "raw" / f"Dataset{did}_BraTS2d{fraction}pct"
        datasets[fraction] = raw
        if (root / f".prepared_{did}").is_file():
            continue
        labeled = split[f"labeled_{fraction}"]
        unlabeled = [c for c in split["train"] if c not in labeled and c not in split["val"]]
        if raw.exists():
            shutil.rmtree(raw)
        for sub in ("imagesTr", "labelsTr", "imagesUnlabeled", "imagesTs", "labelsTs"):
            (raw / sub).mkdir(parents=True)
        for c in split["train"]:
            write_brats_case(c, spacing, raw / "imagesTr", raw / "labelsTr", src=case_dir(c))
            if c in unlabeled:
                write_brats_case(c, spacing, raw / "imagesUnlabeled", src=case_dir(c))
        for c in split["test"]:
            write_brats_case(c, spacing, raw / "imagesTs", raw / "labelsTs", src=case_dir(c))
        (raw / "dataset.json").write_text(json.dumps({
            "channel_names": {"0": "T1ce", "1": "T2"}, "labels": {"background": 0, "whole_tumor": 1},
            "numTraining": len(split["train"]), "file_ending": ".nii.gz"}))
        # the batch and patch nnU-Net plans for the labeled cases alone: a throw-away dataset, planned only
        small = root / "raw" / f"Dataset{did + 10}_BraTS2d{fraction}pctLabeledOnly"
        if small.exists():
            shutil.rmtree(small)
        (small / "imagesTr").mkdir(parents=True)
        (small / "labelsTr").mkdir()
        for c in labeled:
            for f in raw.glob(f"imagesTr/{c}_*.nii.gz"):
                shutil.copy(f, small / "imagesTr" / f.name)
            shutil.copy(raw / "labelsTr" / f"{c}.nii.gz", small / "labelsTr" / f"{c}.nii.gz")
        (small / "dataset.json").write_text(json.dumps(dict(json.loads((raw / "dataset.json").read_text()),
                                                            numTraining=len(labeled))))
        run(["nnUNetv2_plan_and_preprocess", "-d", did + 10, "-c", CONFIG, "-np", "1", "--no_pp"], env)
        small_plans = json.loads((root / "preprocessed" / small.name / "nnUNetPlans.json").read_text())
        run(["nnUNetv2_plan_and_preprocess", "-d", did, "-c", CONFIG, "-np", "1"], env)
        plans_file = root / "preprocessed" / raw.name / "nnUNetPlans.json"
        plans = json.loads(plans_file.read_text())
        for key in ("batch_size", "patch_size"):
            plans["configurations"][CONFIG][key] = small_plans["configurations"][CONFIG][key]
        plans_file.write_text(json.dumps(plans, indent=2))
        (root / "preprocessed" / raw.name / "splits_final.json").write_text(json.dumps([
            {"train": labeled, "val": split["val"]},
            {"train": [c for c in split["train"] if c not in split["val"]], "val": split["val"]}]))
        run(smms_cli("preprocess-unlabeled", "-d", did, "-c", CONFIG), env)
        (root / f".prepared_{did}").write_text(json.dumps({"labeled": labeled, "unlabeled": unlabeled}))
    return datasets


def run_id(row, fraction, seed, iterations):
    return f"{row.replace(' ', '_').replace('+', 'p')}__{fraction}pct__seed{seed}__{iterations}it"


def plan_runs(rows, fractions, seeds, iterations, length_check):
    """(row, fraction, seed, iterations) in priority order: for the first fraction, nnU-Net and SMMS seed by seed
    (each finished pair is a paired comparison), then nnU-Net with all labels and the other rows seed by seed, then
    the next fraction; the length check (2x iterations, seed 0) last."""
    runs = []
    for fraction in fractions:
        for row in rows:
            for seed in seeds:
                runs.append((row, fraction, seed, iterations))
    key = {r: i for i, r in enumerate(ROWS)}
    runs.sort(key=lambda r: (fractions.index(r[1]), key[r[0]] >= key["nnU-Net all labels"], r[2], key[r[0]]))
    if length_check:
        runs += [(row, fractions[0], seeds[0], 2 * iterations) for row in (PLAIN_REFERENCE, SMMS_REFERENCE)
                 if row in rows]
    return runs


def do_run(root: Path, datasets: dict, row, fraction, seed, iterations, val_iterations, device):
    """Train (unless a finished model exists) and evaluate one run; returns its record or None if done before."""
    trainer, fold, extra = ROWS[row]
    rid = run_id(row, fraction, seed, iterations)
    out = root / "runs" / rid
    record_file = out / "record.json"
    if record_file.is_file():
        return json.loads(record_file.read_text())
    raw = datasets[fraction]
    results = out / "results"
    env = nnunet_env(root, nnUNet_results=results, nnUNet_smms_epochs=max(1, iterations // ITERS_PER_EPOCH),
                     nnUNet_smms_iterations_per_epoch=min(iterations, ITERS_PER_EPOCH),
                     nnUNet_smms_val_iterations=val_iterations, nnUNet_smms_seed=seed, **extra)
    model = results / raw.name / f"{trainer}__nnUNetPlans__{CONFIG}"
    t0 = time.perf_counter()
    resumed, prior_s = [], 0.0
    if not (model / f"fold_{fold}" / "checkpoint_final.pth").is_file():
        cmd = ["nnUNetv2_train", dataset_id(fraction), CONFIG, fold, "-tr", trainer, "-device", device]
        start = resumable_checkpoint(model / f"fold_{fold}" / "checkpoint_latest.pth")
        if start is not None:  # a killed run of this very schedule (the folder is per row/seed/iterations): go on
            epoch, prior_s = start
            resumed.append(epoch)
            print(f"    resuming from {model / f'fold_{fold}' / 'checkpoint_latest.pth'} (epoch {epoch})", flush=True)
            run(cmd + ["--c"], env)
        else:
            if model.exists():
                shutil.rmtree(model)  # killed before its first checkpoint (or in the middle of writing it)
            run(cmd, env)
    train_s = time.perf_counter() - t0 + prior_s
    t0 = time.perf_counter()
    ev = out / "eval"
    run(smms_cli("evaluate", "-m", f"{row}={model}", "-i", raw / "imagesTs", "-r", raw / "labelsTs", "-o", ev,
                 "-f", fold, "--device", device, "-np", "1", "--n-figure-cases", "0", "--disable-tta"), env)
    eval_s = time.perf_counter() - t0
    record = {"row": row, "fraction": fraction, "seed": seed, "iterations": iterations, "trainer": trainer,
              "fold": fold, "train_seconds": round(train_s, 1), "eval_seconds": round(eval_s, 1),
              "per_case": read_per_case(ev / "metrics_per_case.csv"),
              "resumed_from_epoch": resumed,
              "curve": read_curve(model / f"fold_{fold}" / "checkpoint_final.pth"),
              "model": str(model)}
    tmp = record_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, record_file)
    return record


def resumable_checkpoint(checkpoint: Path):
    """(epoch, seconds the epochs before it took) of a killed run's checkpoint_latest.pth, or None when there is
    none or it cannot be read (killed while nnU-Net wrote it): then the run starts again from scratch."""
    if not checkpoint.is_file():
        return None
    import torch
    try:
        ck = torch.load(checkpoint, map_location="cpu", weights_only=False)
        log = ck["logging"]
        seconds = sum(e - s for s, e in zip(log["epoch_start_timestamps"], log["epoch_end_timestamps"]))
        return int(ck["current_epoch"]), float(seconds)
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint means the same: train again
        print(f"    {checkpoint} cannot be read ({type(e).__name__}: {e}); training again from scratch", flush=True)
        return None


def read_per_case(csv_path: Path) -> dict:
    """{output: {case: {"dice": x, "asd": y}}}; outputs named 'fused', 'a (T1ce)', 'b (T2)' by evaluate."""
    import csv
    per = {}
    with open(csv_path, encoding="utf-8") as f:
        for r in csv.DictReader(f):
            def num(v):
                return float(v) if v not in ("", "nan", "NaN", None) else None
            per.setdefault(r["output"], {})[r["case"]] = {"dice": num(r["dice"]), "asd": num(r["asd"])}
    return per


def read_curve(checkpoint: Path) -> dict:
    import torch
    log = torch.load(checkpoint, map_location="cpu", weights_only=False)["logging"]
    keep = ("train_losses", "val_losses", "mean_fg_dice", "ema_fg_dice", "mean_fg_dice_a", "mean_fg_dice_b",
            "train_loss_unsup")
    return {k: [float(x) for x in log[k]] for k in keep if k in log}


def mean_curve(curves: list, key: str):
    """(mean over the runs' curves of `key`, truncated to the shortest; how many runs had it), or (None, 0)."""
    import numpy as np
    got = [c[key] for c in curves if c.get(key)]
    if not got:
        return None, 0
    n = min(map(len, got))
    return np.mean([c[:n] for c in got], 0), len(got)


def output_key(output: str) -> str:
    o = output.lower()
    return "fused" if o.startswith("fused") else ("T1ce" if "t1ce" in o else ("T2" if "t2" in o else output))


def fused_dice(record) -> list:
    """The run's fused test Dice per case, in % (cases without a Dice left out)."""
    return [m["dice"] * 100 for o, cs in record["per_case"].items() if output_key(o) == "fused" for m in cs.values()
            if m["dice"] is not None]


def summarize(records, split):
    """Per (fraction, row, iterations, output): mean +- std over test cases x seeds; each row - nnU-Net (fused) and
    SMMS - each SMMS variant (ablations, LightMMF, ...) per test case with the Wilcoxon signed-rank test, both over
    the seeds the two rows have in common (seed means; a row run at seeds 0-1 is paired with nnU-Net's seeds 0-1,
    not with its mean over three seeds)."""
    import numpy as np
    table = {}
    groups = {}
    for r in records:
        groups.setdefault((r["fraction"], r["row"], r["iterations"]), []).append(r)
    groups = dict(sorted(groups.items(), key=lambda kv: (kv[0][0], list(ROWS).index(kv[0][1]), kv[0][2])))
    for (fraction, row, its), runs in groups.items():
        outputs = {}
        for run_ in runs:
            for out, cases in run_["per_case"].items():
                for case, m in cases.items():
                    outputs.setdefault(output_key(out), {}).setdefault(case, []).append(m)
        entry = {"seeds": sorted(x["seed"] for x in runs), "train_seconds_mean": float(np.mean(
            [x["train_seconds"] for x in runs])), "outputs": {}}
        for out, cases in outputs.items():
            dice = [m["dice"] for ms in cases.values() for m in ms if m["dice"] is not None]
            asd = [m["asd"] for ms in cases.values() for m in ms if m["asd"] is not None]
            entry["outputs"][out] = {"dice_mean": float(np.mean(dice)), "dice_std": float(np.std(dice, ddof=1))
                                     if len(dice) > 1 else None, "asd_mean": float(np.mean(asd)) if asd else None,
                                     "asd_std": float(np.std(asd, ddof=1)) if len(asd) > 1 else None,
                                     "n": len(dice), "n_asd": len(asd)}
        table[f"{fraction}% | {row} | {its} it"] = entry
    paired = {}
    for (fraction, row, its), runs in groups.items():
        plain = groups.get((fraction, PLAIN_REFERENCE, its), [])
        if row in (PLAIN_REFERENCE, "nnU-Net all labels"):
            continue
        for out in ("fused", "T1ce", "T2"):
            pair = paired_on_common_seeds(runs, out, plain, "fused")
            if pair:
                paired[f"{fraction}% | {row} {out} - nnU-Net, seeds {pair['seeds']} | {its} it"] = pair
    paired.update(paired_against_smms(groups))
    return table, paired


def paired_on_common_seeds(runs, out, ref_runs, ref_out):
    """runs' output `out` - ref_runs' output `ref_out`, per case averaged over the seeds both have (None if they
    share no seed or an output is missing); the seeds are in the result, e.g. "0,1"."""
    seeds = sorted({r["seed"] for r in runs} & {r["seed"] for r in ref_runs})
    a = case_means([r for r in runs if r["seed"] in seeds], out)  # {} when no seed is shared
    b = case_means([r for r in ref_runs if r["seed"] in seeds], ref_out)
    if not (a and b):
        return None
    return {**paired_difference(a, b), "seeds": ",".join(map(str, seeds))}


def case_means(runs, out) -> dict:
    """Per test case: the mean Dice of one output over the given runs (seeds); cases without a Dice left out."""
    import numpy as np
    cases = {}
    for run_ in runs:
        for o, cs in run_["per_case"].items():
            if output_key(o) == out:
                for c, m in cs.items():
                    if m["dice"] is not None:
                        cases.setdefault(c, []).append(m["dice"])
    return {c: float(np.mean(v)) for c, v in cases.items()}


def paired_against_smms(groups) -> dict:
    """SMMS - variant, per output, per case averaged over the seeds both rows have at that fraction and length."""
    paired = {}
    for (fraction, row, its), runs in groups.items():
        smms_runs = groups.get((fraction, SMMS_REFERENCE, its), [])
        if row in (SMMS_REFERENCE, PLAIN_REFERENCE, "nnU-Net all labels") or not smms_runs:
            continue
        for out in ("fused", "T1ce", "T2"):
            pair = paired_on_common_seeds(smms_runs, out, runs, out)
            if pair:
                paired[f"{fraction}% | SMMS - {row} {out}, seeds {pair['seeds']} | {its} it"] = pair
    return paired


def paired_difference(values: dict, reference: dict) -> dict:
    """values - reference per case (the cases both have): mean difference, cases better, Wilcoxon signed-rank p
    (None below 5 cases or when every difference is 0) and the per-case differences."""
    import numpy as np
    from scipy.stats import wilcoxon
    cases = sorted(set(values) & set(reference))
    diff = [values[c] - reference[c] for c in cases]
    p = float(wilcoxon(diff).pvalue) if len(diff) >= 5 and any(d != 0 for d in diff) else None
    return {"mean_diff_dice": float(np.mean(diff)), "n_cases": len(cases), "n_better": int(sum(d > 0 for d in diff)),
            "wilcoxon_p": p, "per_case": dict(zip(cases, diff))}


def format_table(table, paired) -> str:
    lines = ["| fraction | row | iterations | seeds | fused Dice % | T1ce branch | T2 branch | fused ASD mm | "
             "train s/run |", "|---|---|---|---|---|---|---|---|---|"]

    def ms(e, key, scale):
        if e is None or e[key + "_mean"] is None:
            return "-"
        sd = e[key + "_std"]
        return f"{e[key + '_mean'] * scale:.1f} +- {sd * scale:.1f}" if sd is not None else f"{e[key + '_mean'] * scale:.1f}"
    for name, e in table.items():
        fraction, row, its = [s.strip() for s in name.split("|")]
        o = e["outputs"]
        lines.append(f"| {fraction} | {row} | {its.split()[0]} | {len(e['seeds'])} | {ms(o.get('fused'), 'dice', 100)} "
                     f"| {ms(o.get('T1ce'), 'dice', 100)} | {ms(o.get('T2'), 'dice', 100)} | "
                     f"{ms(o.get('fused'), 'asd', 1)} | {e['train_seconds_mean']:.0f} |")
    lines += ["", "| paired per test case (seed means) | mean Dice diff (points) | better on | Wilcoxon p |",
              "|---|---|---|---|"]
    for name, p in paired.items():
        pv = "-" if p["wilcoxon_p"] is None else f"{p['wilcoxon_p']:.3f}"
        lines.append(f"| {name} | {100 * p['mean_diff_dice']:+.1f} | {p['n_better']}/{p['n_cases']} | {pv} |")
    return "\n".join(lines) + "\n"


def figures(records, out_dir: Path, stem: str):
    """Learning curves (validation pseudo Dice per epoch, mean over seeds; fused and per branch) and a box plot
    of the fused test Dice per row."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    out_dir.mkdir(parents=True, exist_ok=True)
    fractions = sorted({r["fraction"] for r in records})
    fig, axes = plt.subplots(2, len(fractions), figsize=(7 * len(fractions), 8), squeeze=False)
    for j, fraction in enumerate(fractions):
        groups = {}
        for r in records:
            if r["fraction"] == fraction:
                groups.setdefault((r["row"], r["iterations"]), []).append(r)
        colors = plt.get_cmap("tab20").colors  # tab10 repeats its colours past 10 rows
        for g, ((row, its), runs) in enumerate(groups.items()):
            label = row if len({x["iterations"] for x in records}) == 1 else f"{row} ({its} it)"
            for i, (key, title) in enumerate((("mean_fg_dice", "validation pseudo Dice (fused)"),
                                               ("train_losses", "training loss"))):
                mean, n_runs = mean_curve([x["curve"] for x in runs], key)
                if mean is None:
                    continue
                x = (np.arange(len(mean)) + 1) * ITERS_PER_EPOCH
                line, = axes[i][j].plot(x, mean, color=colors[g % len(colors)], label=f"{label} (n={n_runs})")
                if key == "mean_fg_dice" and row == SMMS_REFERENCE:
                    for bkey, style in (("mean_fg_dice_a", ":"), ("mean_fg_dice_b", "--")):
                        bmean, _ = mean_curve([x_["curve"] for x_ in runs], bkey)
                        if bmean is not None:
                            m = min(len(x), len(bmean))
                            axes[i][j].plot(x[:m], bmean[:m], style, color=line.get_color(),
                                            label=f"{label} branch {'a (T1ce)' if bkey.endswith('a') else 'b (T2)'}")
                axes[i][j].set_title(f"{fraction} % labeled: {title}")
                axes[i][j].set_xlabel("iteration")
        for i in range(2):
            axes[i][j].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / f"{stem}_curves.png", dpi=90)
    plt.close(fig)
    fig, axes = plt.subplots(1, len(fractions), figsize=(7 * len(fractions), 4.5), squeeze=False)
    for j, fraction in enumerate(fractions):
        labels, data = [], []
        for row in ROWS:
            for its in sorted({r["iterations"] for r in records}):
                vals = [d for r in records if r["row"] == row and r["fraction"] == fraction and
                        r["iterations"] == its for d in fused_dice(r)]
                if vals:
                    labels.append(f"{row}\n{its} it")
                    data.append(vals)
        if data:
            axes[0][j].boxplot(data)
            axes[0][j].set_xticks(range(1, len(labels) + 1), labels, rotation=60, fontsize=7)
        axes[0][j].set_title(f"{fraction} % labeled: fused test Dice % (cases x seeds)")
    fig.tight_layout()
    fig.savefig(out_dir / f"{stem}_dice_box.png", dpi=90)
    plt.close(fig)
    length_figure(records, out_dir, stem)


def length_figure(records, out_dir: Path, stem: str):
    """Fused test Dice (mean over the test cases) against the number of training iterations, one line per seed,
    for every (fraction, row) trained at more than one length."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    points = {}  # (fraction, row) -> seed -> iterations -> mean fused test Dice
    for r in records:
        f = fused_dice(r)
        if f:
            points.setdefault((r["fraction"], r["row"]), {}).setdefault(r["seed"], {})[r["iterations"]] = np.mean(f)
    points = {k: v for k, v in points.items() if len({i for by_its in v.values() for i in by_its}) > 1}
    if not points:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    all_its = set()
    for (fraction, row), by_seed in sorted(points.items(), key=lambda kv: (kv[0][0], list(ROWS).index(kv[0][1]))):
        color = None
        for seed, by_its in sorted(by_seed.items()):
            its = sorted(by_its)
            all_its.update(its)
            line, = ax.plot(its, [by_its[i] for i in its], "o-", color=color, alpha=0.9 if len(its) > 1 else 0.4,
                            label=f"{row}, {fraction} % labeled" if color is None else None)
            color = line.get_color()
            ax.annotate(f"s{seed}", (its[-1], by_its[its[-1]]), fontsize=6, color=color)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(all_its), [str(i) for i in sorted(all_its)])
    ax.minorticks_off()
    ax.set_xlabel("training iterations (each point a separate run with nnU-Net's poly LR over its length)")
    ax.set_ylabel("fused test Dice % (mean over test cases)")
    ax.set_title("test Dice vs training length (one line per seed, sN = seed N)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / f"{stem}_length.png", dpi=90)
    plt.close(fig)


def restore_records(root: Path, report_json: Path) -> list:
    """Write the runs of an earlier report (its JSON's "runs", per-case metrics and curves) into root/runs as
    finished runs, so that on a fresh machine (an empty --root) new runs join the earlier ones in one report
    instead of replacing it. Runs already under root are kept as they are. Returns the run ids written."""
    report = json.loads(Path(report_json).read_text(encoding="utf-8"))
    if "runs" not in report:
        raise SystemExit(f"--restore-from {report_json}: no 'runs' in it; give a JSON this script wrote "
                         "(e.g. benchmarks/results/accuracy_2d.json)")
    written = []
    for r in report["runs"]:
        missing = [k for k in ("row", "fraction", "seed", "iterations", "per_case") if k not in r]
        if missing:
            raise SystemExit(f"--restore-from {report_json}: a run lacks {missing}; give a JSON this script wrote")
        rid = run_id(r["row"], r["fraction"], r["seed"], r["iterations"])
        record_file = root / "runs" / rid / "record.json"
        if record_file.is_file():
            continue
        record_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = record_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({**r, "restored_from": str(report_json)}))
        os.replace(tmp, record_file)
        written.append(rid)
    return written


def finished_records(root: Path, records) -> list:
    """`records` (this call's runs, in plan order) plus every other finished run of a known row under root/runs,
    so that a call with a few --rows rewrites the report of the whole work folder, not of those rows alone."""
    seen = {run_id(r["row"], r["fraction"], r["seed"], r["iterations"]) for r in records}
    others = []
    for rec_file in sorted((root / "runs").glob("*/record.json")):
        r = json.loads(rec_file.read_text())
        if r.get("row") in ROWS and run_id(r["row"], r["fraction"], r["seed"], r["iterations"]) not in seen:
            others.append(r)
    return list(records) + others


def write_report(root, records, split, settings, t_start, out_json, fig_dir):
    records = finished_records(root, records)
    table, paired = summarize(records, split) if records else ({}, {})
    text = format_table(table, paired)
    result = {"machine": machine_info(), "command": "python benchmarks/bench_accuracy_2d.py " + " ".join(sys.argv[1:]),
              "settings": settings, "split": split, "table": table, "paired": paired,
              "runs": [{k: v for k, v in r.items() if k != "curve"} | {"curve": r["curve"]} for r in records],
              "session_seconds": round(time.perf_counter() - t_start, 1),
              "total_train_seconds": round(sum(r["train_seconds"] + r["eval_seconds"] for r in records), 1)}
    write_result(out_json, result)
    if records:
        figures(records, fig_dir, out_json.stem)
    (root / f"{out_json.stem}_table.md").write_text(text)
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=str(REPO.parent / "smms_bench_2d"), help="work folder (kept; resumable)")
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows of: " + ", ".join(ROWS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--fractions", default="5,10", help="labeled fractions: 5 (2 cases) and/or 10 (4 cases)")
    p.add_argument("--iterations", type=int, default=600, help="training iterations of every run")
    p.add_argument("--val-iterations", type=int, default=10)
    p.add_argument("--no-length-check", action="store_true",
                   help="skip the nnU-Net and SMMS runs at twice the iterations (seed 0, first fraction)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dry-run", action="store_true",
                   help="CI-sized: 8 mm, 1 seed x 1 fraction x rows nnU-Net,SMMS, 4 iterations (the code path only)")
    p.add_argument("--report-only", action="store_true", help="rewrite the JSON, table and figures; train nothing")
    p.add_argument("--out", default=None, help="JSON (default benchmarks/results/accuracy_2d.json)")
    p.add_argument("--restore-from", default=None, metavar="JSON",
                   help="first write the runs of an earlier report (e.g. benchmarks/results/accuracy_2d.json) into "
                        "--root as finished runs: on a fresh machine new runs then join them in one report")
    args = p.parse_args(argv)
    spacing = SPACING
    if args.dry_run:
        spacing, args.rows, args.seeds, args.fractions = (8.0, 8.0, 8.0), "nnU-Net,SMMS", "0", "5"
        args.iterations, args.val_iterations, args.no_length_check = 4, 1, True
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; known: {list(ROWS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    fractions = [int(f) for f in args.fractions.split(",")]
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    if args.restore_from:
        restored = restore_records(root, Path(args.restore_from))
        print(f"restored {len(restored)} finished runs from {args.restore_from} into {root / 'runs'}", flush=True)
    out_json = Path(args.out) if args.out else RESULTS / ("accuracy_2d_dry_run.json" if args.dry_run
                                                          else "accuracy_2d.json")
    fig_dir = out_json.parent / "figures"
    t_start = time.perf_counter()
    split = fixed_split(all_cases())
    settings = {"spacing_mm": spacing, "configuration": CONFIG, "iterations": args.iterations,
                "iterations_per_epoch": ITERS_PER_EPOCH, "val_iterations": args.val_iterations, "seeds": seeds,
                "fractions": fractions, "rows": {r: ROWS[r][:2] for r in rows}, "split_seed": SPLIT_SEED,
                "tta": False, "device": args.device}
    runs = plan_runs(rows, fractions, seeds, args.iterations, not args.no_length_check)
    datasets = {} if args.report_only else prepare(root, split, fractions, spacing)
    if not args.report_only:
        plans = json.loads((root / "preprocessed" / datasets[fractions[0]].name / "nnUNetPlans.json").read_text())
        c = plans["configurations"][CONFIG]
        settings.update(batch_size=c["batch_size"], patch_size=c["patch_size"])
        print(f"plans: 2d patch {c['patch_size']}, batch {c['batch_size']} (+ as many unlabeled for SSL rows)",
              flush=True)
    records = []
    for k, (row, fraction, seed, its) in enumerate(runs, 1):
        if args.report_only:
            break  # write_report reads every finished run under root/runs
        done = (root / "runs" / run_id(row, fraction, seed, its) / "record.json").is_file()
        t0 = time.perf_counter()
        print(f"[{k}/{len(runs)}] {row}, {fraction} % labeled, seed {seed}, {its} iterations"
              + (": done before" if done else ": training ..."), flush=True)
        record = do_run(root, datasets, row, fraction, seed, its, args.val_iterations, args.device)
        records.append(record)
        f = fused_dice(record)
        if not done:
            print(f"[{k}/{len(runs)}] {row}: {time.perf_counter() - t0:.0f} s, fused test Dice "
                  f"{sum(f) / len(f):.1f} %", flush=True)
            write_report(root, records, split, settings, t_start, out_json, fig_dir)
    text = write_report(root, records, split, settings, t_start, out_json, fig_dir)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
