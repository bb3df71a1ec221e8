"""``nnunetv2_smms convert-brats``: a BraTS training folder as distributed -> nnU-Net raw dataset with the SMMS
split (the paper's setting: T1ce + T2, whole tumour, 250/25/60 of BraTS 2019's 335 cases).

Images are copied byte for byte; only the label is rewritten (whole tumour: uint8 0/1, or nnU-Net's BraTS
regions as in its Dataset137_BraTS21 conversion).
"""
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

from nnunetv2_smms.dataset_conversion.arguments import add_output_arguments, add_split_arguments, run_cli, split_kwargs
from nnunetv2_smms.dataset_conversion.checks import (ConversionError, check_complete, check_label_values,
                                                     check_same_grid, collect, exclude_cases, read_grid, read_image,
                                                     subfolders)
from nnunetv2_smms.dataset_conversion.layout import FILE_ENDING, LAYOUT, smms_branches
from nnunetv2_smms.dataset_conversion.splits import Amount, resolve_split
from nnunetv2_smms.dataset_conversion.writing import prepare_target, write_dataset
from nnunetv2_smms.errors import cli_command

MODALITIES = ("t1", "t1ce", "t2", "flair")
CHANNEL_NAMES = {"t1": "T1", "t1ce": "T1ce", "t2": "T2", "flair": "FLAIR"}


@dataclass(frozen=True)
class Naming:
    """How one BraTS release names its files and labels."""
    releases: str
    separator: str
    suffixes: Dict[str, str]  # modality or "seg" -> file suffix
    labels: Tuple[int, ...]   # values a segmentation may hold
    to_regions: Dict[int, int]  # source label -> nnU-Net's BraTS label (1 edema, 2 non-enhancing/necrotic, 3 ET)


NAMINGS = (
    Naming("BraTS 2018-2021", "_", {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair", "seg": "seg"},
           (0, 1, 2, 4), {2: 1, 1: 2, 4: 3}),
    Naming("BraTS 2023+", "-", {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f", "seg": "seg"},
           (0, 1, 2, 3), {2: 1, 1: 2, 3: 3}),
)

# target -> generate_dataset_json arguments; nnU-Net's labels after conversion
TARGETS = {
    "whole-tumor": {"labels": {"background": 0, "whole tumor": 1}},
    "regions": {"labels": {"background": 0, "whole tumor": (1, 2, 3), "tumor core": (2, 3),
                           "enhancing tumor": (3,)},
                "regions_class_order": (1, 2, 3)},
}


@dataclass(frozen=True)
class BratsCase:
    naming: Naming
    files: Dict[str, Path]  # modality or "seg" -> source file


def find_case_folders(source: Path) -> Dict[str, Path]:
    """{case: folder}. A folder without images but with sub-folders is a group (BraTS 2019's HGG/ and LGG/)."""
    cases = {}
    for name, folder in subfolders(source).items():
        is_group = not any(folder.glob("*" + FILE_ENDING)) and any(p.is_dir() for p in folder.iterdir())
        for case, case_folder in (subfolders(folder) if is_group else {name: folder}).items():
            if case in cases:
                raise ConversionError(f"case {case} is in both {cases[case]} and {case_folder}; remove one")
            cases[case] = case_folder
    return cases


def _naming(case: str, folder: Path) -> Naming:
    found = [n for n in NAMINGS
             if any((folder / f"{case}{n.separator}{s}{FILE_ENDING}").is_file() for s in n.suffixes.values())]
    if len(found) != 1:
        examples = " or ".join(f"{case}{n.separator}{n.suffixes['t1ce']}{FILE_ENDING}" for n in NAMINGS)
        problem = "no BraTS files" if not found else "files of two BraTS naming schemes"
        raise ConversionError(f"case {case}: {problem} in {folder} (expected e.g. {examples}). Fix the folder, "
                              f"or leave the case out with --exclude {case}.")
    return found[0]


def _check_case(case: str, folder: Path, modalities: Sequence[str]) -> BratsCase:
    """Header-level checks of one case: all files present, readable, 3D, on one voxel grid."""
    naming = _naming(case, folder)
    files = {key: folder / f"{case}{naming.separator}{naming.suffixes[key]}{FILE_ENDING}"
             for key in (*modalities, "seg")}
    for key, path in files.items():
        if not path.is_file():
            what = "segmentation" if key == "seg" else f"{key} image"
            raise ConversionError(f"case {case}: the {what} {path} is missing. Every case needs "
                                  f"{', '.join(p.name for p in files.values())}; restore the file, or leave the "
                                  f"case out with --exclude {case}.")
    reference = files[modalities[0]]
    reference_grid = read_grid(reference, case)
    for path in list(files.values())[1:]:
        check_same_grid(case, reference, reference_grid, path, read_grid(path, case))
    return BratsCase(naming, files)


def _write_case(case: str, brats_case: BratsCase, modalities: Sequence[str], target: str, images_dir: Path,
                labels_dir: Optional[Path]) -> dict:
    import numpy as np
    import SimpleITK as sitk

    for channel, modality in enumerate(modalities):
        source = brats_case.files[modality]
        check_complete(source, case)  # a truncated file fails here, not silently in nnU-Net
        shutil.copyfile(source, images_dir / f"{case}_{channel:04d}{FILE_ENDING}")
    if labels_dir is not None:
        naming, path = brats_case.naming, brats_case.files["seg"]
        seg = read_image(path, case)
        array = sitk.GetArrayViewFromImage(seg)
        check_label_values(case, path, array, naming.labels, f"{naming.releases} naming")
        mapping = naming.to_regions if target == "regions" else {v: 1 for v in naming.labels if v}
        lookup = np.zeros(max(naming.labels) + 1, dtype=np.uint8)
        lookup[list(mapping)] = list(mapping.values())
        label = sitk.GetImageFromArray(lookup[array.astype(np.intp)])
        label.CopyInformation(seg)
        sitk.WriteImage(label, str(labels_dir / f"{case}{FILE_ENDING}"), useCompression=True)
    return {}


def convert_brats(source: Union[str, Path], dataset_id: int, dataset_name: str,
                  modalities: Sequence[str] = ("t1ce", "t2"), target: str = "whole-tumor",
                  branches: Optional[str] = None, labeled: Optional[Amount] = None, val: Optional[Amount] = None,
                  test: Optional[Amount] = None, seed: Optional[int] = None,
                  manifest: Optional[Union[str, Path]] = None, exclude: Sequence[str] = (),
                  output_root: Optional[Union[str, Path]] = None, overwrite: bool = False) -> Path:
    """Convert a BraTS training folder (one folder per case, BraTS 2018-2021 or 2023+ file names; BraTS 2019's
    HGG/LGG grouping is fine) into output_root/DatasetXXX_Name and return that folder. See
    docs/dataset_conversion.md for the options."""
    source = Path(source).absolute()
    modalities = list(modalities)
    if not modalities or len(set(modalities)) != len(modalities) or not set(modalities) <= set(MODALITIES):
        raise ConversionError(f"modalities {modalities}: choose distinct ones among {list(MODALITIES)}, "
                              f"e.g. t1ce,t2")
    if target not in TARGETS:
        raise ConversionError(f"target {target!r}: choose one of {list(TARGETS)}")
    branch_split = smms_branches(modalities, branches)
    destination = prepare_target(dataset_id, dataset_name, output_root, overwrite)
    folders = exclude_cases(find_case_folders(source), exclude, source)
    if not folders:
        raise ConversionError(f"no case folders in {source}")
    cases = collect(folders, lambda case: _check_case(case, folders[case], modalities))
    roles, split = resolve_split(list(cases), labeled, val, test, seed, manifest)
    dataset_json = {
        "channel_names": {i: CHANNEL_NAMES[m] for i, m in enumerate(modalities)},
        **TARGETS[target],
        "dataset_name": destination.name,
        "reference": "BraTS: Menze et al., IEEE TMI 2015; Bakas et al., Sci. Data 2017; arXiv:1811.02629",
        "license": "BraTS data terms of use (non-commercial research)",
        "converted_by": "nnunetv2_smms convert-brats",
        "description": LAYOUT,
    }
    if branch_split is not None:
        dataset_json["smms"] = branch_split
    return write_dataset(
        destination, overwrite=overwrite, roles=roles, dataset_json=dataset_json,
        convert_case=lambda case, images, labels: _write_case(case, cases[case], modalities, target, images,
                                                              labels),
        sources={case: {k: str(p) for k, p in c.files.items()} for case, c in cases.items()},
        manifest={"command": "convert-brats", "source": str(source),
                  "options": {"modalities": modalities, "target": target, "branches": branch_split,
                              "exclude": sorted(exclude)},
                  "split": split})


def _run(args) -> int:
    return run_cli(lambda: convert_brats(
        args.source, args.dataset_id, args.dataset_name,
        modalities=[m.strip() for m in args.modalities.split(",") if m.strip()], target=args.target,
        branches=args.branches, **split_kwargs(args)))


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert-brats",
        help="BraTS training folder -> nnU-Net raw dataset with labeled/unlabeled/val/test split",
        description="Convert a BraTS training folder (one folder per case with <case>_{t1,t1ce,t2,flair,seg}"
                    ".nii.gz, or the 2023+ names <case>-{t1n,t1c,t2w,t2f,seg}.nii.gz) into an nnU-Net v2 raw "
                    "dataset: labeled and validation cases in imagesTr/labelsTr, unlabeled training cases in "
                    "imagesUnlabeled, test cases in imagesTs/labelsTs, plus splits_final.json and "
                    "smms_manifest.json. See docs/dataset_conversion.md.")
    p.add_argument("source", help="BraTS training folder (one sub-folder per case, or HGG/ and LGG/ groups)")
    add_output_arguments(p)
    p.add_argument("--modalities", default="t1ce,t2",
                   help=f"comma-separated channels in order, from {','.join(MODALITIES)} (default t1ce,t2)")
    p.add_argument("--target", choices=list(TARGETS), default="whole-tumor",
                   help="whole-tumor: labels 1, 2, 4 as one class (the paper); regions: nnU-Net's BraTS regions "
                        "(whole tumor, tumor core, enhancing tumor)")
    p.add_argument("--branches", default=None,
                   help="channels of the two SMMS branches, e.g. 't1,t1ce|t2,flair' (default: first half of "
                        "--modalities | second half)")
    add_split_arguments(p)
    p.set_defaults(func=cli_command(_run))
