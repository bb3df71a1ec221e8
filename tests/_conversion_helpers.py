"""Test data for the dataset converters: where the real BraTS cases live, and synthetic CT+MR phantoms.

The phantom is a few ellipsoids defined in physical (CT) space. The CT samples them on an anisotropic grid in
Hounsfield units; the MR samples the same ellipsoids, moved by a known rigid transform, on its own grid with a
different contrast (bone dark, tumour bright). A converter that registers MR to CT should recover that
transform. The benchmark imports this module too.
"""
import argparse
import os
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

# the repository's sibling ../shared/data/brats18 (6 real BraTS 2018 cases; never copied into the repository)
BRATS18 = Path(__file__).resolve().parents[2] / "shared" / "data" / "brats18"
BRATS18_MISSING = f"real BraTS cases not found at {BRATS18} (expected ../shared/data/brats18 next to the repository)"


def brats_source(folder: Path, cases: Sequence[str]) -> Path:
    """A BraTS training folder whose files are symlinks to the real cases, so a test can break one file."""
    for case in cases:
        (folder / case).mkdir(parents=True)
        for f in (BRATS18 / case).iterdir():
            os.symlink(f, folder / case / f.name)
    return folder


def replace_image(path: Path, image: sitk.Image) -> None:
    """Write image where path was (a symlink into the shared data is replaced, never written through)."""
    path.unlink()
    sitk.WriteImage(image, str(path), True)


def assert_nothing_written(root: Path) -> None:
    """No dataset folder and no staging folder left behind."""
    leftovers = sorted(p.name for p in root.iterdir()) if root.exists() else []
    assert leftovers == [], leftovers


def run_subcommand(register, argv: Sequence[str]) -> int:
    """Parse argv with only this module's subcommand registered and run it, as nnunetv2_smms.cli.main does."""
    parser = argparse.ArgumentParser(prog="nnunetv2_smms")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)

# (centre mm, semi-axes mm, CT HU, MR intensity, label); painted in this order, later ones on top
ELLIPSOIDS = (
    ((0, 0, 0), (40, 34, 52), 40, 350, 0),        # body, soft tissue
    ((0, -20, 5), (16, 8, 38), 900, 60, 0),       # bone: bright on CT, dark on T2
    ((-12, 14, 12), (8, 6, 14), -900, 15, 0),     # air cavity
    ((-20, -4, -26), (9, 12, 10), -90, 200, 0),   # fat
    ((16, 6, -14), (10, 8, 12), 70, 700, 1),      # tumour, the label
)
CT_BACKGROUND, MR_BACKGROUND = -1000, 0
CT_GRID = dict(size=(64, 64, 40), spacing=(1.5, 1.5, 3.0), origin=(-47.25, -47.25, -58.5))
MR_GRID = dict(size=(72, 72, 44), spacing=(1.3, 1.3, 2.8), origin=(-40.0, -52.0, -55.0))


def euler_transform(rotation_deg, translation_mm) -> sitk.Euler3DTransform:
    """Rigid transform about the origin: p = R x + t, angles in degrees about x, y, z."""
    t = sitk.Euler3DTransform()
    t.SetRotation(*np.deg2rad(rotation_deg))
    t.SetTranslation(tuple(float(v) for v in translation_mm))
    return t


def registration_error(recorded: dict, truth: sitk.Euler3DTransform) -> Tuple[float, float]:
    """How far a transform recorded in smms_manifest.json is from the truth: the largest point error over the
    phantom's body (its centre and the ends of its axes), in mm, and the residual rotation angle in degrees."""
    found = sitk.Euler3DTransform()
    found.SetFixedParameters(recorded["fixed_parameters"])
    found.SetParameters(recorded["parameters"])
    centre, axes = (np.asarray(a, float) for a in ELLIPSOIDS[0][:2])
    points = [centre] + [centre + s * a for a in np.diag(axes) for s in (-1, 1)]
    error_mm = max(np.linalg.norm(np.subtract(found.TransformPoint(tuple(p)), truth.TransformPoint(tuple(p))))
                   for p in points)
    residual = np.asarray(found.GetMatrix()).reshape(3, 3) @ np.asarray(truth.GetMatrix()).reshape(3, 3).T
    error_deg = np.degrees(np.arccos(np.clip((np.trace(residual) - 1) / 2, -1, 1)))
    return float(error_mm), float(error_deg)


def _grid_points(grid) -> np.ndarray:
    """Physical coordinates (z, y, x array order, xyz last axis) of every voxel of an identity-direction grid."""
    axes = [o + s * np.arange(n) for o, s, n in zip(grid["origin"], grid["spacing"], grid["size"])]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    return np.stack([x, y, z], axis=-1).transpose(2, 1, 0, 3)


def _paint(points: np.ndarray, column: int, background: float) -> np.ndarray:
    out = np.full(points.shape[:-1], background, dtype=np.float32)
    for centre, axes, *values in ELLIPSOIDS:
        inside = (((points - np.asarray(centre)) / np.asarray(axes)) ** 2).sum(-1) <= 1
        out[inside] = values[column]
    return out


def _image(array: np.ndarray, grid) -> sitk.Image:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(grid["spacing"])
    img.SetOrigin(grid["origin"])
    return img


def _scan(painted: np.ndarray, grid, noise: np.ndarray, pixel_type) -> sitk.Image:
    """Partial-volume blur (1 mm) plus noise, like a scanner's image of the painted ellipsoids."""
    blurred = sitk.SmoothingRecursiveGaussian(_image(painted, grid), 1.0)
    return sitk.Cast(blurred + _image(noise.astype(np.float32), grid), pixel_type)


def make_phantom_patient(folder: Path, transform: sitk.Euler3DTransform, seed: int = 0,
                         label_space: Optional[str] = "ct") -> None:
    """Write folder/ct.nii.gz, folder/mr.nii.gz and folder/label.nii.gz (on the CT or MR grid, or none).

    ``transform`` maps CT physical points to MR physical points, i.e. what registering the MR (moving) to the
    CT (fixed) should find.
    """
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    ct_points = _grid_points(CT_GRID)
    # an MR voxel at p shows the tissue at x = T^-1(p) = A^-1 (p - T(0))
    matrix = np.asarray(transform.GetMatrix()).reshape(3, 3)
    offset = np.asarray(transform.TransformPoint((0.0, 0.0, 0.0)))
    mr_points = (_grid_points(MR_GRID) - offset) @ np.linalg.inv(matrix).T
    ct = _scan(_paint(ct_points, 0, CT_BACKGROUND), CT_GRID, rng.normal(0, 10, ct_points.shape[:-1]), sitk.sitkInt16)
    mr = _scan(_paint(mr_points, 1, MR_BACKGROUND), MR_GRID, rng.normal(0, 10, mr_points.shape[:-1]), sitk.sitkFloat32)
    sitk.WriteImage(ct, str(folder / "ct.nii.gz"), True)
    sitk.WriteImage(sitk.Abs(mr), str(folder / "mr.nii.gz"), True)
    if label_space is not None:
        points, grid = (ct_points, CT_GRID) if label_space == "ct" else (mr_points, MR_GRID)
        label = sitk.Cast(_image(_paint(points, 2, 0), grid), sitk.sitkUInt8)
        sitk.WriteImage(label, str(folder / "label.nii.gz"), True)


def write_dicom_series(image: sitk.Image, folder: Path, intercept: int = -1024) -> None:
    """An (identity-direction) CT as a DICOM series with rescale slope 1 and the given intercept: ITK stores
    HU - intercept in the pixel data, and a reader must apply the rescale to get HU back."""
    folder.mkdir(parents=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    uid = "1.2.826.0.1.3680043.2.1125.7"
    for z in range(image.GetDepth()):
        slice_ = image[:, :, z]
        tags = {"0008|0060": "CT", "0020|000d": f"{uid}.1", "0020|000e": f"{uid}.2",
                "0008|0018": f"{uid}.3.{z + 1}", "0020|0013": str(z + 1),
                "0020|0032": "\\".join(map(str, image.TransformIndexToPhysicalPoint((0, 0, z)))),
                "0020|0037": "1\\0\\0\\0\\1\\0", "0028|1052": str(intercept), "0028|1053": "1"}
        for tag, value in tags.items():
            slice_.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{z:04d}.dcm"))
        writer.Execute(slice_)
