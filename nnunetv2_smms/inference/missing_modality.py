"""Prediction of a folder in which a case may lack a modality's file: nnU-Net's predictor for every case, the
present modality's branch for a case without the other.

nnUNetv2_predict reads whatever CASE_XXXX files a case has, so a case without its _0001 file reaches the network
one channel short (nnU-Net issues #513, #1245, #2461: not supported). ``predict_folder`` groups the files by case
first (the model's dataset.json: file ending, channels), checks everything, then:
- complete cases go through nnU-Net's predictor exactly as nnUNetv2_predict sends them (the same predictor, files
  and output: an SMMS model's recorded one, fused);
- a case missing channels of ONE SMMS branch gets each missing channel as a temporary image of zeros with the
  geometry of a channel it has (nnU-Net's own reader/writer of the dataset, so shape, spacing, origin and direction
  are that channel's) and is predicted by the OTHER branch (``set_output_branch``). nnU-Net's z-score normalisation
  maps the zero image to 0, the value modality dropout (trainers/modality_dropout.py) trains with; for another
  normalisation scheme the log says that the filled channel is not 0 after preprocessing;
- a model without branches (plain nnU-Net) predicts such a case with the zero-filled channel(s) as its input, and
  the log says so;
- a case that leaves no SMMS branch complete, or a file that is not CASE_XXXX<file_ending> with XXXX a channel of
  the dataset: an error naming the case or file, before anything is predicted.
Every incomplete case is printed (what was missing, what predicted it) and listed in ``missing_modalities.json`` in
the output folder. Segmentations are exported by nnU-Net (its resampling and writer) into a temporary folder inside
the output folder and moved into place file by file with os.replace (atomic on one file system): a failure leaves
no half-written segmentation, and the temporary files are removed in every case.
"""
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from nnunetv2_smms.architectures.config import branch_channel_names
from nnunetv2_smms.errors import SMMSUserError

REPORT = "missing_modalities.json"
ZERO_IS_MEAN = ("ZScoreNormalization",)   # schemes that map a constant (zero) image to 0


class MissingModalityError(SMMSUserError, ValueError):
    pass


@dataclass
class Case:
    name: str
    files: Dict[int, str]            # channel -> file
    n_channels: int

    @property
    def missing(self) -> List[int]:
        return [c for c in range(self.n_channels) if c not in self.files]


@dataclass
class CasePlan:
    case: Case
    branch: Optional[str]            # None: the model's own output (complete case, or a model without branches)
    note: str = ""                   # the log line of an incomplete case
    filled: Dict[int, str] = field(default_factory=dict)  # channel -> temporary zero image


def group_by_case(folder: str, file_ending: str, channel_names: Dict[str, str]) -> List[Case]:
    """The cases of ``folder`` (nnU-Net naming CASE_XXXX<file_ending>); files with other endings are ignored, as
    nnUNetv2_predict does. A file with the ending but not a channel of the dataset is an error naming it."""
    n = len(channel_names)
    pattern = re.compile(r"(?P<case>.+)_(?P<channel>\d{4})")
    cases: Dict[str, Case] = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not name.endswith(file_ending) or not os.path.isfile(path):
            continue
        m = pattern.fullmatch(name[:-len(file_ending)])
        if m is None or int(m["channel"]) >= n:
            channels = ", ".join(f"{int(k):04d} ({v})" for k, v in sorted(channel_names.items(),
                                                                          key=lambda kv: int(kv[0])))
            raise MissingModalityError(f"{path}: not an image of this model's dataset: expected "
                                       f"CASE_XXXX{file_ending} with XXXX one of {channels}")
        cases.setdefault(m["case"], Case(m["case"], {}, n)).files[int(m["channel"])] = path
    if not cases:
        raise MissingModalityError(f"{folder}: no images CASE_XXXX{file_ending}")
    return list(cases.values())


def plan_cases(cases: Sequence[Case], dataset_json: dict, branches: Optional[Dict[str, List[int]]],
               normalization_schemes: Sequence[str] = ()) -> List[CasePlan]:
    """What predicts each case. ``branches``: {"a": channels, "b": channels} of an SMMS model, None for a model
    without branches. Raises for a case that no branch can predict (all of them checked before any prediction)."""
    file_ending = dataset_json["file_ending"]

    def names(channels):
        return ", ".join(f"{c:04d} ({dataset_json['channel_names'].get(str(c), c)})" for c in channels)

    plans, errors = [], []
    for case in cases:
        missing = case.missing
        if not missing:
            plans.append(CasePlan(case, None))
            continue
        files = ", ".join(f"{case.name}_{c:04d}{file_ending}" for c in missing)
        what = f"case {case.name}: missing {files} (channel {names(missing)})"
        if branches is None:
            note = (f"{what}; this model has no per-modality branches: predicted by the whole network with the "
                    f"missing channel(s) zero-filled (it was trained with them: expect a worse segmentation)")
            branch = None
        else:
            complete = [b for b, channels in branches.items() if not set(channels) & set(missing)]
            if not complete:
                errors.append(f"{what}: no branch has all its channels (a: {names(branches['a'])}; b: "
                              f"{names(branches['b'])}), so no branch can predict it")
                continue
            branch = complete[0]
            note = (f"{what}; predicted by branch {branch} ({branch_channel_names(dataset_json, branches[branch])}) "
                    f"with the missing channel(s) zero-filled")
        odd = [c for c in missing if c < len(normalization_schemes) and normalization_schemes[c] not in ZERO_IS_MEAN]
        if odd:
            note += (f" (channel(s) {odd} use {sorted({normalization_schemes[c] for c in odd})}: zero is not their "
                     f"normalised mean)")
        plans.append(CasePlan(case, branch, note))
    if errors:
        raise MissingModalityError("; ".join(errors))
    return plans


def write_zero_channel(reader_writer, like_file: str, out_file: str) -> None:
    """An image of zeros with the geometry of ``like_file``, through the dataset's nnU-Net reader/writer."""
    image, properties = reader_writer.read_images([like_file])
    reader_writer.write_seg(np.zeros(image.shape[1:], dtype=np.uint8), out_file, properties)


def _outputs(case: str, file_ending: str, save_probabilities: bool) -> List[str]:
    return [case + file_ending] + ([case + ".npz", case + ".pkl"] if save_probabilities else [])


def _write_json_atomic(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def predict_folder(predictor, input_folder: str, output_folder: str, save_probabilities: bool = False,
                   overwrite: bool = True, num_processes_preprocessing: int = 3,
                   num_processes_segmentation_export: int = 3, folder_with_segs_from_prev_stage: str = None,
                   log: Callable[[str], None] = print) -> dict:
    """Predict every case of ``input_folder`` into ``output_folder`` with an initialised nnUNetPredictor (see the
    module docstring); ``num_processes_*`` both 0: nnU-Net's sequential prediction, as nnUNetv2_predict. Returns
    the report written to missing_modalities.json."""
    from nnunetv2_smms.architectures import has_branches, set_output_branch, unwrap

    dataset_json = predictor.dataset_json
    file_ending = dataset_json["file_ending"]
    network = unwrap(predictor.network)
    # a network with one output per modality (SMMS; any with channels_a/_b and the output_branch switch)
    per_modality = has_branches(network) and hasattr(network, "channels_a") and hasattr(network, "channels_b")
    branches = {"a": list(network.channels_a), "b": list(network.channels_b)} if per_modality else None
    plans = plan_cases(group_by_case(input_folder, file_ending, dataset_json["channel_names"]), dataset_json,
                       branches, predictor.configuration_manager.normalization_schemes)
    os.makedirs(output_folder, exist_ok=True)
    if not overwrite:
        done = [p for p in plans if all(os.path.isfile(os.path.join(output_folder, f))
                                        for f in _outputs(p.case.name, file_ending, save_probabilities))]
        if done:
            log(f"{len(done)} of {len(plans)} cases are predicted already (--continue_prediction): skipped")
        plans = [p for p in plans if p not in done]
    for p in plans:
        if p.note:
            log(p.note)
    groups: Dict[Optional[str], List[CasePlan]] = {}
    for p in plans:
        groups.setdefault(p.branch, []).append(p)

    report = {"input_folder": os.path.abspath(input_folder), "trainer": predictor.trainer_name,
              "complete_cases": sorted(p.case.name for p in plans if not p.case.missing),
              "incomplete_cases": {p.case.name: {
                  "missing_files": [f"{p.case.name}_{c:04d}{file_ending}" for c in p.case.missing],
                  "missing_channels": {f"{c:04d}": dataset_json["channel_names"].get(str(c)) for c in p.case.missing},
                  "predicted_by": (f"branch {p.branch} ({branch_channel_names(dataset_json, branches[p.branch])})"
                                   if p.branch else "whole network, missing channel(s) zero-filled"),
                  "note": p.note} for p in plans if p.case.missing}}
    work = tempfile.mkdtemp(prefix=".smms_predict_", dir=output_folder)
    original_branch = network.output_branch if branches is not None else None
    try:
        reader_writer = predictor.plans_manager.image_reader_writer_class()
        for p in plans:
            like = p.case.files[min(p.case.files)]
            for c in p.case.missing:
                p.filled[c] = os.path.join(work, "inputs", f"{p.case.name}_{c:04d}{file_ending}")
                os.makedirs(os.path.dirname(p.filled[c]), exist_ok=True)
                write_zero_channel(reader_writer, like, p.filled[c])
        for branch, group in groups.items():
            out_dir = os.path.join(work, f"output_{branch or 'model'}")
            os.makedirs(out_dir)  # nnU-Net's sequential prediction does not create it
            lists = [[p.case.files.get(c) or p.filled[c] for c in range(p.case.n_channels)] for p in group]
            truncated = [os.path.join(out_dir, p.case.name) for p in group]
            if branch is not None:
                set_output_branch(predictor.network, branch)
            try:
                if num_processes_preprocessing == 0 and num_processes_segmentation_export == 0:
                    predictor.predict_from_files_sequential(
                        lists, truncated, save_probabilities=save_probabilities,
                        folder_with_segs_from_prev_stage=folder_with_segs_from_prev_stage)
                else:
                    predictor.predict_from_files(lists, truncated, save_probabilities=save_probabilities,
                                                 num_processes_preprocessing=num_processes_preprocessing,
                                                 num_processes_segmentation_export=num_processes_segmentation_export,
                                                 folder_with_segs_from_prev_stage=folder_with_segs_from_prev_stage)
            finally:
                if branch is not None:
                    set_output_branch(predictor.network, original_branch)
            for p in group:  # every file of the group exists before the first one is moved
                for name in _outputs(p.case.name, file_ending, save_probabilities):
                    if not os.path.isfile(os.path.join(out_dir, name)):
                        raise RuntimeError(f"nnU-Net's predictor wrote no {name} for case {p.case.name}")
            for p in group:
                for name in _outputs(p.case.name, file_ending, save_probabilities):
                    os.replace(os.path.join(out_dir, name), os.path.join(output_folder, name))
            for name in ("dataset.json", "plans.json"):  # as nnUNetv2_predict leaves them next to the outputs
                if os.path.isfile(os.path.join(out_dir, name)):
                    os.replace(os.path.join(out_dir, name), os.path.join(output_folder, name))
        _write_json_atomic(os.path.join(output_folder, REPORT), report)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"{len(plans)} cases predicted into {output_folder} ({len(report['incomplete_cases'])} with a missing "
        f"modality; listed in {REPORT})")
    return report
