"""What the dataset converters share: the error type, the labeled/unlabeled/validation/test split, header
checks, and writing a whole nnU-Net raw dataset folder atomically together with its split and manifest.

A converted dataset (nnU-Net v2 raw format plus three files of ours):

    DatasetXXX_Name/
        imagesTr/, labelsTr/   labeled training cases and validation cases (what nnU-Net plans and trains on)
        imagesUnlabeled/       unlabeled training cases, CASE_XXXX.nii.gz like imagesTr (nnU-Net ignores it)
        imagesTs/, labelsTs/   test cases
        dataset.json           with "smms": {"branch_a": [...], "branch_b": [...]} when there are 2+ channels
        splits_final.json      fold 0: train = labeled cases, val = validation cases
        smms_manifest.json     options, seed, source files and the role of every case
"""
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from nnunetv2_smms.io_checks import one_line
from nnunetv2_smms.staging import staged_folder
from nnunetv2_smms.errors import SMMSUserError, cli_command

FILE_ENDING = ".nii.gz"
SPLITS_NAME = "splits_final.json"
MANIFEST_NAME = "smms_manifest.json"
MANIFEST_FORMAT = 1
# role -> (images folder, labels folder or None)
ROLE_FOLDERS = {
    "labeled": ("imagesTr", "labelsTr"),
    "val": ("imagesTr", "labelsTr"),
    "unlabeled": ("imagesUnlabeled", None),
    "test": ("imagesTs", "labelsTs"),
}
# for dataset.json's "description"
LAYOUT = ("imagesTr/labelsTr: labeled training and validation cases (splits_final.json fold 0); imagesUnlabeled: "
          "unlabeled training cases; imagesTs/labelsTs: test cases")
# the paper: 250 / 25 / 60 of 335 BraTS 2019 cases; 7.5 % and 18 % of 335 round to 25 and 60
DEFAULT_LABELED, DEFAULT_VAL, DEFAULT_TEST, DEFAULT_SEED = "10%", "7.5%", "18%", 0

Amount = Union[int, float, str]


class ConversionError(SMMSUserError, ValueError):
    """Bad input or options. The message names the case and the file and says how to fix it."""


class CaseRejected(ConversionError):
    """A case that could be read but whose result fails a quality check (e.g. its registration). The
    conversion goes on with the other cases so that one run lists all of them, and then writes nothing."""


# ---------------------------------------------------------------------------------------------- the split

def parse_amount(value: Amount, option: str) -> Union[int, float]:
    """A number of cases (int: 12, '12') or a fraction (float: 0.05, '0.05', '5%')."""
    if isinstance(value, str):
        text = value.strip()
        try:
            value = float(text[:-1]) / 100 if text.endswith("%") else int(text) if text.isdigit() else float(text)
        except ValueError:
            raise ConversionError(f"{option} {text!r}: give a number of cases (12), a fraction (0.05) or a "
                                  f"percentage (5%)") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConversionError(f"{option} {value!r}: must be a number of cases or a fraction >= 0")
    if isinstance(value, float) and value > 1:
        raise ConversionError(f"{option} {value!r}: a fraction must be at most 1 (100%); give a number of "
                              f"cases as an integer")
    return value


def _count(amount: Union[int, float], total: int) -> int:
    """Cases for an amount: an int as is; a fraction of total rounded half up, at least 1 if it is > 0."""
    if isinstance(amount, int):
        return amount
    n = int(amount * total + 0.5)
    return max(n, 1) if amount > 0 else 0


def make_split(case_ids: Iterable[str], labeled: Amount, val: Amount, test: Amount, seed: int,
               unlabeled_only: Iterable[str] = ()) -> Dict[str, str]:
    """{case: 'labeled' | 'unlabeled' | 'val' | 'test'}.

    The sorted cases are shuffled once with the seed; the first ones are the test cases, the next ones the
    validation cases, the rest is the training pool whose first cases are labeled. Only the counts depend on
    the amounts, so for one seed a smaller labeled set lies inside a larger one and test and validation stay
    the same. Fractions of test and val are of all cases, the labeled fraction is of the training pool.
    Cases in ``unlabeled_only`` (no label exists) are unlabeled training cases outside the shuffle.
    """
    import numpy as np

    unlabeled_only = sorted(set(unlabeled_only))
    ids = sorted(set(case_ids) - set(unlabeled_only))
    order = [ids[i] for i in np.random.RandomState(seed).permutation(len(ids))]
    n_test = _count(parse_amount(test, "--test"), len(ids))
    n_val = _count(parse_amount(val, "--val"), len(ids))
    n_pool = len(ids) - n_test - n_val
    n_labeled = _count(parse_amount(labeled, "--labeled"), max(n_pool, 0))
    if n_val < 1:
        raise ConversionError("--val 0: nnU-Net's fold 0 needs at least one validation case")
    if n_labeled < 1 or n_labeled > n_pool:
        raise ConversionError(
            f"{len(ids)} cases minus {n_test} test and {n_val} validation cases leave {n_pool} for "
            f"training, so --labeled {labeled} ({n_labeled} cases) is impossible; lower --test/--val or change "
            f"--labeled")
    bounds = (("test", n_test), ("val", n_test + n_val), ("labeled", n_test + n_val + n_labeled))
    roles = {case: next((role for role, end in bounds if i < end), "unlabeled") for i, case in enumerate(order)}
    roles.update({case: "unlabeled" for case in unlabeled_only})
    return dict(sorted(roles.items()))


def resolve_split(case_ids: Sequence[str], labeled: Optional[Amount], val: Optional[Amount],
                  test: Optional[Amount], seed: Optional[int], manifest: Optional[Union[str, Path]],
                  unlabeled_only: Iterable[str] = ()) -> Tuple[Dict[str, str], dict]:
    """The roles of the cases and the manifest's "split" entry: drawn from the options, or read from a manifest."""
    if manifest is None:
        split = {"labeled": DEFAULT_LABELED if labeled is None else labeled,
                 "val": DEFAULT_VAL if val is None else val,
                 "test": DEFAULT_TEST if test is None else test,
                 "seed": DEFAULT_SEED if seed is None else int(seed)}
        return make_split(case_ids, unlabeled_only=unlabeled_only, **split), split
    given = [f"--{name}" for name, v in (("labeled", labeled), ("val", val), ("test", test), ("seed", seed))
             if v is not None]
    if given:
        raise ConversionError(f"--manifest fixes the split; leave out {', '.join(given)}")
    return _split_from_manifest(Path(manifest), case_ids, unlabeled_only)


def _split_from_manifest(path: Path, case_ids: Sequence[str], unlabeled_only: Iterable[str]):
    try:
        old = json.loads(path.read_text())
        roles = {case: entry["role"] for case, entry in old["cases"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConversionError(f"--manifest {path}: not a readable {MANIFEST_NAME} ({e!r})") from None
    unknown_roles = sorted({r for r in roles.values() if r not in ROLE_FOLDERS})
    missing, extra = sorted(set(roles) - set(case_ids)), sorted(set(case_ids) - set(roles))
    if unknown_roles or missing or extra:
        raise ConversionError(
            f"--manifest {path} does not fit the source: "
            + "; ".join(filter(None, [
                unknown_roles and f"unknown roles {unknown_roles}",
                missing and f"cases in the manifest but not in the source: {missing}",
                extra and f"cases in the source but not in the manifest: {extra} (leave them out with --exclude)"])))
    wrong = sorted(c for c in unlabeled_only if roles[c] != "unlabeled")
    if wrong:
        raise ConversionError(f"--manifest {path} gives a label-needing role to {wrong}, which have no label")
    split = {k: v for k, v in old.get("split", {}).items() if k != "from_manifest"}
    return dict(sorted(roles.items())), {"from_manifest": str(path.resolve()), **split}


def splits_final(roles: Dict[str, str]) -> List[dict]:
    """nnU-Net's splits_final.json content: one fold, train = labeled cases, val = validation cases."""
    return [{"train": sorted(c for c, r in roles.items() if r == "labeled"),
             "val": sorted(c for c, r in roles.items() if r == "val")}]


def smms_branches(channels: Sequence[str], spec: Optional[str]) -> Optional[Dict[str, List[int]]]:
    """dataset.json's "smms" entry: the channel indices of the two SMMS branches.

    ``spec`` is 'a,b|c,d' in channel keys (e.g. 't1,t1ce|t2,flair'); without it the first half of the channels
    (rounded up) goes to branch a. One channel: None (SMMS needs two branches)."""
    if spec is None:
        if len(channels) < 2:
            return None
        half = (len(channels) + 1) // 2
        return {"branch_a": list(range(half)), "branch_b": list(range(half, len(channels)))}
    sides = [[s.strip() for s in side.split(",") if s.strip()] for side in spec.split("|")]
    named = [c for side in sides for c in side]
    if len(sides) != 2 or not all(sides) or sorted(named) != sorted(channels):
        raise ConversionError(f"--branches {spec!r}: give every channel of {list(channels)} exactly once, in two "
                              f"non-empty groups separated by '|', e.g. {','.join(channels[:1])}|"
                              f"{','.join(channels[1:])}")
    return {f"branch_{b}": sorted(channels.index(c) for c in side) for b, side in zip("ab", sides)}


# ------------------------------------------------------------------------------------------ image checks

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


# -------------------------------------------------------------------------------- the dataset folder

def prepare_target(dataset_id: int, dataset_name: str, output_root: Optional[Union[str, Path]],
                   overwrite: bool) -> Path:
    """Path of the dataset folder to write, after checking that the id is free (or may be overwritten)."""
    from nnunetv2.paths import nnUNet_raw

    if not 1 <= int(dataset_id) <= 999:
        raise ConversionError(f"dataset id {dataset_id}: nnU-Net dataset ids are 1 to 999")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", dataset_name):
        raise ConversionError(f"dataset name {dataset_name!r}: use letters, digits, '_' and '-' only")
    if output_root is None:
        if not nnUNet_raw.is_set():
            raise ConversionError("nnUNet_raw is not set: export nnUNet_raw=/path/to/nnUNet_raw or pass "
                                  "--output-root")
        output_root = nnUNet_raw.get()
    target = Path(output_root).absolute() / f"Dataset{int(dataset_id):03d}_{dataset_name}"
    _check_id_free(target.parent, target.name)
    if target.exists() and not overwrite:
        raise ConversionError(f"{target} already exists: pass --overwrite to replace it, or choose another "
                              f"dataset id")
    return target


def _check_id_free(root: Path, folder_name: str) -> None:
    """nnU-Net refuses an id that two dataset names share."""
    prefix = folder_name[:len("DatasetXXX")]
    if root.is_dir():
        others = sorted(p.name for p in root.iterdir() if p.name.startswith(prefix) and p.name != folder_name)
        if others:
            raise ConversionError(f"dataset id {int(prefix[-3:])} is already used by {others} in {root}; nnU-Net "
                                  f"needs one name per id: choose another id, or remove {others[0]}")


def _preprocessed_split_path(target: Path) -> Optional[Path]:
    """Where nnU-Net reads the split, if the dataset goes into $nnUNet_raw and $nnUNet_preprocessed is set."""
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw

    if not (nnUNet_raw.is_set() and nnUNet_preprocessed.is_set()):
        return None
    if Path(nnUNet_raw.get()).resolve() != target.parent.resolve():
        return None
    return Path(nnUNet_preprocessed.get()).absolute() / target.name / SPLITS_NAME


def _check_installable(destination: Path, splits: list, overwrite: bool) -> None:
    _check_id_free(destination.parent.parent, destination.parent.name)
    if destination.is_file() and not overwrite and json.loads(destination.read_text()) != splits:
        raise ConversionError(
            f"{destination} holds a different split, and nnU-Net trains with that file. Pass --overwrite to "
            f"replace it (then re-run nnUNetv2_plan_and_preprocess), or choose another dataset id.")


def _copy_split(raw_dataset: Path, destination: Path) -> Path:
    destination.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(raw_dataset / SPLITS_NAME, destination)
    return destination


def install_split(raw_dataset: Path, preprocessed_root: Path, overwrite: bool) -> Path:
    """Copy raw_dataset/splits_final.json to preprocessed_root/<dataset>/splits_final.json."""
    source = raw_dataset / SPLITS_NAME
    if not source.is_file():
        raise ConversionError(f"{source} does not exist: convert the dataset with nnunetv2_smms convert-brats "
                              f"or convert-ct-mr, or put your own {SPLITS_NAME} there")
    destination = preprocessed_root / raw_dataset.name / SPLITS_NAME
    _check_installable(destination, json.loads(source.read_text()), overwrite)
    return _copy_split(raw_dataset, destination)


def write_json(path: Path, content) -> None:
    path.write_text(json.dumps(content, indent=2) + "\n")


def write_dataset(target: Path, *, overwrite: bool, roles: Dict[str, str],
                  convert_case: Callable[[str, Path, Optional[Path]], dict], dataset_json: dict,
                  manifest: dict, sources: Dict[str, Dict[str, str]]) -> Path:
    """Write the dataset folder in one piece and return it.

    ``convert_case(case, images_dir, labels_dir)`` writes one case (labels_dir is None for unlabeled cases)
    and returns extra manifest entries for it. ``dataset_json`` holds generate_dataset_json's arguments
    except the case count and file ending. If the dataset goes to $nnUNet_raw, the split is also installed
    into $nnUNet_preprocessed/<dataset>/ (checked before anything is written).
    """
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
    from tqdm import tqdm

    splits = splits_final(roles)
    installed = _preprocessed_split_path(target)
    if installed is not None:
        _check_installable(installed, splits, overwrite)
    cases, rejected = {}, []
    with staged_folder(target) as staging:
        for images, labels in ROLE_FOLDERS.values():
            for sub in (images, labels):
                if sub is not None:
                    (staging / sub).mkdir(exist_ok=True)
        for case in tqdm(sorted(roles), desc=f"writing {target.name}", unit="case"):
            images, labels = ROLE_FOLDERS[roles[case]]
            try:
                extra = convert_case(case, staging / images, None if labels is None else staging / labels)
            except CaseRejected as e:
                rejected.append(str(e))
                continue
            cases[case] = {"role": roles[case], "files": sources[case], **extra}
        if rejected:
            raise ConversionError(f"{len(rejected)} case(s) rejected, nothing was written:\n  "
                                  + "\n  ".join(rejected))
        generate_dataset_json(str(staging), num_training_cases=len(splits[0]["train"]) + len(splits[0]["val"]),
                              file_ending=FILE_ENDING, **dataset_json)
        write_json(staging / SPLITS_NAME, splits)
        counts = {role: sum(r == role for r in roles.values()) for role in ROLE_FOLDERS}
        write_json(staging / MANIFEST_NAME, {"format": MANIFEST_FORMAT, **manifest, "dataset": target.name,
                                             "counts": counts, "cases": cases})
    if installed is not None:
        _copy_split(target, installed)
    return target


# ----------------------------------------------------------------------------------------------- the CLI

def add_output_arguments(parser) -> None:
    parser.add_argument("-d", "--dataset-id", type=int, required=True, help="nnU-Net dataset id (1-999)")
    parser.add_argument("-n", "--dataset-name", required=True,
                        help="dataset name; the folder is DatasetXXX_NAME")
    parser.add_argument("--output-root", default=None,
                        help="folder to write DatasetXXX_NAME into (default: $nnUNet_raw). The split is copied "
                             "into $nnUNet_preprocessed only when writing into $nnUNet_raw")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing DatasetXXX_NAME (and a different installed splits_final.json)")


def add_split_arguments(parser) -> None:
    default = lambda amount: str(amount).replace("%", "%%")  # noqa: E731 (argparse formats help with %)
    parser.add_argument("--labeled", default=None,
                        help=f"labeled training cases: a count (12), a fraction (0.05) or a percentage (5%%) of "
                             f"the training cases left after test and validation (default "
                             f"{default(DEFAULT_LABELED)})")
    parser.add_argument("--val", default=None,
                        help=f"validation cases: count, fraction or percentage of all cases (default "
                             f"{default(DEFAULT_VAL)})")
    parser.add_argument("--test", default=None,
                        help=f"test cases: count, fraction or percentage of all cases (default "
                             f"{default(DEFAULT_TEST)})")
    parser.add_argument("--seed", type=int, default=None, help=f"split seed (default {DEFAULT_SEED})")
    parser.add_argument("--manifest", default=None,
                        help=f"reproduce the split recorded in this {MANIFEST_NAME} (instead of --labeled/--val/"
                             f"--test/--seed)")
    parser.add_argument("--exclude", default="", type=lambda s: [c.strip() for c in s.split(",") if c.strip()],
                        help="comma-separated cases (folder names) to leave out")


def split_kwargs(args) -> dict:
    return dict(labeled=args.labeled, val=args.val, test=args.test, seed=args.seed, manifest=args.manifest,
                exclude=args.exclude, output_root=args.output_root, overwrite=args.overwrite)


def run_cli(action: Callable[[], object]) -> int:
    """Run a converter subcommand and print what it returns (errors: errors.cli_command around the caller)."""
    result = action()
    if result is not None:
        print(result)
    return 0


def _install_split_command(args) -> int:
    def install():
        from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
        from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

        for name, variable in (("nnUNet_raw", nnUNet_raw), ("nnUNet_preprocessed", nnUNet_preprocessed)):
            if not variable.is_set():
                raise ConversionError(f"{name} is not set: export it as for nnUNetv2_plan_and_preprocess")
        try:
            dataset = maybe_convert_to_dataset_name(args.dataset)
        except (RuntimeError, ValueError) as e:
            raise ConversionError(str(e).strip()) from None
        return install_split(Path(nnUNet_raw.get()) / dataset, Path(nnUNet_preprocessed.get()), args.overwrite)

    return run_cli(install)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "install-split",
        help="copy a converted dataset's splits_final.json into $nnUNet_preprocessed/DatasetXXX_Name/",
        description=f"Copy $nnUNet_raw/DatasetXXX_Name/{SPLITS_NAME} (written by convert-brats / convert-ct-mr) "
                    f"to $nnUNet_preprocessed/DatasetXXX_Name/, where nnUNetv2_train reads it. nnU-Net's planner "
                    f"also copies it there when that file is missing; use this command when the preprocessed "
                    f"folder already holds another split.")
    p.add_argument("-d", "--dataset", required=True, help="dataset id or DatasetXXX_Name")
    p.add_argument("--overwrite", action="store_true", help="replace a different splits_final.json")
    p.set_defaults(func=cli_command(_install_split_command))
