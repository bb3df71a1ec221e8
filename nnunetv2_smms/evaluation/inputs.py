"""What an evaluation reads: prediction sources, labels, model folders, reference cases, images and label maps,
each checked (missing files or cases, geometry mismatch, unknown labels) with an EvaluationError naming it."""
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from nnunetv2_smms.errors import SMMSUserError
from nnunetv2_smms.evaluation.metrics import LabelOrRegion


class EvaluationError(SMMSUserError):
    """Bad input (missing files or cases, geometry mismatch, unknown labels): the CLI prints it and exits 2."""


@dataclass(frozen=True)
class Source:
    method: str
    output: str
    folder: str


@dataclass(frozen=True)
class Labels:
    """What to evaluate: nnU-Net labels or regions, their display names, the label values files may contain
    (``None``: not checked) and the ignore label."""
    regions: Tuple[LabelOrRegion, ...]
    names: Dict[str, str]
    known_values: Optional[Tuple[int, ...]] = None
    ignore_label: Optional[int] = None


@dataclass(frozen=True)
class Model:
    name: str
    folder: str


# ----------------------------------------------------------------------------------------------- labels

def labels_from_dataset_json(dataset_json: dict) -> Labels:
    """The foreground labels (or regions, for region-based datasets) of dataset.json, as nnU-Net evaluates."""
    from nnunetv2.evaluation.evaluate_predictions import label_or_region_to_key
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    lm = LabelManager(dataset_json["labels"], dataset_json.get("regions_class_order"))
    regions = tuple(lm.foreground_regions if lm.has_regions else lm.foreground_labels)
    names = {}
    for name, value in dataset_json["labels"].items():
        value = tuple(value) if isinstance(value, (list, tuple)) else (int(value),)
        key = label_or_region_to_key(value if len(value) > 1 else value[0])
        names[key] = f"{key} ({name})"
    known = tuple(int(v) for v in lm.all_labels) + ((lm.ignore_label,) if lm.has_ignore_label else ())
    return Labels(regions, {label_or_region_to_key(r): names.get(label_or_region_to_key(r), label_or_region_to_key(r))
                            for r in regions}, known, lm.ignore_label)


def labels_from_tokens(tokens: Sequence[str]) -> Labels:
    """``-l 1 2 1,2,4``: labels, and regions as comma-separated label lists. File contents are not checked."""
    from nnunetv2.evaluation.evaluate_predictions import key_to_label_or_region, label_or_region_to_key

    try:
        regions = tuple(key_to_label_or_region(t) for t in tokens)
    except ValueError:
        raise EvaluationError(f"-l takes labels (1) or comma-separated regions (1,2,4), got "
                              f"{' '.join(tokens)}") from None
    return Labels(regions, {label_or_region_to_key(r): label_or_region_to_key(r) for r in regions})


# ----------------------------------------------------------------------------------------------- files

def reference_cases(reference_folder: str, file_ending: str) -> List[str]:
    cases = sorted(f[:-len(file_ending)] for f in os.listdir(reference_folder) if f.endswith(file_ending))
    if not cases:
        raise EvaluationError(f"reference folder {reference_folder} has no *{file_ending} files")
    return cases


def check_sources(sources: Sequence[Source], cases: Sequence[str], file_ending: str) -> None:
    """Every source folder must hold a prediction for every reference case (extra predictions are ignored)."""
    for s in sources:
        missing = [c for c in cases if not os.path.isfile(os.path.join(s.folder, c + file_ending))]
        if missing:
            shown = ", ".join(os.path.join(s.folder, c + file_ending) for c in missing[:5])
            raise EvaluationError(f"{s.method} / {s.output}: {len(missing)} of {len(cases)} reference cases have no "
                                  f"prediction (missing: {shown}{', ...' if len(missing) > 5 else ''})")


def case_images(images_folder: str, case: str, file_ending: str, n_channels: Optional[int] = None) -> List[str]:
    """The CASE_XXXX files of one case (nnU-Net naming), checked against the channel count where it is known."""
    from nnunetv2.utilities.utils import create_paths_fn

    files = create_paths_fn(images_folder, sorted(os.listdir(images_folder)), file_ending, case)
    if not files or (n_channels is not None and len(files) != n_channels):
        expected = f"{n_channels} (one per channel of dataset.json)" if n_channels else "at least 1"
        raise EvaluationError(f"case {case}: found {len(files)} image files {case}_XXXX{file_ending} in "
                              f"{images_folder}, expected {expected}")
    return files


def read_seg(reader, path: str, case: str, labels: Labels, role: str) -> Tuple[np.ndarray, dict]:
    """(z, y, x) label map and nnU-Net's properties; unknown label values are an error naming the file."""
    try:
        seg, props = reader.read_seg(path)
    except Exception as e:  # readers raise all sorts (RuntimeError from SimpleITK, OSError, ...)
        raise EvaluationError(f"case {case}: cannot read {role} {path}: {e}") from e
    seg = seg[0]
    if labels.known_values is not None:
        inside = np.isin(seg, labels.known_values)
        if not inside.all():
            unknown = [int(v) if float(v).is_integer() else float(v) for v in np.unique(seg[~inside])]
            raise EvaluationError(f"case {case}: {role} {path} contains label values {unknown} that "
                                  f"dataset.json does not declare "
                                  f"(known: {list(labels.known_values)})")
    return seg, props


def check_geometry(case: str, reference: Tuple[np.ndarray, dict, str], prediction: Tuple[np.ndarray, dict, str]):
    """Same shape, spacing and (where the reader reports them) origin and direction."""
    (ref, ref_props, ref_file), (pred, pred_props, pred_file) = reference, prediction
    problems = []
    if ref.shape != pred.shape:
        problems.append(f"shape {pred.shape} vs {ref.shape}")
    pairs = {"spacing": (pred_props["spacing"], ref_props["spacing"])}
    pairs.update({k: (pred_props.get("sitk_stuff", {}).get(k), ref_props.get("sitk_stuff", {}).get(k))
                  for k in ("origin", "direction")})
    for key, (a, b) in pairs.items():
        if a is not None and b is not None and (len(a) != len(b) or not np.allclose(a, b, rtol=1e-4, atol=1e-3)):
            problems.append(f"{key} {tuple(np.round(a, 4))} vs {tuple(np.round(b, 4))}")
    if problems:
        raise EvaluationError(f"case {case}: prediction {pred_file} does not match the geometry of reference "
                              f"{ref_file}: " + "; ".join(problems))



# ----------------------------------------------------------------------------------------------- models

def parse_model(token: str) -> Model:
    """``[NAME=]MODEL_FOLDER``; the default name is the trainer (the part of the folder name before '__')."""
    name, sep, folder = token.partition("=")
    if not sep or os.sep in name:
        name, folder = "", token
    folder = os.path.abspath(folder)
    return Model(name or os.path.basename(folder.rstrip(os.sep)).split("__")[0], folder)


def folds_to_load(model: Model, folds: Optional[Sequence[str]], checkpoint: str) -> List[str]:
    """The requested folds (default: every fold_N with the checkpoint), after checking the model folder."""
    for f in ("plans.json", "dataset.json"):
        if not os.path.isfile(os.path.join(model.folder, f)):
            raise EvaluationError(f"model {model.name}: {os.path.join(model.folder, f)} not found (a model folder "
                                  f"is $nnUNet_results/DatasetXXX_Name/<Trainer>__<Plans>__<configuration>)")
    if folds is None:
        folds = sorted(d[len("fold_"):] for d in os.listdir(model.folder)
                       if d.startswith("fold_") and d != "fold_all"
                       and os.path.isfile(os.path.join(model.folder, d, checkpoint)))
        if not folds:
            raise EvaluationError(f"model {model.name}: no fold_N/{checkpoint} in {model.folder}")
    for f in folds:
        if not os.path.isfile(os.path.join(model.folder, f"fold_{f}", checkpoint)):
            raise EvaluationError(f"model {model.name}: {os.path.join(model.folder, f'fold_{f}', checkpoint)} "
                                  f"not found")
    return list(folds)


# ----------------------------------------------------------------------------------------------- dataset.json

def _load_json(path: str) -> dict:
    import json

    with open(path, encoding="utf-8") as f:
        return json.load(f)


def find_dataset_json(models: Sequence[Model], dataset_json_file: Optional[str], reference_folder: str,
                      labels_given: bool) -> Optional[dict]:
    """The models' dataset.json (they must agree on labels unless -l chooses them), else ``dataset_json_file``,
    else the one next to the reference folder (nnU-Net raw layout: labelsTs/../dataset.json), else None."""
    if models:
        found = [_load_json(os.path.join(m.folder, "dataset.json")) for m in models]
        for m, this in zip(models[1:], found[1:]):
            if this["labels"] != found[0]["labels"] and not labels_given:
                raise EvaluationError(f"model {m.name} has other labels than {models[0].name}; choose them with -l")
        return found[0]
    path = dataset_json_file or os.path.join(os.path.dirname(os.path.abspath(reference_folder)), "dataset.json")
    if os.path.isfile(path):
        return _load_json(path)
    if dataset_json_file:
        raise EvaluationError(f"--dataset-json {path} not found")
    return None
