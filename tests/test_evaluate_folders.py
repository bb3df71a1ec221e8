"""``nnunetv2_smms evaluate`` on prediction folders: real BraTS references with made-up predictions (CSV, JSON,
table, figures), and bad input on small synthetic volumes."""
import argparse
import contextlib
import csv
import io
import json
import math
import os
import warnings

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_smms.evaluation.evaluate import register
from nnunetv2_smms.evaluation.metrics import EmptySegmentationWarning, binary_metrics

BRATS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "brats18")
N_CASES = 3


def run_cli(argv):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["evaluate"] + [str(a) for a in argv])
    return args.func(args)


def write_like(array, template: sitk.Image, path):
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.CopyInformation(template)
    sitk.WriteImage(image, str(path), True)


def write_dataset_json(root, channel_names=("T1ce", "T2")):
    with open(root / "dataset.json", "w") as f:
        json.dump({"channel_names": {str(i): n for i, n in enumerate(channel_names)},
                   "labels": {"background": 0, "tumor": 1}, "numTraining": 0, "file_ending": ".nii.gz"}, f)


@pytest.fixture(scope="module")
def brats_folders(tmp_path_factory):
    """labelsTs: whole tumor of real BraTS cases; imagesTs: links to their T1ce and T2; prediction folders:
    Shift/T1ce (moved 2 voxels), Blob/T2 (plus a far-away cube), Copy/fused, Miss/fused (first case empty)."""
    root = tmp_path_factory.mktemp("brats_eval")
    folders = {name: root / name for name in ("labelsTs", "imagesTs", "shift", "blob", "copy", "miss")}
    for folder in folders.values():
        folder.mkdir()
    write_dataset_json(root)
    cases = sorted(os.listdir(BRATS))[:N_CASES]
    arrays = {}
    for i, case in enumerate(cases):
        template = sitk.ReadImage(os.path.join(BRATS, case, f"{case}_seg.nii.gz"))
        ref = sitk.GetArrayFromImage(template) > 0
        blob = ref.copy()
        blob[10:20, 10:20, 10:20] = True
        arrays[case] = {"ref": ref, "shift": np.roll(ref, 2, axis=2), "blob": blob, "copy": ref,
                        "miss": np.zeros_like(ref) if i == 0 else ref}
        for name, array in arrays[case].items():
            write_like(array, template, folders["labelsTs" if name == "ref" else name] / f"{case}.nii.gz")
        for channel, modality in enumerate(("t1ce", "t2")):
            os.symlink(os.path.abspath(os.path.join(BRATS, case, f"{case}_{modality}.nii.gz")),
                       folders["imagesTs"] / f"{case}_{channel:04d}.nii.gz")
    return root, folders, cases, arrays


@pytest.fixture(scope="module")
def evaluated(brats_folders):
    root, folders, cases, arrays = brats_folders
    out = root / "out"
    stdout = io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(stdout):
        warnings.simplefilter("always")
        code = run_cli(["-r", folders["labelsTs"], "-i", folders["imagesTs"], "-o", out, "-np", 1,
                        "--n-figure-cases", 2,
                        "--pred", "Shift", "T1ce", folders["shift"], "--pred", "Blob", "T2", folders["blob"],
                        "--pred", "Copy", "fused", folders["copy"], "--pred", "Miss", "fused", folders["miss"]])
    assert code == 0
    return out, stdout.getvalue(), caught, cases, arrays


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_per_case_csv(evaluated):
    out, _, _, cases, arrays = evaluated
    rows = read_csv(out / "metrics_per_case.csv")
    assert len(rows) == N_CASES * 4
    assert {(r["method"], r["output"]) for r in rows} == {("Shift", "T1ce"), ("Blob", "T2"), ("Copy", "fused"),
                                                          ("Miss", "fused")}
    assert {r["region"] for r in rows} == {"1"}
    for r in [r for r in rows if r["case"] == cases[1]]:
        expected = binary_metrics(arrays[r["case"]][r["method"].lower()], arrays[r["case"]]["ref"], (1, 1, 1))
        for name in ("dice", "asd", "assd", "hd95", "volume_pred_ml", "volume_ref_ml"):
            assert float(r[name]) == pytest.approx(expected[name], nan_ok=True), (r["method"], name)
    blob = [r for r in rows if r["method"] == "Blob"][0]
    assert float(blob["asd"]) > 0  # the extra cube's surface is far from the reference: ASD is pred -> ref
    copy = [r for r in rows if r["method"] == "Copy"]
    assert all(float(r["dice"]) == 1.0 and float(r["hd95"]) == 0.0 for r in copy)


def test_empty_prediction_is_nan_warned_and_counted(evaluated):
    out, stdout, caught, cases, _ = evaluated
    rows = [r for r in read_csv(out / "metrics_per_case.csv") if r["method"] == "Miss"]
    first = [r for r in rows if r["case"] == cases[0]][0]
    assert first["empty"] == "prediction" and float(first["dice"]) == 0.0 and math.isnan(float(first["asd"]))
    messages = [str(w.message) for w in caught if issubclass(w.category, EmptySegmentationWarning)]
    assert len(messages) == 1 and cases[0] in messages[0]
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    miss = summary["results"]["Miss"]["fused"]["1"]
    assert miss["asd"]["n"] == N_CASES - 1 and miss["asd"]["n_nan"] == 1
    assert miss["asd"]["mean"] == 0.0 and miss["dice"]["mean"] == pytest.approx((N_CASES - 1) / N_CASES)
    assert miss["empty"] == {"both": 0, "prediction": 1, "reference": 0}
    assert "Miss / fused: 1 of 3 cases have exactly one empty mask" in stdout


def test_summary_json_matches_the_csv(evaluated):
    out, _, _, cases, _ = evaluated
    rows = read_csv(out / "metrics_per_case.csv")
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["cases"] == cases and summary["regions"] == {"1": "1 (tumor)"}
    assert set(summary["definitions"]) >= {"dice", "asd", "assd", "hd95", "empty"}
    for method, output in (("Shift", "T1ce"), ("Blob", "T2")):
        values = np.array([float(r["hd95"]) for r in rows if (r["method"], r["output"]) == (method, output)])
        stats = summary["results"][method][output]["1"]["hd95"]
        assert stats["mean"] == pytest.approx(values.mean())
        assert stats["std"] == pytest.approx(values.std(ddof=1))
        assert stats["median"] == pytest.approx(np.median(values)) and stats["n"] == N_CASES


def test_paper_style_table(evaluated):
    out, stdout, _, _, _ = evaluated
    table = (out / "table.md").read_text(encoding="utf-8")
    assert table in stdout
    lines = table.splitlines()
    header = [c.strip() for c in lines[2].strip("|").split("|")]
    assert header == ["Method", "DSC (%) T1ce", "DSC (%) T2", "DSC (%) fused",
                      "ASD (mm) T1ce", "ASD (mm) T2", "ASD (mm) fused"]
    copy = [c.strip() for c in [line for line in lines if line.startswith("| Copy")][0].strip("|").split("|")]
    assert copy == ["Copy", "-", "-", "100.00 ± 0.00", "-", "-", "0.00 ± 0.00"]


def test_figures_are_written(evaluated):
    import matplotlib.image

    out, _, _, _, _ = evaluated
    cases_png = matplotlib.image.imread(out / "figures" / "cases.png")
    box_png = matplotlib.image.imread(out / "figures" / "dice_boxplot.png")
    assert box_png.std() > 0
    # 2 cases x (2 modalities + 4 predictions) panels, with red prediction and green reference contours
    assert cases_png.shape[1] > 2 * cases_png.shape[0]
    red = (cases_png[..., 0] > 0.8) & (cases_png[..., 1] < 0.3) & (cases_png[..., 2] < 0.3)
    green = (cases_png[..., 1] > 0.8) & (cases_png[..., 0] < 0.3) & (cases_png[..., 2] < 0.3)
    assert red.sum() > 100 and green.sum() > 100
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


# ------------------------------------------------------------------------------------------ synthetic input

@pytest.fixture
def small(tmp_path):
    """Two cases of 16^3 at spacing (x, y, z) = (1, 1, 3) mm: a reference cube and a prediction moved along z."""
    for name in ("labelsTs", "pred"):
        (tmp_path / name).mkdir()
    write_dataset_json(tmp_path)
    template = sitk.Image(16, 16, 16, sitk.sitkUInt8)
    template.SetSpacing((1.0, 1.0, 3.0))
    ref = np.zeros((16, 16, 16), bool)
    ref[4:10, 4:10, 4:10] = True
    for case in ("a", "b"):
        write_like(ref, template, tmp_path / "labelsTs" / f"{case}.nii.gz")
        write_like(np.roll(ref, 1, axis=0), template, tmp_path / "pred" / f"{case}.nii.gz")
    return tmp_path, template, ref


def run_small(root, *extra):
    return run_cli(["-r", root / "labelsTs", "-o", root / "out", "-np", 1, "--pred", "M", "fused", root / "pred",
                    *extra])


def test_spacing_comes_from_the_header_in_array_axis_order(small, capsys):
    root, _, ref = small
    assert run_small(root) == 0
    rows = read_csv(root / "out" / "metrics_per_case.csv")
    assert float(rows[0]["hd95"]) == pytest.approx(3.0)  # one voxel along z is 3 mm
    assert float(rows[0]["volume_ref_ml"]) == pytest.approx(6 ** 3 * 3 / 1000)
    assert "figures/cases.png" not in capsys.readouterr().out  # no images given: box plot only
    first = (root / "out" / "metrics_per_case.csv").read_text(encoding="utf-8")
    assert run_small(root, "-np", 2) == 0  # a process pool gives the same rows
    assert (root / "out" / "metrics_per_case.csv").read_text(encoding="utf-8") == first


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    from nnunetv2_smms.evaluation.report import atomic_path, write_text

    target = tmp_path / "table.md"
    write_text("old\n", target)
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write("half")
            raise RuntimeError("interrupted")
    assert target.read_text(encoding="utf-8") == "old\n" and [p.name for p in tmp_path.iterdir()] == ["table.md"]


def test_labels_and_regions_from_the_command_line(small):
    root, _, _ = small
    os.remove(root / "dataset.json")
    assert run_small(root, "-l", "1", "0,1", "2") == 0
    rows = read_csv(root / "out" / "metrics_per_case.csv")
    assert [r["region"] for r in rows] == ["1", "(0, 1)", "2"] * 2
    absent = [r for r in rows if r["region"] == "2"]  # in neither file: both empty, a perfect match, said so
    assert all(r["empty"] == "both" and float(r["dice"]) == 1.0 and float(r["asd"]) == 0.0 for r in absent)
    assert "M / fused: 2 of 2 cases have both masks empty" in (root / "out" / "table.md").read_text(encoding="utf-8")


def test_missing_dataset_json_and_labels_is_an_error(small, capsys):
    root, _, _ = small
    os.remove(root / "dataset.json")
    assert run_small(root) == 2
    assert capsys.readouterr().err.startswith("error: no dataset.json")


def test_geometry_mismatch_names_case_and_file(small, capsys):
    root, template, ref = small
    other = sitk.Image(template)
    other.SetSpacing((1.0, 1.0, 2.0))
    write_like(ref, other, root / "pred" / "b.nii.gz")
    assert run_small(root) == 2
    err = capsys.readouterr().err
    assert "case b" in err and os.path.join("pred", "b.nii.gz") in err and "spacing" in err
    assert not (root / "out" / "metrics_per_case.csv").exists()


def test_shape_mismatch_is_an_error(small, capsys):
    root, _, _ = small
    write_like(np.zeros((16, 16, 12)), sitk.Image(12, 16, 16, sitk.sitkUInt8), root / "pred" / "a.nii.gz")
    assert run_small(root) == 2
    assert "case a" in capsys.readouterr().err


def test_missing_prediction_is_an_error(small, capsys):
    root, _, _ = small
    os.remove(root / "pred" / "b.nii.gz")
    assert run_small(root) == 2
    err = capsys.readouterr().err
    assert "M / fused: 1 of 2 reference cases have no prediction" in err and "b.nii.gz" in err


def test_undeclared_label_value_is_an_error(small, capsys):
    root, template, ref = small
    write_like(ref * 7, template, root / "pred" / "a.nii.gz")
    assert run_small(root) == 2
    err = capsys.readouterr().err
    assert "case a" in err and "[7]" in err and os.path.join("pred", "a.nii.gz") in err


def test_model_without_images_and_no_source_are_errors(small, capsys):
    root, _, _ = small
    assert run_cli(["-r", root / "labelsTs", "-o", root / "out"]) == 2
    assert "at least one" in capsys.readouterr().err
    assert run_cli(["-r", root / "labelsTs", "-o", root / "out", "-m", root / "model"]) == 2
    assert "-i" in capsys.readouterr().err
    assert run_cli(["-r", root / "labelsTs", "-o", root / "out", "-i", root, "-m", root / "model"]) == 2
    assert "plans.json not found" in capsys.readouterr().err
