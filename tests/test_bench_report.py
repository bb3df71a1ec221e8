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
    smms = r["paired"]["5% | SMMS fused - nnU-Net | 600 it"]
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
