"""The protocol's report covers the whole work folder: a call that trains a few --rows (or another --iterations)
must not drop the finished runs of earlier calls from the JSON and table, and a row trained at two lengths gets
the test-Dice-against-length figure. Fast: records are written by hand, nothing is trained."""
import json
import sys
import time

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_accuracy_2d as protocol  # noqa: E402

CASES = [f"case{i}" for i in range(6)]


def record(row, seed, iterations, dice):
    return {"row": row, "fraction": 5, "seed": seed, "iterations": iterations, "trainer": "t", "fold": 0,
            "train_seconds": 1.0, "eval_seconds": 1.0, "model": "m",
            "per_case": {"fused": {c: {"dice": dice + 0.01 * i, "asd": 1.0} for i, c in enumerate(CASES)}},
            "curve": {"mean_fg_dice": [0.1, 0.2], "train_losses": [0.0, -0.1]}}


def write_run(root, rec):
    d = root / "runs" / protocol.run_id(rec["row"], rec["fraction"], rec["seed"], rec["iterations"])
    d.mkdir(parents=True)
    (d / "record.json").write_text(json.dumps(rec))


def test_report_keeps_earlier_runs_and_draws_length(tmp_path):
    root = tmp_path / "w"
    for seed in (0, 1):
        write_run(root, record("nnU-Net", seed, 600, 0.70))
        write_run(root, record("SMMS", seed, 600, 0.75))
    write_run(root, record("nnU-Net", 0, 1200, 0.78))
    write_run(root, record("SMMS ModalityDropout", 0, 600, 0.5))  # another benchmark's row in the same folder
    this_call = [record("nnU-Net all labels", 0, 600, 0.72)]
    out = tmp_path / "results" / "acc.json"
    protocol.write_report(root, this_call, {"test": CASES}, {}, time.perf_counter(), out, tmp_path / "figures")
    r = json.loads(out.read_text())
    assert set(r["table"]) == {"5% | nnU-Net | 600 it", "5% | nnU-Net | 1200 it", "5% | SMMS | 600 it",
                               "5% | nnU-Net all labels | 600 it"}
    assert r["table"]["5% | nnU-Net | 600 it"]["seeds"] == [0, 1]
    assert r["runs"][0]["row"] == "nnU-Net all labels"  # this call's runs first
    smms = r["paired"]["5% | SMMS fused - nnU-Net, seeds 0,1 | 600 it"]
    assert abs(smms["mean_diff_dice"] - 0.05) < 1e-9 and smms["n_better"] == 6
    assert "SMMS ModalityDropout" not in (run_["row"] for run_ in r["runs"])
    assert (tmp_path / "figures" / "acc_length.png").stat().st_size > 5000
    assert "nnU-Net | 1200" in (root / "acc_table.md").read_text()


def test_no_length_figure_for_one_length(tmp_path):
    root = tmp_path / "w"
    write_run(root, record("nnU-Net", 0, 600, 0.70))
    out = tmp_path / "acc.json"
    protocol.write_report(root, [], {"test": CASES}, {}, time.perf_counter(), out, tmp_path / "figures")
    assert (tmp_path / "figures" / "acc_curves.png").is_file()
    assert not (tmp_path / "figures" / "acc_length.png").exists()


def write_metrics_csv(path, rows):
    import csv
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["method", "output", "case", "region", "dice"])
        w.writeheader()
        w.writerows(rows)


def test_compare_paired_against_plain_nnunet(tmp_path):
    import bench_compare_2d as table1
    ref = [0.70, 0.60, 0.80, 0.50, 0.65, 0.75]
    rows = [{"method": table1.REFERENCE, "output": "fused", "case": c, "region": "1", "dice": d}
            for c, d in zip(CASES, ref)]
    rows += [{"method": "nnUNetTrainerSMMS", "output": "fused", "case": c, "region": "1", "dice": d + 0.05}
             for c, d in zip(CASES, ref)]
    rows += [{"method": "nnUNetTrainerSMMS", "output": "a (T1ce)", "case": c, "region": "1",
              "dice": d - 0.02 if i < 4 else d + 0.01} for i, (c, d) in enumerate(zip(CASES, ref))]
    rows += [{"method": "nnUNetTrainerCPS", "output": "fused", "case": c, "region": "1", "dice": d}
             for c, d in zip(CASES[:5], ref)]  # one case without a prediction: paired over the other five
    write_metrics_csv(tmp_path / "m.csv", rows)
    paired = table1.paired_against_reference(table1.read_dice(tmp_path / "m.csv"))
    smms = paired[f"nnUNetTrainerSMMS fused - {table1.REFERENCE}"]
    assert abs(smms["mean_diff_dice"] - 5.0) < 1e-9 and smms["n_better"] == 6 and smms["n_cases"] == 6
    assert abs(smms["mean"] - (100 * sum(ref) / 6 + 5)) < 1e-9
    assert 0 < smms["wilcoxon_p"] < 0.05
    branch = paired[f"nnUNetTrainerSMMS a (T1ce) - {table1.REFERENCE}"]
    assert branch["n_better"] == 2 and abs(branch["mean_diff_dice"] - (-8 + 2) / 6) < 1e-9
    cps = paired[f"nnUNetTrainerCPS fused - {table1.REFERENCE}"]
    assert cps["n_cases"] == 5 and cps["wilcoxon_p"] is None  # every difference 0: no test
    assert not any(k.startswith(table1.REFERENCE) for k in paired)
    md = table1.format_paired(paired)
    assert "| nnUNetTrainerSMMS | fused | " in md and "+5.0 | 6/6 |" in md


def test_compare_seed_folders(tmp_path):
    import bench_compare_2d as table1
    assert table1.results_folder(tmp_path, 0) == tmp_path / "compare_results"  # the first runs' name is kept
    assert len({table1.results_folder(tmp_path, s) for s in (0, 1, 2)}) == 3
    # another length at the same seed never meets the 600-it runs (compare would refuse their schedule)
    folders = {table1.results_folder(tmp_path, s, n) for s in (0, 1) for n in (600, 1200)}
    assert len(folders) == 4 and tmp_path / "compare_results" in folders


def compare_result(seed, iterations, per_case_dice):
    return {"benchmark": "compare_2d", "seed": seed, "iterations": iterations, "per_case_dice": per_case_dice}


def test_compare_aggregate_pairs_seed_means_with_nnunet():
    """Seeds together: per case, the method's mean over its seeds minus nnU-Net's mean over the same seeds; a
    method run at one seed only is paired with nnU-Net's run at that seed, not with its mean over all seeds."""
    import bench_compare_2d as table1
    ref = table1.REFERENCE
    base = dict(zip(CASES, [70.0, 60.0, 80.0, 50.0, 65.0, 75.0]))
    shift = lambda d, x: {c: v + x for c, v in d.items()}  # noqa: E731
    part_a0 = compare_result(0, 1200, {ref: {"fused": base}, "nnUNetTrainerSMMS": {"fused": shift(base, 4)}})
    part_b0 = compare_result(0, 1200, {ref: {"fused": base}, "nnUNetTrainerCPS": {"fused": shift(base, -1)}})
    seed1 = compare_result(1, 1200, {ref: {"fused": shift(base, 10)}, "nnUNetTrainerSMMS": {"fused": shift(base, 12)}})
    agg = table1.aggregate([part_a0, part_b0, seed1])
    rows = agg["rows"]
    assert agg["seeds"] == [0, 1] and agg["iterations"] == 1200
    nn = rows[f"{ref} | fused"]
    assert nn["seeds"] == [0, 1] and abs(nn["dice_mean"] - (sum(base.values()) / 6 + 5)) < 1e-9
    assert nn["n"] == 12 and "paired" not in nn  # the same run met twice at seed 0 counts once
    smms = rows["nnUNetTrainerSMMS | fused"]
    assert smms["paired_seeds"] == [0, 1] and abs(smms["paired"]["mean_diff_dice"] - 3.0) < 1e-9  # (4 + 2) / 2
    assert smms["paired"]["n_better"] == 6 and smms["paired"]["n_cases"] == 6
    cps = rows["nnUNetTrainerCPS | fused"]
    assert cps["paired_seeds"] == [0] and abs(cps["paired"]["mean_diff_dice"] + 1.0) < 1e-9  # not -6 (seed 1's 10)
    # a retrained nnU-Net run at seed 0 (another machine) weighs as much as the run met twice, not a third
    part_c0 = compare_result(0, 1200, {ref: {"fused": shift(base, 3)}, "nnUNetTrainerEntropyMin": {"fused": base}})
    again = table1.aggregate([part_a0, part_b0, part_c0])["rows"]
    assert abs(again[f"{ref} | fused"]["dice_mean"] - (sum(base.values()) / 6 + 1.5)) < 1e-9
    assert abs(again["nnUNetTrainerEntropyMin | fused"]["paired"]["mean_diff_dice"] + 1.5) < 1e-9
    md = table1.format_aggregate(agg)
    assert "| nnUNetTrainerSMMS | fused | 0,1 |" in md and "+3.0 | 6/6 |" in md and "-1.0 | 0/6 |" in md


def test_compare_aggregate_refuses_mixed_lengths_and_old_results():
    import bench_compare_2d as table1
    import pytest
    ok = compare_result(0, 1200, {table1.REFERENCE: {"fused": {"a": 1.0}}})
    with pytest.raises(SystemExit, match="different lengths"):
        table1.aggregate([ok, compare_result(1, 600, {})])
    with pytest.raises(SystemExit, match="per_case_dice"):
        table1.aggregate([ok, {"seed": 2, "iterations": 1200}])


def test_restore_from_an_earlier_report_joins_new_runs(tmp_path):
    """A fresh machine has an empty work folder: --restore-from puts the committed report's runs back as finished
    runs, so a new row is reported next to them instead of replacing the report."""
    old_root, out = tmp_path / "old", tmp_path / "results" / "acc.json"
    write_run(old_root, record("nnU-Net", 0, 1200, 0.70))
    write_run(old_root, record("SMMS", 0, 1200, 0.75))
    protocol.write_report(old_root, [], {"test": CASES}, {}, time.perf_counter(), out, tmp_path / "figures")
    new_root = tmp_path / "fresh"
    assert sorted(protocol.restore_records(new_root, out)) == ["SMMS__5pct__seed0__1200it",
                                                               "nnU-Net__5pct__seed0__1200it"]
    assert protocol.restore_records(new_root, out) == []  # already there: kept, nothing written twice
    new = [record("SMMS LightMMF", 0, 1200, 0.74)]
    protocol.write_report(new_root, new, {"test": CASES}, {}, time.perf_counter(), out, tmp_path / "figures")
    r = json.loads(out.read_text())
    assert set(r["table"]) == {"5% | nnU-Net | 1200 it", "5% | SMMS | 1200 it", "5% | SMMS LightMMF | 1200 it"}
    assert abs(r["paired"]["5% | SMMS fused - nnU-Net, seeds 0 | 1200 it"]["mean_diff_dice"] - 0.05) < 1e-9
    assert sum(run_["row"] == "SMMS" for run_ in r["runs"]) == 1


def test_restore_from_a_foreign_json_names_it(tmp_path):
    bad = tmp_path / "other.json"
    bad.write_text(json.dumps({"benchmark": "memory"}))
    import pytest
    with pytest.raises(SystemExit, match="other.json"):
        protocol.restore_records(tmp_path / "w", bad)


def test_variants_are_paired_with_smms_on_the_same_seeds(tmp_path):
    """SMMS - ablation per case over the seeds both rows have: an ablation run at seed 1 only is compared with
    SMMS's seed 1, not with SMMS's mean over seeds 0 and 1."""
    root = tmp_path / "w"
    write_run(root, record("SMMS", 0, 1200, 0.60))
    write_run(root, record("SMMS", 1, 1200, 0.80))
    ablation = record("SMMS MMF+MAE", 1, 1200, 0.77)
    ablation["per_case"]["T1ce branch"] = {c: {"dice": 0.5, "asd": 1.0} for c in CASES}
    write_run(root, ablation)
    out = tmp_path / "acc.json"
    protocol.write_report(root, [], {"test": CASES}, {}, time.perf_counter(), out, tmp_path / "figures")
    paired = json.loads(out.read_text())["paired"]
    fused = paired["5% | SMMS - SMMS MMF+MAE fused, seeds 1 | 1200 it"]
    assert abs(fused["mean_diff_dice"] - 0.03) < 1e-9 and fused["n_better"] == 6 and fused["n_cases"] == 6
    assert not any("T1ce" in k for k in paired)  # SMMS's records here have no T1ce output: nothing to pair
    assert "SMMS - SMMS MMF+MAE fused, seeds 1" in (root / "acc_table.md").read_text()


def test_rows_are_paired_with_nnunet_on_the_same_seeds(tmp_path):
    """row - nnU-Net per case over the seeds both have: an ablation run at seeds 0 and 1 is compared with nnU-Net's
    seeds 0 and 1, not with nnU-Net's mean over three seeds; a row sharing no seed with nnU-Net gets no pair."""
    root = tmp_path / "w"
    for seed, dice in ((0, 0.60), (1, 0.70), (2, 0.95)):
        write_run(root, record("nnU-Net", seed, 1200, dice))
    write_run(root, record("SMMS MMF", 0, 1200, 0.62))
    write_run(root, record("SMMS MMF", 1, 1200, 0.74))
    write_run(root, record("SMMS", 3, 1200, 0.80))
    out = tmp_path / "acc.json"
    protocol.write_report(root, [], {"test": CASES}, {}, time.perf_counter(), out, tmp_path / "figures")
    paired = json.loads(out.read_text())["paired"]
    mmf = paired["5% | SMMS MMF fused - nnU-Net, seeds 0,1 | 1200 it"]
    assert abs(mmf["mean_diff_dice"] - 0.03) < 1e-9 and mmf["n_better"] == 6 and mmf["seeds"] == "0,1"
    assert not any(k.startswith("5% | SMMS fused - nnU-Net") for k in paired)
    assert "SMMS MMF fused - nnU-Net, seeds 0,1" in (root / "acc_table.md").read_text()


def test_compare_curves_collect_average_and_redraw(tmp_path):
    """plot_compare_curves: each finished run's curve is read from its checkpoint_final.pth, per seed folder;
    curves are averaged over the seeds a method has (truncated to the shortest); the JSON it writes redraws the
    figures without the runs; no finished run is a clear error naming the root."""
    import pytest
    import torch
    import bench_compare_2d as table1
    import plot_compare_curves as pc
    root = tmp_path / "root"

    def run(seed, trainer, dice, loss):
        fold = (table1.results_folder(root, seed, 1200) / "Dataset621_X" / f"{trainer}__nnUNetPlans__2d" / "fold_0")
        fold.mkdir(parents=True)
        torch.save({"logging": {"mean_fg_dice": dice, "train_losses": loss}}, fold / "checkpoint_final.pth")

    run(0, table1.REFERENCE, [0.2, 0.4, 0.6], [1.0, 0.5, 0.4])
    run(2, table1.REFERENCE, [0.4, 0.6], [0.8, 0.3])
    run(2, "nnUNetTrainerSMMS", [0.5, 0.7], [0.9, 0.2])
    (table1.results_folder(root, 1, 1200) / "Dataset621_X" / "nnUNetTrainerCPS__nnUNetPlans__2d" / "fold_0").mkdir(
        parents=True)  # an unfinished run: no checkpoint_final.pth
    curves = pc.collect(root, 1200, [0, 1, 2])
    assert sorted(curves) == [table1.REFERENCE, "nnUNetTrainerSMMS"]
    assert sorted(curves[table1.REFERENCE]) == ["0", "2"] and list(curves["nnUNetTrainerSMMS"]) == ["2"]
    mean, n = pc.mean_curve(list(curves[table1.REFERENCE].values()), "mean_fg_dice")
    assert n == 2 and [round(v, 6) for v in mean] == [0.3, 0.5]
    out = tmp_path / "out"
    assert pc.main(["--root", str(root), "--iterations", "1200", "--results", str(out)]) == 0
    saved = json.loads((out / "compare_2d_1200it_curves.json").read_text())
    assert saved["curves"]["nnUNetTrainerSMMS"]["2"]["train_losses"] == [0.9, 0.2]
    png = out / "figures" / "compare_2d_1200it_curves.png"
    assert png.stat().st_size > 0
    png.unlink()
    assert pc.main(["--from-json", str(out / "compare_2d_1200it_curves.json"), "--results", str(out)]) == 0
    assert png.exists()
    with pytest.raises(SystemExit, match="no finished run"):
        pc.collect(root, 600, [0])
