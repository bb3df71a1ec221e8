"""Checks on image files that nnU-Net's readers do not make.

SimpleITK (and so nnU-Net's default SimpleITKIO) reads a truncated .nii / .nii.gz without an error and
returns zeros for the missing voxels; a half-copied scan would silently train as a mostly black image.
SimpleITK 2.5 (ITK 5.4) also reads NaN and inf voxels of a NIfTI file as 0, silently; in .nrrd / .mha they stay
NaN / inf and turn every loss they touch into NaN. nnU-Net looks for NaN only in --verify_dataset_integrity
(labeled cases, through SimpleITK, so never in NIfTI). SimpleITKIO accepts channels of one case whose origin or
direction differ (a warning on stdout) and stops without naming the case on other sizes or spacings.
"""
from typing import Optional, Sequence

# endings SimpleITK reads (nnU-Net's SimpleITKIO); other formats (png, tif, ...) are left to their own readers
SITK_ENDINGS = (".nii", ".nii.gz", ".nrrd", ".mha", ".gipl")


def _nifti_array(path: str):
    import numpy as np

    import nibabel as nib
    return np.asanyarray(nib.load(path).dataobj)  # nibabel checks the data length and the gzip stream


def _nifti_errors():
    import zlib

    import nibabel as nib
    return OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError


def nonfinite_problem(array) -> Optional[str]:
    """None if `array` has no NaN / inf voxels, else a phrase saying how many and how to fix it."""
    import numpy as np

    array = np.asarray(array)
    if not np.issubdtype(array.dtype, np.floating) or np.isfinite(array).all():
        return None
    n_nan, n_inf = int(np.isnan(array).sum()), int(np.isinf(array).sum())
    return (f"contains non-finite voxels ({n_nan} NaN, {n_inf} inf of {array.size}); replace them with a value "
            f"that makes sense for the image (e.g. its background)")


def nifti_content_problem(path) -> Optional[str]:
    """None if a NIfTI file is complete and has finite voxels (read with nibabel: SimpleITK reads truncated files
    as zeros and NaN / inf as 0), else the reason; other formats: None."""
    path = str(path)
    if not path.endswith((".nii", ".nii.gz")):
        return None
    try:
        array = _nifti_array(path)
    except _nifti_errors() as e:
        return f"is truncated or corrupt ({type(e).__name__}: {' '.join(str(e).split())})"
    return nonfinite_problem(array)


def one_line(e: Exception) -> str:
    """An exception's message on one line, without SimpleITK's source-location lines."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if lines and lines[0].startswith("Exception thrown in SimpleITK"):
        lines = lines[1:]
    text = " ".join(lines).replace("sitk::ERROR: ", "").replace("ITK ERROR: ", "") or type(e).__name__
    return text if len(text) <= 300 else text[:300] + "..."


def _header(path: str):
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    return reader


def image_file_problem(path) -> Optional[str]:
    """None if `path` is one complete 2D/3D single-channel image with finite voxels, else the reason (a phrase
    that follows the file name). Files SimpleITK does not read (see SITK_ENDINGS) are not checked.

    NIfTI voxels are read with nibabel: SimpleITK (2.5, ITK 5.4) reads NaN and inf in NIfTI files as 0, silently,
    so nnU-Net would train on them as 0; in .nrrd / .mha they reach the network as NaN / inf."""
    import SimpleITK as sitk

    path = str(path)
    if not path.endswith(SITK_ENDINGS):
        return None
    array = None
    if path.endswith((".nii", ".nii.gz")):
        try:
            array = _nifti_array(path)
        except _nifti_errors() as e:
            return f"is truncated or corrupt ({type(e).__name__}: {' '.join(str(e).split())})"
    try:
        reader = _header(path)
    except RuntimeError as e:
        return f"is not a readable image ({one_line(e)})"
    dim, components = reader.GetDimension(), reader.GetNumberOfComponents()
    if dim not in (2, 3):
        return (f"is a {dim}D image (size {reader.GetSize()}); each file must hold ONE channel of one case as a 2D "
                f"or 3D image (split a 4D file into CASE_0000, CASE_0001, ...)")
    if components != 1:
        return f"has {components} components per voxel (a vector/RGB image); each file must hold one channel"
    if array is None:
        try:
            array = sitk.GetArrayFromImage(sitk.ReadImage(path))
        except RuntimeError as e:
            return f"is not a readable image ({one_line(e)})"
    return nonfinite_problem(array)


def channel_grid_problem(files: Sequence) -> Optional[str]:
    """None if all channel files of one case share one voxel grid (size, spacing, origin, direction), else the
    difference, naming both files. Files SimpleITK does not read are not checked."""
    import numpy as np

    files = [str(f) for f in files if str(f).endswith(SITK_ENDINGS)]
    if len(files) < 2:
        return None
    ref = _header(files[0])
    for f in files[1:]:
        other = _header(f)
        for name, atol in (("size", 0), ("spacing", 1e-3), ("origin", 1e-3), ("direction", 1e-4)):
            a, b = getattr(ref, "Get" + name.title())(), getattr(other, "Get" + name.title())()
            if len(a) != len(b) or not np.allclose(a, b, rtol=0, atol=atol):
                return (f"{f} and {files[0]} do not share one voxel grid ({name} {tuple(b)} vs {tuple(a)}); all "
                        f"channels of a case must have the same size, spacing, origin and direction (resample them "
                        f"onto one grid)")
    return None
