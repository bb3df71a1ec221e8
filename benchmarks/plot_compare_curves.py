"""Figures for the Table-1 comparison (bench_compare_2d.py) at one length, over seeds:

1. learning curves per method (validation pseudo Dice and training loss per epoch, mean over the seeds whose runs
   are under --root; SMMS's branches dotted / dashed, every method's in the JSON), read from each run's
   checkpoint_final.pth, and saved with the curves' numbers as JSON, so the figure can be redrawn without the runs;
2. per test case, each method's Dice minus nnU-Net's (seed means, fused output) from the --aggregate JSON.

    python benchmarks/plot_compare_curves.py --root ../smms_bench_2d --iterations 1200 --seeds 0,1,2
    python benchmarks/plot_compare_curves.py --from-json benchmarks/results/compare_2d_1200it_curves.json

Writes benchmarks/results/compare_2d_<N>it_curves.json and results/figures/compare_2d_<N>it_{curves,diff}.png.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, write_result  # noqa: E402
from bench_accuracy_2d import ITERS_PER_EPOCH, mean_curve, read_curve  # noqa: E402
from bench_compare_2d import REFERENCE, default_trainers, length_tag, results_folder  # noqa: E402

SHORT = {"nnUNetTrainerLabeledOnly": "nnU-Net", "nnUNetTrainerEntropyMin": "EM",
         "nnUNetTrainerMeanTeacher": "MT"}
BRANCHES = (("mean_fg_dice_a", ":", "T1ce"), ("mean_fg_dice_b", "--", "T2"))


def short(trainer: str) -> str:
    return SHORT.get(trainer, trainer.replace("nnUNetTrainer", ""))


def collect(root: Path, iterations: int, seeds: list) -> dict:
    """{trainer: {seed: curve}} for every finished run (checkpoint_final.pth) of the given seeds under root."""
    curves = {}
    for seed in seeds:
        folder = results_folder(root, seed, iterations)
        for ckpt in sorted(folder.glob("Dataset*/*__*__*/fold_0/checkpoint_final.pth")):
            trainer = ckpt.parent.parent.name.split("__")[0]
            curves.setdefault(trainer, {})[str(seed)] = read_curve(ckpt)
    if not curves:
        raise SystemExit(f"no finished run (checkpoint_final.pth) under {root} for seeds {seeds} at {iterations} "
                         "iterations: give the --root that bench_compare_2d.py trained into")
    return curves


def plot_curves(curves: dict, path: Path, iterations: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    fig, axes = plt.subplots(1, 2, figsize=(15, 5.5))
    colors = plt.get_cmap("tab20").colors
    for g, (trainer, per_seed) in enumerate(sorted(curves.items(), key=lambda kv: kv[0] != REFERENCE)):
        runs = list(per_seed.values())
        color = colors[g % len(colors)]
        for ax, key in zip(axes, ("mean_fg_dice", "train_losses")):
            mean, _ = mean_curve(runs, key)
            if mean is None:
                continue
            x = (np.arange(len(mean)) + 1) * ITERS_PER_EPOCH
            width = 2.5 if trainer in (REFERENCE, "nnUNetTrainerSMMS") else 1.2
            ax.plot(x, mean, color=color, lw=width, label=f"{short(trainer)} (seeds {','.join(sorted(per_seed))})")
            if key == "mean_fg_dice" and trainer == "nnUNetTrainerSMMS":  # other branched methods: see the JSON
                for bkey, style, name in BRANCHES:
                    bmean, _ = mean_curve(runs, bkey)
                    if bmean is not None:
                        m = min(len(x), len(bmean))
                        ax.plot(x[:m], bmean[:m], style, color=color, lw=1, label=f"{short(trainer)} {name}")
    axes[0].set_title(f"validation pseudo Dice (fused), mean over seeds; {iterations} iterations")
    axes[1].set_title("training loss (each method's own loss), mean over seeds")
    for ax in axes:
        ax.set_xlabel("iteration")
    axes[0].legend(fontsize=6, ncol=2)
    axes[1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_differences(agg: dict, path: Path) -> None:
    """Per test case: method - nnU-Net (fused, seed means), one dot per case, sorted by the mean."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keep = {*default_trainers(), "nnUNetTrainerVerSemi"}  # the Table-1 rows, not the VerSemi ablations
    rows = [r for r in agg["rows"].values() if r["output"] == "fused" and r.get("paired") and r["method"] in keep]
    rows.sort(key=lambda r: -r["paired"]["mean_diff_dice"])
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for i, r in enumerate(rows):
        d = list(r["paired"]["per_case"].values())
        ax.scatter([i] * len(d), d, s=14, color="tab:blue", alpha=0.7)
        ax.scatter([i], [r["paired"]["mean_diff_dice"]], marker="_", s=400, color="black")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([f"{short(r['method'])}\n{len(r['paired_seeds'])} seeds, p={r['paired']['wilcoxon_p']:.2f}"
                        for r in rows], fontsize=7)
    ax.set_ylabel("Dice - nnU-Net (points, per test case)")
    ax.set_title(f"{agg['iterations']} iterations: each method minus nnU-Net per test case (seed means, fused); "
                 "bar = mean")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=None, help="the --root bench_compare_2d.py trained into")
    p.add_argument("--iterations", type=int, default=1200)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--from-json", default=None, help="redraw from a curves JSON this script wrote")
    p.add_argument("--aggregate", default=None,
                   help="the --aggregate JSON (default: results/compare_2d_<N>it_seeds.json)")
    p.add_argument("--results", default=str(RESULTS), help="where the JSON and figures/ go (default: %(default)s)")
    a = p.parse_args(argv)
    out = Path(a.results)
    if a.from_json:
        saved = json.loads(Path(a.from_json).read_text())
        curves, iterations = saved["curves"], saved["iterations"]
    elif a.root:
        iterations = a.iterations
        curves = collect(Path(a.root), iterations, [int(s) for s in a.seeds.split(",")])
        write_result(out / f"compare_2d{length_tag(iterations)}_curves.json",
                     {"iterations": iterations, "iters_per_epoch": ITERS_PER_EPOCH, "curves": curves})
    else:
        raise SystemExit("give --root (the runs) or --from-json (a curves JSON written before)")
    stem = f"compare_2d{length_tag(iterations)}"
    plot_curves(curves, out / "figures" / f"{stem}_curves.png", iterations)
    print(f"wrote {out / 'figures' / f'{stem}_curves.png'}")
    agg_path = Path(a.aggregate) if a.aggregate else RESULTS / f"{stem}_seeds.json"
    if agg_path.exists():
        plot_differences(json.loads(agg_path.read_text()), out / "figures" / f"{stem}_diff.png")
        print(f"wrote {out / 'figures' / f'{stem}_diff.png'}")
    for trainer, per_seed in sorted(curves.items()):
        last = [c["mean_fg_dice"][-1] for c in per_seed.values() if c.get("mean_fg_dice")]
        print(f"{short(trainer):>10}: seeds {','.join(sorted(per_seed))}, final validation pseudo Dice "
              f"{', '.join(f'{v:.3f}' for v in last)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
