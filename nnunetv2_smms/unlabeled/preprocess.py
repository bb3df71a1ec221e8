"""`nnunetv2_smms preprocess-unlabeled`: preprocess nnUNet_raw/DatasetXXX/imagesUnlabeled with nnU-Net's own
preprocessor, plans and configuration, into a sibling of the configuration's preprocessed folder:

    nnUNet_preprocessed/DatasetXXX_Name/<data_identifier>_unlabeled/   (e.g. nnUNetPlans_3d_fullres_unlabeled)

Planning, fingerprint and normalization stay those of the labeled cases (the unlabeled cases never enter
nnU-Net's fingerprint), so plain nnU-Net on the same dataset is a fair baseline. Cases are preprocessed without
segmentation; nnU-Net then stores only its nonzero mask (-1 outside the image's nonzero region, 0 inside) in
the *_seg file and no class locations. Nothing is marked with the ignore label.

The folder carries ``smms_stamp.json``: a hash of everything in the plans that changes preprocessing, plus
the list of raw files (name, size, mtime). Re-planning or changed raw files make it stale; the trainer then
stops and names the command that fixes it. The folder is built in a temporary sibling and renamed into
place (nnunetv2_smms.staging), so it is complete or absent.
"""
import hashlib
import json
import multiprocessing
import os
import re
from typing import Dict, List, Optional

from tqdm import tqdm

from nnunetv2_smms.staging import staged_folder
from nnunetv2_smms.errors import SMMSUserError, cli_command

STAMP_FILE = "smms_stamp.json"
RAW_FOLDER = "imagesUnlabeled"


class UnlabeledDataError(SMMSUserError, RuntimeError):
    pass


def fix_command(dataset_name: str, configuration: str, plans_identifier: str) -> str:
    cmd = f"nnunetv2_smms preprocess-unlabeled -d {dataset_name} -c {configuration}"
    if plans_identifier != "nnUNetPlans":
        cmd += f" -p {plans_identifier}"
    return cmd


def unlabeled_folder(preprocessed_dataset_folder: str, data_identifier: str) -> str:
    return os.path.join(preprocessed_dataset_folder, data_identifier + "_unlabeled")


def collect_unlabeled_cases(raw_dataset_folder: str, dataset_json: dict) -> Dict[str, List[str]]:
    """{case_id: [file of channel 0, file of channel 1, ...]} from imagesUnlabeled, validated: every file is
    CASE_XXXX<file_ending>, and every case has exactly the dataset's channels."""
    folder = os.path.join(raw_dataset_folder, RAW_FOLDER)
    if not os.path.isdir(folder):
        return {}
    ending = dataset_json["file_ending"]
    n_channels = len(dataset_json["channel_names"])
    pattern = re.compile(r"^(.+)_(\d{4})" + re.escape(ending) + "$")
    cases: Dict[str, Dict[int, str]] = {}
    for f in sorted(os.listdir(folder)):
        if f.startswith("."):
            continue
        m = pattern.match(f)
        if m is None:
            raise UnlabeledDataError(
                f"{os.path.join(folder, f)}: not an image of the form CASE_XXXX{ending} (the dataset's file_ending "
                f"is {ending!r}, channels are numbered 0000..{n_channels - 1:04d}). Rename or remove the file.")
        cases.setdefault(m.group(1), {})[int(m.group(2))] = os.path.join(folder, f)
    out = {}
    for case, channels in cases.items():
        expected = set(range(n_channels))
        if set(channels) != expected:
            missing = sorted(expected - set(channels))
            extra = sorted(set(channels) - expected)
            raise UnlabeledDataError(
                f"unlabeled case {case!r} in {folder}: has channels {sorted(channels)} but the dataset has "
                f"{n_channels} ({dataset_json['channel_names']})"
                + (f"; missing {', '.join(f'{case}_{c:04d}{ending}' for c in missing)}" if missing else "")
                + (f"; unexpected {', '.join(f'{case}_{c:04d}{ending}' for c in extra)}" if extra else "")
                + ". Every unlabeled case needs exactly the channels of imagesTr.")
        out[case] = [channels[c] for c in range(n_channels)]
    return out


# keys of a resolved configuration that do not change how a case is preprocessed: configurations that differ
# only in these (e.g. `nnunetv2_smms plan-gpu`'s 3d_fullres_smms_12GB, which inherits 3d_fullres and keeps its
# data_identifier) share one unlabeled folder and one stamp
NOT_PREPROCESSING_KEYS = ("smms", "semi_supervised", "smms_gpu_plan", "patch_size", "batch_size", "architecture",
                          "inherits_from")


def plans_hash(plans: dict, configuration_name: str, dataset_json: dict) -> str:
    """Hash of what determines preprocessing: the resolved configuration (without the settings trainers record,
    'smms' and 'semi_supervised', and the training-only keys patch_size, batch_size, architecture), the intensity
    properties, transpose and reader, and the dataset's channels."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    cfg = dict(PlansManager(plans).get_configuration(configuration_name).configuration)
    for key in NOT_PREPROCESSING_KEYS:
        cfg.pop(key, None)
    relevant = {
        "configuration": cfg,
        "plans_name": plans.get("plans_name"),
        "intensity": plans.get("foreground_intensity_properties_per_channel"),
        "transpose_forward": plans.get("transpose_forward"),
        "reader": plans.get("image_reader_writer"),
        "channel_names": dataset_json.get("channel_names"),
        "file_ending": dataset_json.get("file_ending"),
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()


def raw_listing(cases: Dict[str, List[str]]) -> Dict[str, list]:
    return {c: [[os.path.basename(f), os.path.getsize(f), os.stat(f).st_mtime_ns] for f in files]
            for c, files in sorted(cases.items())}


def env_folder(path) -> Optional[str]:
    """A folder from nnunetv2.paths as str, None when unset. nnunetv2 2.8.1 holds lazy _EnvPath objects, never
    None (os.path.join on an unset one raises RuntimeError); older releases hold a str or None."""
    if path is None:
        return None
    if hasattr(path, "is_set"):
        return path.get() if path.is_set() else None
    return os.fspath(path)


def _load_context(dataset_name_or_id, configuration: str, plans_identifier: str):
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2 import paths
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    nnUNet_preprocessed, nnUNet_raw = env_folder(paths.nnUNet_preprocessed), env_folder(paths.nnUNet_raw)
    if nnUNet_preprocessed is None:
        raise UnlabeledDataError("nnUNet_preprocessed is not set: export nnUNet_raw and nnUNet_preprocessed as for "
                                 "nnUNetv2_plan_and_preprocess")
    try:
        dataset_name = maybe_convert_to_dataset_name(dataset_name_or_id)
    except RuntimeError as e:
        raise UnlabeledDataError(" ".join(str(e).split())) from None
    pre = os.path.join(nnUNet_preprocessed, dataset_name)
    plans_file = os.path.join(pre, plans_identifier + ".json")
    if not os.path.isfile(plans_file):
        raise UnlabeledDataError(f"{plans_file} not found: plan the labeled dataset first "
                                 f"(nnUNetv2_plan_and_preprocess -d {dataset_name} -c {configuration})")
    plans = load_json(plans_file)
    if configuration not in plans["configurations"]:
        raise UnlabeledDataError(f"configuration {configuration!r} is not in {plans_file} "
                                 f"(has {sorted(plans['configurations'])})")
    dataset_json = load_json(os.path.join(pre, "dataset.json"))
    raw = os.path.join(nnUNet_raw, dataset_name) if nnUNet_raw is not None else None
    return dataset_name, pre, raw, plans, dataset_json


def stamp_status(folder: str, expected_hash: str, listing: Optional[dict]) -> str:
    """'ok', 'missing' or a sentence saying why the folder is stale."""
    stamp_path = os.path.join(folder, STAMP_FILE)
    if not os.path.isfile(stamp_path):
        return "missing"
    with open(stamp_path) as f:
        stamp = json.load(f)
    if stamp.get("plans_hash") != expected_hash:
        return "it was made with other plans (the dataset was re-planned or the plans changed)"
    if listing is not None and stamp.get("raw") != listing:
        return "the raw unlabeled images changed since (files added, removed or modified)"
    return "ok"


def check_unlabeled_ready(dataset_name: str, preprocessed_dataset_folder: str, raw_dataset_folder: Optional[str],
                          plans: dict, configuration: str, dataset_json: dict, plans_identifier: str,
                          supervised_alternative: str = "nnUNetTrainer") -> str:
    """The unlabeled folder to train from; raises UnlabeledDataError naming the fixing command otherwise
    (and, when there are no unlabeled cases at all, the trainer to use without them)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    data_identifier = PlansManager(plans).get_configuration(configuration).data_identifier
    folder = unlabeled_folder(preprocessed_dataset_folder, data_identifier)
    cases = collect_unlabeled_cases(raw_dataset_folder, dataset_json) \
        if raw_dataset_folder is not None and os.path.isdir(raw_dataset_folder) else None
    status = stamp_status(folder, plans_hash(plans, configuration, dataset_json),
                          raw_listing(cases) if cases else None)
    cmd = fix_command(dataset_name, configuration, plans_identifier)
    if status == "missing":
        if cases == {}:
            raise UnlabeledDataError(
                f"No unlabeled cases for {dataset_name}: put them in "
                f"{os.path.join(raw_dataset_folder, RAW_FOLDER)} (CASE_0000{dataset_json['file_ending']}, ...), "
                f"then run: {cmd}. To train without unlabeled data use {supervised_alternative}.")
        raise UnlabeledDataError(f"The unlabeled cases of {dataset_name} are not preprocessed for configuration "
                                 f"{configuration!r} ({folder} missing). Run: {cmd}")
    if status != "ok":
        raise UnlabeledDataError(f"The preprocessed unlabeled cases in {folder} are stale: {status}. Run: {cmd}")
    return folder


def _preprocess_one(args):
    out_truncated, files, plans, configuration, dataset_json = args
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunetv2_smms.io_checks import channel_grid_problem, image_file_problem
    case = os.path.basename(out_truncated)
    for f in files:  # before nnU-Net reads them: it reads truncated files as zeros and keeps NaN/inf voxels
        problem = image_file_problem(f)
        if problem is not None:
            raise UnlabeledDataError(f"unlabeled case {case!r}: {f} {problem}. Fix, re-copy or remove this case's "
                                     f"files.")
    problem = channel_grid_problem(files)
    if problem is not None:
        raise UnlabeledDataError(f"unlabeled case {case!r}: {problem}. Fix or remove this case's files.")
    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    try:
        cm.preprocessor_class(verbose=False).run_case_save(out_truncated, files, None, pm, cm, dataset_json)
    except Exception as e:
        raise UnlabeledDataError(f"unlabeled case {case!r} (files {files}) could not be "
                                 f"preprocessed: {type(e).__name__}: {e}. Fix or remove these files.") from e
    return os.path.basename(out_truncated)


def preprocess_unlabeled(dataset_name_or_id, configuration: str = "3d_fullres",
                         plans_identifier: str = "nnUNetPlans", num_processes: int = 1, force: bool = False) -> str:
    dataset_name, pre, raw, plans, dataset_json = _load_context(dataset_name_or_id, configuration, plans_identifier)
    if raw is None:
        raise UnlabeledDataError("nnUNet_raw is not set: the unlabeled cases are read from "
                                 "$nnUNet_raw/DatasetXXX_Name/imagesUnlabeled")
    cases = collect_unlabeled_cases(raw, dataset_json)
    if not cases:
        raise UnlabeledDataError(f"No unlabeled cases found in {os.path.join(str(raw), RAW_FOLDER)} "
                                 f"(expected CASE_0000{dataset_json['file_ending']}, CASE_0001... per case)")
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    data_identifier = PlansManager(plans).get_configuration(configuration).data_identifier
    target = unlabeled_folder(pre, data_identifier)
    expected_hash, listing = plans_hash(plans, configuration, dataset_json), raw_listing(cases)
    if not force and stamp_status(target, expected_hash, listing) == "ok":
        print(f"{target} is up to date ({len(cases)} cases); use --force to redo it")
        return target

    with staged_folder(target) as tmp:
        jobs = [(os.path.join(tmp, c), files, plans, configuration, dataset_json) for c, files in cases.items()]
        desc = f"Preprocessing unlabeled cases ({configuration})"
        if num_processes <= 1:
            for j in tqdm(jobs, desc=desc):
                _preprocess_one(j)
        else:
            with multiprocessing.get_context("spawn").Pool(num_processes) as pool:
                for _ in tqdm(pool.imap_unordered(_preprocess_one, jobs), total=len(jobs), desc=desc):
                    pass
        with open(os.path.join(tmp, STAMP_FILE), "w") as f:
            json.dump({"plans_hash": expected_hash, "configuration": configuration,
                       "plans_identifier": plans_identifier, "raw": listing}, f, indent=1)
    print(f"Preprocessed {len(cases)} unlabeled cases into {target}")
    return target


def _run(args) -> int:
    for c in args.c:
        preprocess_unlabeled(args.d, c, args.p, args.np, args.force)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "preprocess-unlabeled",
        help="preprocess nnUNet_raw/DatasetXXX/imagesUnlabeled with the dataset's plans",
        description="Preprocess the unlabeled cases (nnUNet_raw/DatasetXXX_Name/imagesUnlabeled/CASE_XXXX.ext, "
                    "same channels and file ending as imagesTr) with nnU-Net's own preprocessor and the labeled "
                    "dataset's plans, into nnUNet_preprocessed/DatasetXXX_Name/<data_identifier>_unlabeled. "
                    "Run it after nnUNetv2_plan_and_preprocess, and again after any re-planning.")
    p.add_argument("-d", required=True, help="dataset name or id")
    p.add_argument("-c", nargs="+", default=["3d_fullres"], help="configuration(s) (default: 3d_fullres)")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier (default: nnUNetPlans)")
    p.add_argument("-np", type=int, default=1, help="number of processes (default: 1)")
    p.add_argument("--force", action="store_true", help="redo even if the folder is up to date")
    p.set_defaults(func=cli_command(_run))
