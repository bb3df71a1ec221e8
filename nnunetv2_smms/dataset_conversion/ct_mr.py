"""``nnunetv2_smms convert-ct-mr``: per-patient CT + MR (T2) pairs -> nnU-Net raw dataset with the SMMS split
(the paper's nasopharyngeal carcinoma setting, whose data are private: this works on the user's own pairs).

Each MR is rigidly registered to its CT (Mattes mutual information, Euler3D, multi-resolution) and both are
written on one grid (the CT's by default). Channel 0 is named "CT" so that nnU-Net applies its CT
normalization to it, channel 1 "T2". A registration that fails or leaves sane bounds is reported, not written.
"""
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

from nnunetv2_smms.dataset_conversion.arguments import add_output_arguments, add_split_arguments, run_cli, split_kwargs
from nnunetv2_smms.dataset_conversion.checks import (CaseRejected, ConversionError, Grid, check_label_values,
                                                     check_same_grid, collect, exclude_cases, grid_of, read_grid,
                                                     read_image, reason, subfolders)
from nnunetv2_smms.dataset_conversion.layout import FILE_ENDING, LAYOUT, smms_branches
from nnunetv2_smms.dataset_conversion.splits import Amount, resolve_split
from nnunetv2_smms.dataset_conversion.writing import prepare_target, write_dataset
from nnunetv2_smms.errors import cli_command

IMAGE_ENDINGS = (".nii.gz", ".nii", ".mha", ".nrrd")
CHANNELS = ("ct", "mr")
CHANNEL_NAMES = {0: "CT", 1: "T2"}
AIR_HU = -1024.0
# the registration (not options: they are part of what makes two conversions comparable)
HISTOGRAM_BINS = 50
SAMPLING_PERCENTAGE, SAMPLING_SEED = 0.25, 42
SHRINK_FACTORS, SMOOTHING_SIGMAS_MM = (4, 2, 1), (2.0, 1.0, 0.0)
STEP_MM, MIN_STEP_MM, ITERATIONS_PER_LEVEL = 2.0, 1e-3, 200


@dataclass(frozen=True)
class Limits:
    """A registration is rejected beyond these (see docs/dataset_conversion.md)."""
    max_metric: float = -0.2
    max_rotation_deg: float = 30.0
    max_translation_mm: float = 100.0


@dataclass(frozen=True)
class Patient:
    files: Dict[str, Path]  # "ct", "mr" and, if present, "label": a file or a DICOM series folder
    series: Dict[str, Tuple[str, ...]]  # the files of each DICOM series folder, in slice order


def _find(case: str, folder: Path, stem: str) -> Optional[Path]:
    found = [folder / (stem + e) for e in IMAGE_ENDINGS if (folder / (stem + e)).is_file()]
    found += [folder / stem] if (folder / stem).is_dir() else []
    if len(found) > 1:
        raise ConversionError(f"case {case}: more than one {stem} in {folder}: {[p.name for p in found]}; keep one")
    return found[0] if found else None


def _dicom_series(case: str, folder: Path) -> Tuple[str, ...]:
    import SimpleITK as sitk

    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if len(series) != 1:
        raise ConversionError(f"case {case}: {folder} must hold exactly one DICOM series, found {len(series)}. "
                              f"Keep one series per folder, or leave the case out with --exclude {case}.")
    return tuple(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0]))


def _check_case(case: str, folder: Path, label_space: str, allow_unlabeled: bool) -> Patient:
    """Cheap checks: files present, headers readable, one DICOM series per folder, label on its image's grid."""
    files = {stem: _find(case, folder, stem) for stem in (*CHANNELS, "label")}
    layout = f"{case}/ct.nii.gz (or .nii, .mha, .nrrd, or a DICOM folder {case}/ct/), likewise mr"
    for stem in CHANNELS:
        if files[stem] is None:
            raise ConversionError(f"case {case}: no {stem.upper()} image in {folder}; expected {layout}. Add it, "
                                  f"or leave the case out with --exclude {case}.")
    if files["label"] is None:
        if not allow_unlabeled:
            raise ConversionError(f"case {case}: no label file {folder / ('label' + FILE_ENDING)}. Add it, pass "
                                  f"--allow-unlabeled to use such patients as unlabeled training cases, or leave "
                                  f"the case out with --exclude {case}.")
        del files["label"]
    elif files["label"].is_dir():
        raise ConversionError(f"case {case}: the label must be an image file ({case}/label.nii.gz), not a folder "
                              f"({files['label']}); convert RTSTRUCTs to a label image first.")
    grids: Dict[str, Optional[Grid]] = {}
    series = {}
    for stem, path in files.items():
        if path.is_dir():
            series[stem] = _dicom_series(case, path)
            grids[stem] = None  # a series' grid is known only once it is read
        else:
            grids[stem] = read_grid(path, case)
    if "label" in files and grids[label_space] is not None:
        check_same_grid(case, files[label_space], grids[label_space], files["label"], grids["label"])
    return Patient(files, series)


def _read_volume(case: str, patient: Patient, stem: str):
    """A file, or a DICOM series; DICOM rescale slope/intercept are applied (CT in HU)."""
    import SimpleITK as sitk

    path = patient.files[stem]
    if stem not in patient.series:
        return read_image(path, case)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(patient.series[stem])
    try:
        return reader.Execute()
    except RuntimeError as e:
        raise ConversionError(f"case {case}: cannot read the DICOM series in {path}: {reason(e)}. "
                              f"Replace the files, or leave the case out with --exclude {case}.") from None


@contextmanager
def _single_threaded():
    """ITK's multi-threaded metric and smoothing sum in a varying order, so a registration only gives the same
    transform on every run when it runs on one thread."""
    import SimpleITK as sitk

    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)


def rotation_angle_deg(transform) -> float:
    """Total rotation angle of a rigid transform's matrix."""
    import numpy as np

    matrix = np.asarray(transform.GetMatrix()).reshape(3, 3)
    return math.degrees(math.acos(float(np.clip((np.trace(matrix) - 1) / 2, -1, 1))))


def register_mr_to_ct(ct, mr):
    """Rigid transform mapping CT (fixed) points to MR (moving) points, and what the manifest records of it.

    Initialised by aligning the image centres (CenteredTransformInitializer, GEOMETRY); the reported
    translation_mm is how far the optimisation moved the CT centre beyond that initialisation."""
    import numpy as np
    import SimpleITK as sitk

    fixed, moving = sitk.Cast(ct, sitk.sitkFloat32), sitk.Cast(mr, sitk.sitkFloat32)
    initial = sitk.CenteredTransformInitializer(fixed, moving, sitk.Euler3DTransform(),
                                                sitk.CenteredTransformInitializerFilter.GEOMETRY)
    transform = sitk.Euler3DTransform(initial)
    with _single_threaded():
        method = sitk.ImageRegistrationMethod()
        method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=HISTOGRAM_BINS)
        method.SetMetricSamplingStrategy(method.RANDOM)
        method.SetMetricSamplingPercentage(SAMPLING_PERCENTAGE, SAMPLING_SEED)
        method.SetInterpolator(sitk.sitkLinear)
        method.SetOptimizerAsRegularStepGradientDescent(learningRate=STEP_MM, minStep=MIN_STEP_MM,
                                                        numberOfIterations=ITERATIONS_PER_LEVEL)
        method.SetOptimizerScalesFromPhysicalShift()
        method.SetShrinkFactorsPerLevel(list(SHRINK_FACTORS))
        method.SetSmoothingSigmasPerLevel(list(SMOOTHING_SIGMAS_MM))
        method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
        method.SetInitialTransform(transform, inPlace=True)
        method.Execute(fixed, moving)
    shift = np.subtract(transform.GetTranslation(), initial.GetTranslation())
    return transform, {
        "metric": method.GetMetricValue(),
        "rotation_deg": rotation_angle_deg(transform),
        "translation_mm": float(np.linalg.norm(shift)),
        "stop_condition": method.GetOptimizerStopConditionDescription(),
        "transform": {"type": "Euler3DTransform", "maps": "CT points to MR points",
                      "parameters": list(transform.GetParameters()),
                      "fixed_parameters": list(transform.GetFixedParameters())},
    }


def _rejections(info: dict, limits: Limits) -> Sequence[str]:
    checks = (("metric", info["metric"], limits.max_metric, "--max-metric", ""),
              ("rotation", info["rotation_deg"], limits.max_rotation_deg, "--max-rotation", " deg"),
              ("translation", info["translation_mm"], limits.max_translation_mm, "--max-translation", " mm"))
    return [f"{name} {value:.3g}{unit} > {option} {limit:g}" for name, value, limit, option, unit in checks
            if value > limit]


def _read_label(case: str, patient: Patient, reference, label_space: str, n_labels: int):
    import SimpleITK as sitk

    path = patient.files["label"]
    label = read_image(path, case)
    # (checked from the headers already, unless the label's image is a DICOM series)
    check_same_grid(case, patient.files[label_space], grid_of(reference), path, grid_of(label))
    check_label_values(case, path, sitk.GetArrayViewFromImage(label), range(n_labels + 1),
                       f"--label-names with {n_labels} name(s)")
    return label


def _register_checked(case: str, patient: Patient, ct, mr, limits: Limits):
    """register_mr_to_ct, or CaseRejected if it fails or leaves the limits."""
    pair = f"{patient.files['mr']} to {patient.files['ct']}"
    try:
        transform, info = register_mr_to_ct(ct, mr)
    except RuntimeError as e:
        raise CaseRejected(f"case {case}: registering {pair} failed: {reason(e)}") from None
    problems = _rejections(info, limits)
    if problems:
        raise CaseRejected(f"case {case}: registration of {pair} looks wrong ({'; '.join(problems)}). Check the "
                           f"pair, loosen the limit, or leave the case out with --exclude {case}.")
    return transform, info


def _onto_grid(image, space: str, grid: str, reference, transform, is_label: bool):
    """An image that lies on the CT or MR grid (space) on the output grid: unchanged on its own grid (a label
    cast to uint8), else resampled. sitk.Resample maps each output point to an input point, and `transform`
    maps CT points to MR points."""
    import SimpleITK as sitk

    if space == grid:
        return sitk.Cast(image, sitk.sitkUInt8) if is_label else image
    to_input = transform if space == "mr" else transform.GetInverse()
    if is_label:
        return sitk.Resample(image, reference, to_input, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.Resample(image, reference, to_input, sitk.sitkLinear, AIR_HU if space == "ct" else 0.0,
                         sitk.sitkFloat32)


def _write_case(case: str, patient: Patient, *, grid: str, label_space: str, n_labels: int,
                ct_window: Optional[Tuple[float, float]], limits: Limits, images_dir: Path,
                labels_dir: Optional[Path]) -> dict:
    import SimpleITK as sitk

    ct, mr = (_read_volume(case, patient, stem) for stem in CHANNELS)
    if ct.GetPixelID() == sitk.sitkFloat64:
        ct = sitk.Cast(ct, sitk.sitkFloat32)
    images = {"ct": ct, "mr": mr}
    label = None if labels_dir is None else _read_label(case, patient, images[label_space], label_space, n_labels)
    transform, info = _register_checked(case, patient, ct, mr, limits)
    out = [_onto_grid(images[stem], stem, grid, images[grid], transform, False) for stem in CHANNELS]
    if ct_window is not None:
        width, level = ct_window
        out[0] = sitk.Clamp(out[0], lowerBound=level - width / 2, upperBound=level + width / 2)
    for channel, image in enumerate(out):
        sitk.WriteImage(image, str(images_dir / f"{case}_{channel:04d}{FILE_ENDING}"), useCompression=True)
    if label is not None:
        label = _onto_grid(label, label_space, grid, images[grid], transform, True)
        sitk.WriteImage(label, str(labels_dir / f"{case}{FILE_ENDING}"), useCompression=True)
    return {"registration": info}


def convert_ct_mr(source: Union[str, Path], dataset_id: int, dataset_name: str, grid: str = "ct",
                  label_space: str = "ct", label_names: Sequence[str] = ("tumor",),
                  ct_window: Optional[Tuple[float, float]] = None, allow_unlabeled: bool = False,
                  limits: Limits = Limits(), labeled: Optional[Amount] = None, val: Optional[Amount] = None,
                  test: Optional[Amount] = None, seed: Optional[int] = None,
                  manifest: Optional[Union[str, Path]] = None, exclude: Sequence[str] = (),
                  output_root: Optional[Union[str, Path]] = None, overwrite: bool = False) -> Path:
    """Convert one folder per patient (ct + mr, optional label; see docs/dataset_conversion.md) into
    output_root/DatasetXXX_Name and return that folder. ``ct_window`` is (width, level) in HU."""
    source = Path(source).absolute()
    for option, value in (("--grid", grid), ("--label-space", label_space)):
        if value not in CHANNELS:
            raise ConversionError(f"{option} {value!r}: choose ct or mr")
    label_names = list(label_names)
    if not label_names or len(set(label_names)) != len(label_names) or "background" in label_names:
        raise ConversionError(f"--label-names {label_names}: give distinct names for labels 1, 2, ...")
    if ct_window is not None and not ct_window[0] > 0:
        raise ConversionError(f"--ct-window {ct_window}: the width must be > 0")
    destination = prepare_target(dataset_id, dataset_name, output_root, overwrite)
    folders = exclude_cases(subfolders(source), exclude, source)
    if not folders:
        raise ConversionError(f"no patient folders in {source}")
    patients = collect(folders, lambda case: _check_case(case, folders[case], label_space, allow_unlabeled))
    no_label = [case for case, p in patients.items() if "label" not in p.files]
    roles, split = resolve_split(list(patients), labeled, val, test, seed, manifest, unlabeled_only=no_label)
    dataset_json = {
        "channel_names": dict(CHANNEL_NAMES),
        "labels": {"background": 0, **{name: i for i, name in enumerate(label_names, start=1)}},
        "dataset_name": destination.name,
        "converted_by": "nnunetv2_smms convert-ct-mr",
        "description": f"MR registered rigidly to CT, both on the {grid.upper()} grid. {LAYOUT}",
        "smms": smms_branches(CHANNELS, None),
    }
    return write_dataset(
        destination, overwrite=overwrite, roles=roles, dataset_json=dataset_json,
        convert_case=lambda case, images, labels: _write_case(
            case, patients[case], grid=grid, label_space=label_space, n_labels=len(label_names),
            ct_window=ct_window, limits=limits, images_dir=images, labels_dir=labels),
        sources={case: {k: str(p) for k, p in patient.files.items()} for case, patient in patients.items()},
        manifest={"command": "convert-ct-mr", "source": str(source),
                  "options": {"grid": grid, "label_space": label_space, "label_names": label_names,
                              "ct_window": None if ct_window is None else list(ct_window),
                              "allow_unlabeled": allow_unlabeled, "limits": asdict(limits),
                              "exclude": sorted(exclude)},
                  "split": split})


def _run(args) -> int:
    return run_cli(lambda: convert_ct_mr(
        args.source, args.dataset_id, args.dataset_name, grid=args.grid, label_space=args.label_space,
        label_names=[n.strip() for n in args.label_names.split(",") if n.strip()],
        ct_window=None if args.ct_window is None else tuple(args.ct_window), allow_unlabeled=args.allow_unlabeled,
        limits=Limits(args.max_metric, args.max_rotation, args.max_translation), **split_kwargs(args)))


def register(subparsers) -> None:
    defaults = Limits()
    p = subparsers.add_parser(
        "convert-ct-mr",
        help="per-patient CT + MR (T2) pairs -> registered nnU-Net raw dataset with the SMMS split",
        description="Convert one folder per patient, <patient>/ct.nii.gz (or .nii/.mha/.nrrd, or a DICOM series "
                    "folder <patient>/ct/), <patient>/mr.* likewise and <patient>/label.nii.gz, into an nnU-Net v2 "
                    "raw dataset. Each MR is rigidly registered to its CT (Mattes mutual information) and both "
                    "are written on one grid; channel names CT and T2. See docs/dataset_conversion.md.")
    p.add_argument("source", help="folder with one sub-folder per patient")
    add_output_arguments(p)
    p.add_argument("--grid", choices=CHANNELS, default="ct", help="write everything on the CT (default) or MR grid")
    p.add_argument("--label-space", choices=CHANNELS, default="ct",
                   help="which image the label was drawn on (its grid must match that image; default ct)")
    p.add_argument("--label-names", default="tumor",
                   help="comma-separated names of the label values 1, 2, ... (default: tumor)")
    p.add_argument("--ct-window", nargs=2, type=float, metavar=("WIDTH", "LEVEL"), default=None,
                   help="clip the CT to this window in HU, e.g. --ct-window 400 40 (default: no clipping)")
    p.add_argument("--allow-unlabeled", action="store_true",
                   help="patients without a label file become unlabeled training cases (default: error)")
    p.add_argument("--max-metric", type=float, default=defaults.max_metric,
                   help=f"reject a registration whose final Mattes mutual information metric (negative, lower is "
                        f"better) is above this (default {defaults.max_metric})")
    p.add_argument("--max-rotation", type=float, default=defaults.max_rotation_deg,
                   help=f"reject a registration that rotates more than this, in degrees "
                        f"(default {defaults.max_rotation_deg:g})")
    p.add_argument("--max-translation", type=float, default=defaults.max_translation_mm,
                   help=f"reject a registration that moves the CT centre more than this beyond the centre "
                        f"alignment it starts from, in mm (default {defaults.max_translation_mm:g})")
    add_split_arguments(p)
    p.set_defaults(func=cli_command(_run))
