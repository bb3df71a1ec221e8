"""convert-brats on the real BraTS 2018 cases in ../shared/data/brats18, the split protocol, and bad input."""
import filecmp
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_smms.cli import main
from nnunetv2_smms.dataset_conversion import brats
from nnunetv2_smms.dataset_conversion.checks import ConversionError
from nnunetv2_smms.dataset_conversion.splits import make_split

from _conversion_helpers import (BRATS18, BRATS18_MISSING, assert_nothing_written, brats_source,
                                 replace_image, run_subcommand)

needs_brats = pytest.mark.skipif(not BRATS18.is_dir(), reason=BRATS18_MISSING)
CASES = sorted(p.name for p in BRATS18.iterdir()) if BRATS18.is_dir() else []
SPLIT = dict(labeled=1, val=1, test=1)  # of 6 cases: 1 labeled, 1 validation, 1 test, 3 unlabeled


def convert(root, **kwargs):
    options = {"source": BRATS18, "dataset_id": 501, "dataset_name": "BraTS18", "output_root": root, **SPLIT}
    options.update(kwargs)
    return brats.convert_brats(**options)


def manifest_of(dataset: Path) -> dict:
    return json.loads((dataset / "smms_manifest.json").read_text())


def roles_of(dataset: Path) -> dict:
    return {case: entry["role"] for case, entry in manifest_of(dataset)["cases"].items()}


def all_files(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def nnunet_dirs(tmp_path_factory):
    """nnU-Net's three folders in a tmp dir, set in the environment as a user would."""
    base = tmp_path_factory.mktemp("nnunet")
    env = {name: str(base / sub) for name, sub in
           (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "preprocessed"), ("nnUNet_results", "results"))}
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            mp.setenv(name, value)
        yield env


@pytest.fixture(scope="module")
def dataset(nnunet_dirs):
    """All 6 cases, T1ce + T2, whole tumour, written into $nnUNet_raw (so the split is installed too)."""
    if not BRATS18.is_dir():
        pytest.skip(BRATS18_MISSING)
    return convert(None)


# ---------------------------------------------------------------------------------------- the output

def test_nnunet_integrity_check_and_planning_accept_the_dataset(dataset, nnunet_dirs):
    env = {**os.environ, **nnunet_dirs, "nnUNet_def_n_proc": "1", "OMP_NUM_THREADS": "1"}
    outputs = []
    for command in (["nnUNetv2_extract_fingerprint", "-d", "501", "--verify_dataset_integrity", "-np", "1"],
                    ["nnUNetv2_plan_experiment", "-d", "501", "-np", "1"]):
        result = subprocess.run(command, env=env, capture_output=True, timeout=300, encoding="utf-8", errors="replace")
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        outputs.append(result.stdout)
    assert "verify_dataset_integrity Done" in outputs[0]
    assert "Error" not in outputs[0] and "Warning" not in outputs[0]  # e.g. image/label origin mismatches
    installed = Path(nnunet_dirs["nnUNet_preprocessed"]) / dataset.name / "splits_final.json"
    # convert-brats installed the split; fingerprinting and planning kept it
    assert json.loads(installed.read_text()) == json.loads((dataset / "splits_final.json").read_text())
    assert (installed.parent / "nnUNetPlans.json").is_file()


def test_install_split(dataset, nnunet_dirs, capsys):
    installed = Path(nnunet_dirs["nnUNet_preprocessed"]) / dataset.name / "splits_final.json"
    ours = (dataset / "splits_final.json").read_text()
    installed.unlink()
    assert main(["install-split", "-d", "501"]) == 0 and installed.read_text() == ours
    installed.write_text(json.dumps([{"train": ["x"], "val": ["y"]}]))
    assert main(["install-split", "-d", "501"]) == 2
    assert "holds a different split" in capsys.readouterr().err
    assert main(["install-split", "-d", "Dataset501_BraTS18", "--overwrite"]) == 0 and installed.read_text() == ours


@pytest.mark.parametrize("command", ["convert-brats", "convert-ct-mr", "install-split"])
def test_commands_are_registered(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "-h"])
    assert exit_.value.code == 0 and f"nnunetv2_smms {command}" in capsys.readouterr().out


def test_layout_dataset_json_and_split(dataset):
    roles = roles_of(dataset)
    assert sorted(roles) == CASES
    assert sorted(roles.values()) == ["labeled", "test", "unlabeled", "unlabeled", "unlabeled", "val"]
    expected = {"imagesTr": [], "labelsTr": [], "imagesUnlabeled": [], "imagesTs": [], "labelsTs": []}
    for case, role in roles.items():
        images, labels = {"labeled": ("imagesTr", "labelsTr"), "val": ("imagesTr", "labelsTr"),
                          "unlabeled": ("imagesUnlabeled", None), "test": ("imagesTs", "labelsTs")}[role]
        expected[images] += [f"{case}_0000.nii.gz", f"{case}_0001.nii.gz"]
        if labels:
            expected[labels].append(f"{case}.nii.gz")
    for folder, names in expected.items():
        assert sorted(p.name for p in (dataset / folder).iterdir()) == sorted(names), folder

    dataset_json = json.loads((dataset / "dataset.json").read_text())
    assert dataset_json["channel_names"] == {"0": "T1ce", "1": "T2"}
    assert dataset_json["labels"] == {"background": 0, "whole tumor": 1}
    assert dataset_json["numTraining"] == 2 and dataset_json["file_ending"] == ".nii.gz"
    assert dataset_json["smms"] == {"branch_a": [0], "branch_b": [1]}

    splits = json.loads((dataset / "splits_final.json").read_text())
    assert splits == [{"train": [c for c in CASES if roles[c] == "labeled"],
                       "val": [c for c in CASES if roles[c] == "val"]}]
    manifest = manifest_of(dataset)
    assert manifest["split"] == {"labeled": 1, "val": 1, "test": 1, "seed": 0}
    assert manifest["source"] == str(BRATS18.absolute())
    some = CASES[0]
    assert manifest["cases"][some]["files"]["t1ce"] == str(BRATS18.absolute() / some / f"{some}_t1ce.nii.gz")


def test_images_are_bit_identical_to_the_source_channels(dataset):
    for case, role in roles_of(dataset).items():
        folder = {"labeled": "imagesTr", "val": "imagesTr", "unlabeled": "imagesUnlabeled", "test": "imagesTs"}[role]
        for channel, modality in enumerate(("t1ce", "t2")):
            source = BRATS18 / case / f"{case}_{modality}.nii.gz"
            written = dataset / folder / f"{case}_{channel:04d}.nii.gz"
            assert filecmp.cmp(source, written, shallow=False)
            a, b = sitk.ReadImage(str(source)), sitk.ReadImage(str(written))
            assert a.GetPixelID() == b.GetPixelID()
            assert (a.GetSpacing(), a.GetOrigin(), a.GetDirection()) == (b.GetSpacing(), b.GetOrigin(),
                                                                         b.GetDirection())
            assert np.array_equal(sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(b))


def test_whole_tumor_label_is_seg_above_zero(dataset):
    labeled = {c: r for c, r in roles_of(dataset).items() if r != "unlabeled"}
    assert len(labeled) == 3
    for case, role in labeled.items():
        source = sitk.ReadImage(str(BRATS18 / case / f"{case}_seg.nii.gz"))
        label = sitk.ReadImage(str(dataset / ("labelsTs" if role == "test" else "labelsTr") / f"{case}.nii.gz"))
        seg, wt = sitk.GetArrayFromImage(source), sitk.GetArrayFromImage(label)
        assert label.GetPixelID() == sitk.sitkUInt8 and set(np.unique(wt)) <= {0, 1}
        assert wt.sum() == (seg > 0).sum() > 0
        assert np.array_equal(wt, (seg > 0).astype(np.uint8))
        assert (label.GetSpacing(), label.GetOrigin(), label.GetDirection()) == (
            source.GetSpacing(), source.GetOrigin(), source.GetDirection())


def test_same_arguments_give_identical_output(dataset, tmp_path):
    again = convert(tmp_path)
    first, second = all_files(dataset), all_files(again)
    assert list(first) == list(second)
    assert all(filecmp.cmp(first[name], second[name], shallow=False) for name in first)


def test_manifest_reproduces_the_split(dataset, tmp_path):
    reproduced = convert(tmp_path, labeled=None, val=None, test=None, manifest=dataset / "smms_manifest.json")
    assert roles_of(reproduced) == roles_of(dataset)
    assert (reproduced / "splits_final.json").read_text() == (dataset / "splits_final.json").read_text()
    assert manifest_of(reproduced)["split"]["from_manifest"] == str((dataset / "smms_manifest.json").resolve())
    with pytest.raises(ConversionError, match="--manifest fixes the split; leave out --seed"):
        convert(tmp_path / "other", labeled=None, val=None, test=None, seed=3,
                manifest=dataset / "smms_manifest.json")


def test_more_labeled_cases_extend_the_labeled_set(dataset, tmp_path):
    more = roles_of(convert(tmp_path, labeled=2))
    fewer = roles_of(dataset)
    for role in ("val", "test"):
        assert [c for c in CASES if more[c] == role] == [c for c in CASES if fewer[c] == role]
    labeled_fewer = {c for c in CASES if fewer[c] == "labeled"}
    labeled_more = {c for c in CASES if more[c] == "labeled"}
    assert labeled_fewer < labeled_more and len(labeled_more) == 2


@needs_brats
def test_four_channels_with_branches_and_regions(tmp_path):
    modalities = ["t1", "t1ce", "t2", "flair"]
    dataset = convert(tmp_path, source=brats_source(tmp_path / "src", CASES[:3]), modalities=modalities,
                      branches="t1,t1ce|t2,flair", target="regions")
    dataset_json = json.loads((dataset / "dataset.json").read_text())
    assert dataset_json["channel_names"] == {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"}
    assert dataset_json["smms"] == {"branch_a": [0, 1], "branch_b": [2, 3]}
    assert dataset_json["labels"]["tumor core"] == [2, 3] and dataset_json["regions_class_order"] == [1, 2, 3]
    case = json.loads((dataset / "splits_final.json").read_text())[0]["train"][0]
    for channel, modality in enumerate(modalities):
        assert filecmp.cmp(BRATS18 / case / f"{case}_{modality}.nii.gz",
                           dataset / "imagesTr" / f"{case}_{channel:04d}.nii.gz", shallow=False)
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(BRATS18 / case / f"{case}_seg.nii.gz")))
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(dataset / "labelsTr" / f"{case}.nii.gz")))
    for source_value, nnunet_value in ((0, 0), (2, 1), (1, 2), (4, 3)):  # as nnU-Net's Dataset137_BraTS21
        assert np.array_equal(seg == source_value, label == nnunet_value)


@needs_brats
def test_hgg_lgg_groups(tmp_path):
    """BraTS 2019 ships its cases in HGG/ and LGG/ folders."""
    brats_source(tmp_path / "src" / "HGG", CASES[:2])
    brats_source(tmp_path / "src" / "LGG", CASES[2:3])
    (tmp_path / "src" / "name_mapping.csv").write_text("a,b\n")
    manifest = manifest_of(convert(tmp_path / "raw", source=tmp_path / "src"))
    assert sorted(manifest["cases"]) == CASES[:3]
    assert manifest["cases"][CASES[2]]["files"]["t2"] == str(tmp_path / "src" / "LGG" / CASES[2] /
                                                             f"{CASES[2]}_t2.nii.gz")


@needs_brats
def test_brats_2023_names_and_labels(tmp_path):
    """<case>-{t1n,t1c,t2w,t2f,seg}.nii.gz; labels 1 NETC, 2 SNFH (edema), 3 ET instead of 4."""
    names = {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"}
    source = tmp_path / "src"
    for i, old in enumerate(CASES[:3]):
        case = f"BraTS-GLI-{i:05d}-000"
        (source / case).mkdir(parents=True)
        for modality, suffix in names.items():
            (source / case / f"{case}-{suffix}.nii.gz").symlink_to(BRATS18 / old / f"{old}_{modality}.nii.gz")
        (source / case / f"{case}-seg.nii.gz").symlink_to(BRATS18 / old / f"{old}_seg.nii.gz")
    seg_file = source / "BraTS-GLI-00000-000" / "BraTS-GLI-00000-000-seg.nii.gz"  # real BraTS 2018 labels
    assert_refused(source, tmp_path / "raw", "case BraTS-GLI-00000-000", seg_file, "[4]", "BraTS 2023+")
    for i, old in enumerate(CASES[:3]):
        seg = sitk.ReadImage(str(BRATS18 / old / f"{old}_seg.nii.gz"))
        replace_image(source / f"BraTS-GLI-{i:05d}-000" / f"BraTS-GLI-{i:05d}-000-seg.nii.gz",
                      sitk.ChangeLabel(seg, {4: 3}))
    dataset = convert(tmp_path / "raw", source=source, target="regions")
    for i, old in enumerate(CASES[:3]):
        case = f"BraTS-GLI-{i:05d}-000"
        role = manifest_of(dataset)["cases"][case]["role"]
        images, labels = ("imagesTs", "labelsTs") if role == "test" else ("imagesTr", "labelsTr")
        assert filecmp.cmp(BRATS18 / old / f"{old}_t1ce.nii.gz", dataset / images / f"{case}_0000.nii.gz",
                           shallow=False)
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(BRATS18 / old / f"{old}_seg.nii.gz")))
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(dataset / labels / f"{case}.nii.gz")))
        for source_value, nnunet_value in ((0, 0), (2, 1), (1, 2), (4, 3)):
            assert np.array_equal(seg == source_value, label == nnunet_value)


def test_split_protocol_on_335_cases():
    """The paper's 250/25/60 of 335; 5 % labeled inside 10 %, same validation and test cases."""
    cases = [f"BraTS19_{i:03d}" for i in range(335)]
    five = make_split(cases, labeled="5%", val="7.5%", test="18%", seed=7)
    ten = make_split(cases, labeled="10%", val="7.5%", test="18%", seed=7)
    count = lambda roles, role: sum(r == role for r in roles.values())  # noqa: E731
    assert [count(ten, r) for r in ("labeled", "unlabeled", "val", "test")] == [25, 225, 25, 60]
    assert count(five, "labeled") == 13 and count(five, "unlabeled") == 237
    for role in ("val", "test"):
        assert {c for c in cases if five[c] == role} == {c for c in cases if ten[c] == role}
    assert {c for c in cases if five[c] == "labeled"} < {c for c in cases if ten[c] == "labeled"}
    assert make_split(list(reversed(cases)), labeled=25, val=25, test=60, seed=7) == ten
    assert make_split(cases, labeled="10%", val="7.5%", test="18%", seed=8) != ten


@pytest.mark.parametrize("amounts, message", [
    (dict(labeled="0", val="1", test="1"), "--labeled 0"),
    (dict(labeled="1", val="0", test="1"), "--val 0"),
    (dict(labeled="4", val="1", test="1"), "leave 3 for training"),
    (dict(labeled="120%", val="1", test="1"), "at most 1"),
    (dict(labeled="a few", val="1", test="1"), "give a number of cases"),
])
def test_impossible_splits_are_refused(amounts, message):
    with pytest.raises(ConversionError, match=message):
        make_split([f"c{i}" for i in range(5)], seed=0, **amounts)


# ------------------------------------------------------------------------------------------ bad input

@pytest.fixture
def source(tmp_path):
    if not BRATS18.is_dir():
        pytest.skip(BRATS18_MISSING)
    return brats_source(tmp_path / "src", CASES[:3])


def assert_refused(source, root, *texts, **kwargs):
    with pytest.raises(ConversionError) as error:
        convert(root, source=source, **kwargs)
    for text in texts:
        assert str(text) in str(error.value), str(error.value)
    assert_nothing_written(root)
    return str(error.value)


def test_missing_modality_file(source, tmp_path):
    case = CASES[1]
    missing = source / case / f"{case}_t2.nii.gz"
    missing.unlink()
    assert_refused(source, tmp_path / "out", f"case {case}", missing, f"--exclude {case}")
    # leaving it out works
    assert sorted(roles_of(convert(tmp_path / "out", source=source, exclude=[case], test=0))) == [CASES[0], CASES[2]]


def test_missing_segmentation(source, tmp_path):
    case = CASES[2]
    missing = source / case / f"{case}_seg.nii.gz"
    missing.unlink()
    assert_refused(source, tmp_path / "out", f"case {case}", missing, "segmentation")


def test_geometry_mismatch_within_a_case(source, tmp_path):
    case = CASES[0]
    path = source / case / f"{case}_t2.nii.gz"
    image = sitk.ReadImage(str(path))
    image.SetOrigin((5.0, -239.0, 0.0))
    replace_image(path, image)
    assert_refused(source, tmp_path / "out", f"case {case}", path, "origin", "do not share one voxel grid")


def test_label_values_outside_the_brats_set(source, tmp_path):
    case = CASES[1]
    path = source / case / f"{case}_seg.nii.gz"
    seg = sitk.ReadImage(str(path))
    seg[100, 100, 70] = 3
    replace_image(path, seg)
    assert_refused(source, tmp_path / "out", f"case {case}", path, "[3]", "0, 1, 2, 4")


def test_truncated_image(source, tmp_path):
    case = CASES[2]
    path = source / case / f"{case}_t1ce.nii.gz"
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data[: len(data) // 2])
    assert_refused(source, tmp_path / "out", f"case {case}", path, "truncated or corrupt")


def test_existing_dataset_id(source, tmp_path):
    root = tmp_path / "out"
    convert(root, source=source)
    before = all_files(root)
    for kwargs, text in ((dict(), "--overwrite"), (dict(dataset_name="Other"), "already used by")):
        with pytest.raises(ConversionError, match=text):
            convert(root, source=source, **kwargs)
    assert all_files(root) == before and sorted(p.name for p in root.iterdir()) == ["Dataset501_BraTS18"]
    convert(root, source=source, seed=1, overwrite=True)
    assert sorted(p.name for p in root.iterdir()) == ["Dataset501_BraTS18"]
    assert manifest_of(root / "Dataset501_BraTS18")["split"]["seed"] == 1


def test_a_different_installed_split_is_not_replaced_silently(source, tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    installed = tmp_path / "preprocessed" / "Dataset501_BraTS18" / "splits_final.json"
    installed.parent.mkdir(parents=True)
    installed.write_text(json.dumps([{"train": ["x"], "val": ["y"]}]))
    with pytest.raises(ConversionError, match="holds a different split") as error:
        convert(None, source=source)
    assert str(installed) in str(error.value) and "--overwrite" in str(error.value)
    assert_nothing_written(tmp_path / "raw")
    dataset = convert(None, source=source, overwrite=True)
    assert installed.read_text() == (dataset / "splits_final.json").read_text()


def test_cli_reports_errors_without_traceback(source, tmp_path, capsys):
    case = CASES[0]
    (source / case / f"{case}_t1ce.nii.gz").unlink()
    argv = ["convert-brats", str(source), "-d", "501", "-n", "BraTS18", "--output-root", str(tmp_path / "out"),
            "--labeled", "1", "--val", "1", "--test", "1"]
    assert run_subcommand(brats.register, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"case {case}" in err and "Traceback" not in err
    assert_nothing_written(tmp_path / "out")
    (source / case / f"{case}_t1ce.nii.gz").symlink_to(BRATS18 / case / f"{case}_t1ce.nii.gz")
    assert run_subcommand(brats.register, argv) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "out" / "Dataset501_BraTS18")
