"""convert-ct-mr on synthetic CT + MR phantoms whose MR is moved by a known rigid transform, and bad input."""
import filecmp
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_smms.dataset_conversion import ct_mr
from nnunetv2_smms.dataset_conversion.checks import ConversionError

from _conversion_helpers import (ELLIPSOIDS, assert_nothing_written, euler_transform,
                                 make_phantom_patient, registration_error, run_subcommand, write_dicom_series)

# CT points -> MR points, (rotation deg about x, y, z), (translation mm)
TRUTH = {"P01": ((5, -4, 8), (6, -4, 5)), "P02": ((-6, 3, -5), (-8, 5, 3)), "P03": ((3, 7, 2), (4, 6, -7))}
SPLIT = dict(labeled=1, val=1, test=1)
TOLERANCE_MM, TOLERANCE_DEG = 1.0, 1.0


def make_source(folder: Path, cases=("P01", "P02", "P03"), **kwargs) -> Path:
    for seed, case in enumerate(cases):
        make_phantom_patient(folder / case, euler_transform(*TRUTH[case]), seed=seed, **kwargs)
    return folder


def convert(source, root, **kwargs):
    return ct_mr.convert_ct_mr(source, 502, "Phantom", output_root=root, **{**SPLIT, **kwargs})


def manifest_of(dataset: Path) -> dict:
    return json.loads((dataset / "smms_manifest.json").read_text())


def written(dataset: Path, case: str):
    """(CT channel, MR channel, label or None) of a converted case."""
    role = manifest_of(dataset)["cases"][case]["role"]
    images, labels = {"labeled": ("imagesTr", "labelsTr"), "val": ("imagesTr", "labelsTr"),
                      "unlabeled": ("imagesUnlabeled", None), "test": ("imagesTs", "labelsTs")}[role]
    read = lambda p: sitk.ReadImage(str(p))  # noqa: E731
    return (read(dataset / images / f"{case}_0000.nii.gz"), read(dataset / images / f"{case}_0001.nii.gz"),
            read(dataset / labels / f"{case}.nii.gz") if labels else None)


def same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    return (a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing())
            and np.allclose(a.GetOrigin(), b.GetOrigin()) and np.allclose(a.GetDirection(), b.GetDirection()))


def array(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_source(tmp_path_factory.mktemp("patients"))


@pytest.fixture(scope="module")
def dataset(source, tmp_path_factory):
    return convert(source, tmp_path_factory.mktemp("raw"))


# ---------------------------------------------------------------------------------------- registration

def test_registration_recovers_the_known_transform(dataset):
    cases = manifest_of(dataset)["cases"]
    assert sorted(cases) == sorted(TRUTH)
    for case, (rotation, translation) in TRUTH.items():
        recorded = cases[case]["registration"]
        truth = euler_transform(rotation, translation)
        error_mm, error_deg = registration_error(recorded["transform"], truth)
        assert error_mm < TOLERANCE_MM and error_deg < TOLERANCE_DEG, (case, error_mm, error_deg)
        assert recorded["metric"] < ct_mr.Limits().max_metric
        assert abs(recorded["rotation_deg"] - ct_mr.rotation_angle_deg(truth)) < TOLERANCE_DEG


def test_outputs_on_the_ct_grid(dataset, source):
    dataset_json = json.loads((dataset / "dataset.json").read_text())
    assert dataset_json["channel_names"] == {"0": "CT", "1": "T2"}
    assert dataset_json["labels"] == {"background": 0, "tumor": 1}
    assert dataset_json["smms"] == {"branch_a": [0], "branch_b": [1]} and dataset_json["numTraining"] == 2
    tumour_mr, body_mr = ELLIPSOIDS[-1][3], ELLIPSOIDS[0][3]
    for case in TRUTH:
        ct, mr, label = written(dataset, case)
        source_ct = sitk.ReadImage(str(source / case / "ct.nii.gz"))
        assert same_grid(ct, source_ct) and same_grid(mr, source_ct) and same_grid(label, source_ct)
        assert np.array_equal(array(ct), array(source_ct)) and ct.GetPixelID() == source_ct.GetPixelID()
        assert np.array_equal(array(label), array(sitk.ReadImage(str(source / case / "label.nii.gz"))))
        # the resampled MR shows the tumour where the CT-space label is
        inside = array(mr)[array(label) == 1].mean()
        assert abs(inside - tumour_mr) < 0.15 * tumour_mr and inside > 1.5 * body_mr, (case, inside)


def test_same_arguments_give_identical_output(dataset, source, tmp_path):
    again = convert(source, tmp_path)
    files = lambda d: {str(p.relative_to(d)): p for p in sorted(d.rglob("*")) if p.is_file()}  # noqa: E731
    first, second = files(dataset), files(again)
    assert list(first) == list(second)
    assert all(filecmp.cmp(first[name], second[name], shallow=False) for name in first)


def test_mr_grid_with_the_label_drawn_on_ct(tmp_path):
    source = make_source(tmp_path / "src", cases=("P01", "P02"))
    reference = make_source(tmp_path / "ref", cases=("P01", "P02"), label_space="mr")  # same label on MR grid
    dataset = convert(source, tmp_path / "raw", grid="mr", label_space="ct", test=0)
    tumour_ct = ELLIPSOIDS[-1][2]
    for case in ("P01", "P02"):
        ct, mr, label = written(dataset, case)
        source_mr = sitk.ReadImage(str(source / case / "mr.nii.gz"))
        expected = array(sitk.ReadImage(str(reference / case / "label.nii.gz")))
        assert same_grid(ct, source_mr) and same_grid(label, source_mr)
        assert np.array_equal(array(mr), array(source_mr))
        dice = 2 * np.sum((array(label) == 1) & (expected == 1)) / (np.sum(array(label)) + np.sum(expected))
        assert dice > 0.85, (case, dice)
        assert abs(array(ct)[expected == 1].mean() - tumour_ct) < 30


def test_dicom_ct_is_read_in_hounsfield_units(tmp_path):
    source = make_source(tmp_path / "src", cases=("P01", "P02"))
    for case in ("P01", "P02"):
        ct = sitk.ReadImage(str(source / case / "ct.nii.gz"))
        write_dicom_series(ct, source / case / "ct", intercept=-1024)
        (source / case / "ct.nii.gz").rename(tmp_path / f"{case}_ct.nii.gz")
    # the files store HU + 1024: only a reader that applies the rescale gets HU back
    first_slice = (source / "P01" / "ct" / "0000.dcm").read_bytes()[-64 * 64 * 2:]
    hu = array(sitk.ReadImage(str(tmp_path / "P01_ct.nii.gz")))
    assert np.array_equal(np.frombuffer(first_slice, "<i2").reshape(64, 64), hu[0] + 1024)
    dataset = convert(source, tmp_path / "raw", test=0)
    for case in ("P01", "P02"):
        ct = written(dataset, case)[0]
        assert np.array_equal(array(ct), array(sitk.ReadImage(str(tmp_path / f"{case}_ct.nii.gz"))))
        assert manifest_of(dataset)["cases"][case]["files"]["ct"] == str(source / case / "ct")


@pytest.mark.parametrize("limits, option", [
    (ct_mr.Limits(max_rotation_deg=1.0), "--max-rotation 1"),
    (ct_mr.Limits(max_translation_mm=0.5), "--max-translation 0.5"),
    (ct_mr.Limits(max_metric=-5.0), "--max-metric -5"),
])
def test_registration_outside_the_limits_is_reported_not_written(tmp_path, limits, option):
    source = make_source(tmp_path / "src", cases=("P01", "P02"))
    with pytest.raises(ConversionError) as error:
        convert(source, tmp_path / "raw", limits=limits, test=0)
    message = str(error.value)
    assert "2 case(s) rejected, nothing was written" in message and option in message
    assert "case P01" in message and "case P02" in message and str(source / "P01" / "mr.nii.gz") in message
    assert_nothing_written(tmp_path / "raw")


# ------------------------------------------------------------------------------------------ bad input

@pytest.fixture
def small_source(tmp_path, source):
    """P01 and P02 of the module's phantoms, copied so that a test can break them."""
    for case in ("P01", "P02"):
        shutil.copytree(source / case, tmp_path / "src" / case)
    return tmp_path / "src"


def assert_refused(source, root, *texts, **kwargs):
    with pytest.raises(ConversionError) as error:
        convert(source, root, test=0, **kwargs)
    for text in texts:
        assert str(text) in str(error.value), str(error.value)
    assert_nothing_written(root)


def test_missing_mr(small_source, tmp_path):
    (small_source / "P02" / "mr.nii.gz").unlink()
    assert_refused(small_source, tmp_path / "raw", "case P02", "no MR image", small_source / "P02", "--exclude P02")


def test_ambiguous_or_empty_image_sources(small_source, tmp_path):
    (small_source / "P01" / "ct").mkdir()
    assert_refused(small_source, tmp_path / "raw", "case P01", "more than one ct", "keep one")
    (small_source / "P01" / "ct.nii.gz").unlink()
    assert_refused(small_source, tmp_path / "raw", "case P01", small_source / "P01" / "ct",
                   "exactly one DICOM series, found 0")


def test_label_not_on_its_images_grid(small_source, tmp_path):
    path = small_source / "P01" / "label.nii.gz"
    label = sitk.ReadImage(str(path))
    label.SetSpacing((1.5, 1.5, 2.5))
    sitk.WriteImage(label, str(path), True)
    assert_refused(small_source, tmp_path / "raw", "case P01", path, small_source / "P01" / "ct.nii.gz", "spacing")


def test_label_values_outside_the_label_names(small_source, tmp_path):
    path = small_source / "P02" / "label.nii.gz"
    label = sitk.ReadImage(str(path))
    label[30, 30, 20] = 2
    sitk.WriteImage(label, str(path), True)
    assert_refused(small_source, tmp_path / "raw", "case P02", path, "[2]", "--label-names")
    assert convert(small_source, tmp_path / "raw", label_names=["tumor", "node"], test=0).is_dir()


def test_truncated_ct(small_source, tmp_path):
    path = small_source / "P01" / "ct.nii.gz"
    path.write_bytes(path.read_bytes()[:-2000])
    assert_refused(small_source, tmp_path / "raw", "case P01", path, "truncated or corrupt")


def test_patients_without_label(small_source, tmp_path):
    (small_source / "P02" / "label.nii.gz").unlink()
    assert_refused(small_source, tmp_path / "raw", "case P02", "--allow-unlabeled")
    make_phantom_patient(small_source / "P03", euler_transform(*TRUTH["P03"]), seed=2)
    dataset = convert(small_source, tmp_path / "raw", allow_unlabeled=True, test=0)
    cases = manifest_of(dataset)["cases"]
    assert cases["P02"]["role"] == "unlabeled" and "label" not in cases["P02"]["files"]
    assert sorted(p.name for p in (dataset / "imagesUnlabeled").iterdir()) == ["P02_0000.nii.gz", "P02_0001.nii.gz"]
    with pytest.raises(ConversionError, match="already exists: pass --overwrite"):
        convert(small_source, tmp_path / "raw", allow_unlabeled=True, test=0)


def test_cli_with_ct_window_and_errors(small_source, tmp_path, capsys):
    argv = ["convert-ct-mr", str(small_source), "-d", "502", "-n", "Phantom", "--output-root", str(tmp_path / "raw"),
            "--labeled", "1", "--val", "1", "--test", "0", "--ct-window", "400", "40"]
    assert run_subcommand(ct_mr.register, argv) == 0
    dataset = Path(capsys.readouterr().out.strip())
    ct = array(written(dataset, "P01")[0])
    assert ct.min() == -160 and ct.max() == 240
    assert manifest_of(dataset)["options"]["ct_window"] == [400.0, 40.0]
    assert run_subcommand(ct_mr.register, argv + ["--grid", "mr"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "already exists" in err and "Traceback" not in err
