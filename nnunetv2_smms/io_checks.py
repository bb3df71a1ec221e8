"""Checks on image files that nnU-Net's readers do not make.

SimpleITK (and so nnU-Net's default SimpleITKIO) reads a truncated .nii / .nii.gz without an error and
returns zeros for the missing voxels; a half-copied scan would silently train as a mostly black image.
"""
from typing import Optional


def truncation_problem(path) -> Optional[str]:
    """None if `path` is complete (or not NIfTI, whose other readers fail by themselves), else the reason."""
    path = str(path)
    if not path.endswith((".nii", ".nii.gz")):
        return None
    import zlib

    import nibabel as nib
    import numpy as np
    try:
        np.asanyarray(nib.load(path).dataobj)  # nibabel checks the data length and the gzip stream
    except (OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError) as e:
        return f"{type(e).__name__}: {e}"
    return None
