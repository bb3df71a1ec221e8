"""Reading and checking the source: its case folders, image headers and voxels, voxel grids and label values,
and the errors a bad case raises; ``collect`` checks every case and reports all problems at once."""
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional, Tuple

from nnunetv2_smms.errors import SMMSUserError
from nnunetv2_smms.io_checks import one_line


class ConversionError(SMMSUserError, ValueError):
    """Bad input or options. The message names the case and the file and says how to fix it."""


class CaseRejected(ConversionError):
    """A case that could be read but whose result fails a quality check (e.g. its registration). The
    conversion goes on with the other cases so that one run lists all of them, and then writes nothing."""


@dataclass(frozen=True)
class Grid:
    """Voxel grid of an image; two images of one case must share it."""
    size: Tuple[int, ...]
    spacing: Tuple[float, ...]
    origin: Tuple[float, ...]
    direction: Tuple[float, ...]

    def difference(self, other: "Grid") -> Optional[str]:
        import numpy as np

        if self.size != other.size:
            return f"size {other.size} vs {self.size}"
        for name, atol in (("spacing", 1e-3), ("origin", 1e-3), ("direction", 1e-4)):
            if not np.allclose(getattr(self, name), getattr(other, name), rtol=0, atol=atol):
                return f"{name} {getattr(other, name)} vs {getattr(self, name)}"
        return None


def grid_of(image) -> Grid:
    """The grid of a SimpleITK image or ImageFileReader (after ReadImageInformation)."""
    return Grid(tuple(image.GetSize()), tuple(image.GetSpacing()), tuple(image.GetOrigin()),
                tuple(image.GetDirection()))


def _fix_hint(case: str) -> str:
    return f"Replace the file, or leave the case out with --exclude {case}."


def reason(e: Exception) -> str:
    """An exception's message on one line (shared with the unlabeled-image checks)."""
    return one_line(e)


def read_grid(path: Path, case: str) -> Grid:
    """The grid from the file's header only (cheap); the file must hold one 3D single-channel image."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise ConversionError(f"case {case}: cannot read {path}: {reason(e)}. {_fix_hint(case)}") from None
    if reader.GetDimension() != 3 or reader.GetNumberOfComponents() != 1:
        raise ConversionError(f"case {case}: {path} is not a 3D single-channel image (dimension "
                              f"{reader.GetDimension()}, {reader.GetNumberOfComponents()} components). "
                              f"{_fix_hint(case)}")
    return grid_of(reader)


def check_complete(path: Path, case: str) -> None:
    """Fail on a truncated or corrupt NIfTI, or one with NaN / inf voxels: SimpleITK would read the missing
    voxels as zeros and NaN / inf as 0, silently (see io_checks)."""
    from nnunetv2_smms.io_checks import nifti_content_problem

    problem = nifti_content_problem(path)
    if problem is None:
        return
    if problem.startswith("is truncated or corrupt"):
        raise ConversionError(f"case {case}: cannot read {path} ({problem}). {_fix_hint(case)}")
    raise ConversionError(f"case {case}: {path} {problem}, or leave the case out with --exclude {case}.")


def read_image(path: Path, case: str):
    """The whole image, after check_complete; other formats than NIfTI are checked for NaN / inf after reading."""
    import SimpleITK as sitk

    from nnunetv2_smms.io_checks import nonfinite_problem

    check_complete(path, case)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise ConversionError(f"case {case}: cannot read {path} (truncated or corrupt?): {reason(e)}. "
                              f"{_fix_hint(case)}") from None
    if not str(path).endswith((".nii", ".nii.gz")) and image.GetNumberOfComponentsPerPixel() == 1:
        problem = nonfinite_problem(sitk.GetArrayViewFromImage(image))
        if problem is not None:
            raise ConversionError(f"case {case}: {path} {problem}, or leave the case out with --exclude {case}.")
    return image


def check_same_grid(case: str, reference: Path, reference_grid: Grid, path: Path, grid: Grid) -> None:
    difference = reference_grid.difference(grid)
    if difference is not None:
        raise ConversionError(
            f"case {case}: {path} and {reference} do not share one voxel grid ({difference}). All images and the "
            f"label of a case must have the same size, spacing, origin and direction: resample them onto one "
            f"grid, or leave the case out with --exclude {case}.")


def check_label_values(case: str, path: Path, array, allowed: Iterable[int], convention: str) -> None:
    import numpy as np

    unexpected = sorted(set(np.unique(array).tolist()) - set(allowed))
    if unexpected:
        raise ConversionError(f"case {case}: label file {path} contains the values {unexpected}; {convention} "
                              f"allows only {sorted(allowed)}. Fix the label, or leave the case out with "
                              f"--exclude {case}.")


def collect(cases: Iterable[str], check: Callable[[str], object]) -> dict:
    """{case: check(case)} for every case, or one ConversionError that lists every case's problem."""
    results, problems = {}, []
    for case in cases:
        try:
            results[case] = check(case)
        except ConversionError as e:
            problems.append(str(e))
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise ConversionError(f"{len(problems)} case(s) cannot be converted:\n  " + "\n  ".join(shown))
    return results


def subfolders(source: Path) -> Dict[str, Path]:
    """{name: folder} for the folders in source, sorted, hidden ones skipped."""
    if not source.is_dir():
        raise ConversionError(f"source folder {source} does not exist")
    return {p.name: p for p in sorted(source.iterdir()) if p.is_dir() and not p.name.startswith(".")}


def exclude_cases(cases: Dict[str, Path], exclude: Iterable[str], source: Path) -> Dict[str, Path]:
    exclude = set(exclude)
    unknown = sorted(exclude - set(cases))
    if unknown:
        raise ConversionError(f"--exclude names cases that are not in {source}: {unknown}")
    return {case: folder for case, folder in cases.items() if case not in exclude}
