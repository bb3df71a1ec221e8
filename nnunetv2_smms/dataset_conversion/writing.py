"""Writing a converted dataset: checking the target folder, writing every case, dataset.json, the split and the
manifest in one atomic step, and installing the split where nnU-Net trains with it."""
import json
import re
import shutil
from pathlib import Path
from typing import Callable, Dict, Optional, Union

from nnunetv2_smms.dataset_conversion.checks import CaseRejected, ConversionError
from nnunetv2_smms.dataset_conversion.layout import (FILE_ENDING, MANIFEST_FORMAT, MANIFEST_NAME, ROLE_FOLDERS,
                                                     SPLITS_NAME)
from nnunetv2_smms.dataset_conversion.splits import splits_final
from nnunetv2_smms.staging import staged_folder


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


def install_dataset_split(dataset: str, overwrite: bool) -> Path:
    """install_split for a dataset of $nnUNet_raw (id or DatasetXXX_Name) into $nnUNet_preprocessed."""
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    for name, variable in (("nnUNet_raw", nnUNet_raw), ("nnUNet_preprocessed", nnUNet_preprocessed)):
        if not variable.is_set():
            raise ConversionError(f"{name} is not set: export it as for nnUNetv2_plan_and_preprocess")
    try:
        dataset_name = maybe_convert_to_dataset_name(dataset)
    except (RuntimeError, ValueError) as e:
        raise ConversionError(str(e).strip()) from None
    return install_split(Path(nnUNet_raw.get()) / dataset_name, Path(nnUNet_preprocessed.get()), overwrite)


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
