"""``nnunetv2_smms evaluate``: per-branch Dice, ASD/ASSD/HD95 (mm) and volumes of trained models or of
prediction folders against reference labels, with the paper-style table, CSV, JSON and figures.

A *source* is one set of predictions: (method, output, folder). A trained model folder gives one source per
output: an SMMS dual-branch model its branch a, branch b and fused output (predicted in-process with
nnU-Net's predictor, switching the branch on the network), a plain nnU-Net model the single output
"fused". Prediction folders can also be given directly. Every source is evaluated on the cases of the
reference folder.
"""
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from nnunetv2_smms.evaluation.metrics import LabelOrRegion
from nnunetv2_smms.errors import SMMSUserError, cli_command

FUSED = "fused"
TABLE_DISTANCES = ("asd", "assd", "hd95")


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


# ----------------------------------------------------------------------------------------------- evaluation

def evaluate_case(case: str, reference_file: str, sources: Sequence[Source], file_ending: str, reader,
                  labels: Labels) -> List[dict]:
    """The rows (one per source and region) of one case."""
    from nnunetv2.evaluation.evaluate_predictions import label_or_region_to_key

    from nnunetv2_smms.evaluation.metrics import case_metrics

    ref, ref_props = read_seg(reader, reference_file, case, labels, "reference")
    rows = []
    for s in sources:
        pred_file = os.path.join(s.folder, case + file_ending)
        pred, pred_props = read_seg(reader, pred_file, case, labels, "prediction")
        check_geometry(case, (ref, ref_props, reference_file), (pred, pred_props, pred_file))
        per_region = case_metrics(pred, ref, ref_props["spacing"], labels.regions, labels.ignore_label,
                                  case=f"case {case} ({s.method} / {s.output})")
        rows += [dict(method=s.method, output=s.output, case=case, region=label_or_region_to_key(r),
                      prediction_file=pred_file, reference_file=reference_file, **m) for r, m in per_region.items()]
    return rows


def _evaluate_case_job(job) -> List[dict]:
    return evaluate_case(*job)


def evaluate_sources(reference_folder: str, sources: Sequence[Source], cases: Sequence[str], file_ending: str,
                     reader, labels: Labels, num_processes: int) -> List[dict]:
    """Rows for all cases, in case order, with a progress bar; ``num_processes`` > 1 uses a process pool."""
    import multiprocessing

    from tqdm import tqdm

    check_sources(sources, cases, file_ending)
    jobs = [(c, os.path.join(reference_folder, c + file_ending), sources, file_ending, reader, labels) for c in cases]
    progress = dict(total=len(jobs), desc="evaluating cases", unit="case")
    if num_processes <= 1:
        per_case = [_evaluate_case_job(j) for j in tqdm(jobs, **progress)]
    else:
        with multiprocessing.get_context("spawn").Pool(min(num_processes, len(jobs))) as pool:
            per_case = list(tqdm(pool.imap(_evaluate_case_job, jobs), **progress))
    return [row for rows in per_case for row in rows]


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


def branch_names(configuration: dict, dataset_json: dict) -> Tuple[str, str]:
    """Names of branches a and b from the channel names of ``configuration["smms"]["channels_a"/"channels_b"]``
    (e.g. "T1ce", "T2"); "a" and "b" when these are missing or do not give two distinct new names."""
    smms, channel_names = configuration.get("smms", {}), dataset_json.get("channel_names", {})
    names = []
    for branch in ("a", "b"):
        channels = smms.get(f"channels_{branch}") or []
        found = [channel_names.get(str(c)) for c in channels]
        names.append("+".join(found) if found and all(found) else None)
    if None in names or names[0] == names[1] or FUSED in names:
        return "a", "b"
    return names[0], names[1]


def predict_model(model: Model, images_folder: str, cases: Sequence[str], output_root: str,
                  folds: Sequence[str], checkpoint: str, device: str, use_tta: bool,
                  num_processes: int) -> List[Source]:
    """Predict ``cases`` with nnU-Net's predictor once per output of the model; one Source per output,
    folders ``output_root/<model name>/<output>``."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunetv2_smms.architectures import has_branches, set_output_branch
    from nnunetv2_smms.ext_trainer_dir import ext_trainers_visible

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    predictor = nnUNetPredictor(use_mirroring=use_tta, perform_everything_on_device=device == "cuda",
                                device=torch.device(device), allow_tqdm=False)
    with ext_trainers_visible():
        predictor.initialize_from_trained_model_folder(model.folder, use_folds=folds, checkpoint_name=checkpoint)
    dataset_json = predictor.dataset_json
    file_ending = dataset_json["file_ending"]
    inputs = [case_images(images_folder, c, file_ending, len(dataset_json["channel_names"])) for c in cases]

    if has_branches(predictor.network):
        name_a, name_b = branch_names(predictor.configuration_manager.configuration, dataset_json)
        outputs = [(name_a, "a"), (name_b, "b"), (FUSED, "fused")]
    else:
        outputs = [(FUSED, None)]
    sources = []
    for output, branch in outputs:
        if branch is not None:
            set_output_branch(predictor.network, branch)
        folder = os.path.join(output_root, model.name, output)
        print(f"predicting {len(cases)} cases: {model.name} / {output}")
        predictor.predict_from_files(inputs, [os.path.join(folder, c) for c in cases], save_probabilities=False,
                                     overwrite=True, num_processes_preprocessing=num_processes,
                                     num_processes_segmentation_export=num_processes)
        sources.append(Source(model.name, output, folder))
    return sources


# ----------------------------------------------------------------------------------------------- outputs

def figure_cases(rows: Sequence[dict], n: int) -> List[str]:
    """Up to ``n`` cases spread over the Dice range of the first source and region: worst, ..., best."""
    first = rows[0]
    ranked = sorted((r["dice"], r["case"]) for r in rows
                    if (r["method"], r["output"], r["region"]) == (first["method"], first["output"], first["region"]))
    picks = np.unique(np.round(np.linspace(0, len(ranked) - 1, min(n, len(ranked)))).astype(int))
    return [ranked[i][1] for i in picks]


def write_figures(out_folder: str, rows: Sequence[dict], labels: Labels, sources: Sequence[Source],
                  images_folder: Optional[str], dataset_json: Optional[dict], reader, file_ending: str,
                  reference_folder: str, n_cases: int) -> List[str]:
    """The Dice box plot, and the example-case figure (needs the images) for the first label/region."""
    from nnunetv2.evaluation.evaluate_predictions import region_or_label_to_mask

    from nnunetv2_smms.evaluation.figures import plot_cases, plot_dice_boxplot

    written = [os.path.join(out_folder, "figures", "dice_boxplot.png")]
    plot_dice_boxplot(written[0], rows, labels.names)
    if images_folder is None or n_cases <= 0:
        return written
    channels = (dataset_json or {}).get("channel_names", {})
    n_channels = len(channels) or len(case_images(images_folder, rows[0]["case"], file_ending))
    channel_names = [channels.get(str(i), f"channel {i}") for i in range(n_channels)]
    region = labels.regions[0]
    cases = []
    for case in figure_cases(rows, n_cases):
        images, props = reader.read_images(case_images(images_folder, case, file_ending, n_channels))
        ref = reader.read_seg(os.path.join(reference_folder, case + file_ending))[0][0]
        preds = {(s.method, s.output): region_or_label_to_mask(
            reader.read_seg(os.path.join(s.folder, case + file_ending))[0][0], region) for s in sources}
        cases.append(dict(case=case, images=images, reference=region_or_label_to_mask(ref, region),
                          predictions=preds, spacing=props["spacing"]))
    check_figure_images(cases, reference_folder)
    written.append(os.path.join(out_folder, "figures", "cases.png"))
    plot_cases(written[-1], cases, channel_names)
    return written


# ----------------------------------------------------------------------------------------------- command

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


def check_figure_images(cases: Sequence[dict], reference_folder: str) -> None:
    for case in cases:
        if case["images"].shape[1:] != case["reference"].shape:
            raise EvaluationError(f"case {case['case']}: images of shape {case['images'].shape[1:]} do not match "
                                  f"the reference {os.path.join(reference_folder, case['case'])} of shape "
                                  f"{case['reference'].shape}")


def run_evaluation(args) -> dict:
    """The whole command; returns the summary. Raises EvaluationError on bad input, before predicting where it
    can."""
    from nnunetv2.configuration import default_num_processes
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    from nnunetv2_smms.evaluation import report

    models = [parse_model(t) for t in args.model or []]
    sources = [Source(m, o, os.path.abspath(f)) for m, o, f in args.pred or []]
    if not models and not sources:
        raise EvaluationError("give at least one trained model (-m) or prediction folder (--pred)")
    if models and not args.images:
        raise EvaluationError("-m needs the test images (-i imagesTs)")
    for role, folder in (("reference", args.reference), ("images", args.images)):
        if folder and not os.path.isdir(folder):
            raise EvaluationError(f"{role} folder {folder} does not exist")
    if len({m.name for m in models}) != len(models):
        raise EvaluationError("two models have the same name; name them with -m NAME=FOLDER")
    folds = {m: folds_to_load(m, args.folds, args.checkpoint) for m in models}
    dataset_json = find_dataset_json(models, args.dataset_json, args.reference, bool(args.labels))
    if args.labels:
        labels = labels_from_tokens(args.labels)
    elif dataset_json is not None:
        labels = labels_from_dataset_json(dataset_json)
    else:
        raise EvaluationError("no dataset.json found next to the reference folder: give the labels with -l "
                              "or the file with --dataset-json")
    file_ending = dataset_json["file_ending"] if dataset_json else args.file_ending
    cases = reference_cases(args.reference, file_ending)
    reader = determine_reader_writer_from_dataset_json(
        dict(dataset_json or {}, file_ending=file_ending), os.path.join(args.reference, cases[0] + file_ending),
        verbose=False)()
    num_processes = args.num_processes or default_num_processes
    for m in models:
        sources += predict_model(m, args.images, cases, os.path.join(args.output, "predictions"), folds[m],
                                 args.checkpoint, args.device, not args.disable_tta, num_processes)
    if len({(s.method, s.output) for s in sources}) != len(sources):
        raise EvaluationError("two prediction sources have the same method and output name")

    rows = evaluate_sources(args.reference, sources, cases, file_ending, reader, labels, num_processes)
    summary = report.summarize(rows)
    out = args.output
    settings = dict(reference=os.path.abspath(args.reference), images=args.images and os.path.abspath(args.images),
                    sources=[vars(s) for s in sources], models=[dict(vars(m), folds=folds[m]) for m in models],
                    checkpoint=args.checkpoint, tta=not args.disable_tta, table_distance=args.distance)
    report.write_csv(rows, os.path.join(out, "metrics_per_case.csv"))
    report.write_summary_json(summary, os.path.join(out, "summary.json"), labels.names, cases, settings)
    tables = "\n".join(report.format_table(summary, key, name, args.distance) for key, name in labels.names.items())
    report.write_text(tables, os.path.join(out, "table.md"))
    figures = write_figures(out, rows, labels, sources, args.images, dataset_json, reader, file_ending,
                            args.reference, args.n_figure_cases)
    print("\n" + tables)
    for path in [os.path.join(out, n) for n in ("metrics_per_case.csv", "summary.json", "table.md")] + figures:
        print(f"wrote {path}")
    return summary


def _run(args) -> int:
    run_evaluation(args)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="Dice, ASD/ASSD/HD95 (mm) and volumes per branch of trained models or prediction folders; "
             "paper-style table, CSV, JSON and figures",
        description="Evaluate trained models (each SMMS branch and the fused output; a plain nnU-Net model as one "
                    "output 'fused') and/or prediction folders against reference labels. Writes "
                    "metrics_per_case.csv, summary.json, table.md, figures/*.png to -o and prints the table.")
    p.add_argument("-r", "--reference", required=True, help="folder of reference label files (e.g. labelsTs)")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("-m", "--model", action="append", metavar="[NAME=]MODEL_FOLDER",
                   help="trained model folder $nnUNet_results/DatasetXXX_Name/<Trainer>__<Plans>__<configuration>; "
                        "repeat for a comparison table; NAME defaults to the trainer")
    p.add_argument("--pred", action="append", nargs=3, metavar=("METHOD", "OUTPUT", "FOLDER"),
                   help="an already predicted folder, shown as row METHOD, column OUTPUT; repeatable")
    p.add_argument("-i", "--images", help="test images in nnU-Net naming CASE_XXXX (e.g. imagesTs); needed with "
                                          "-m, optional otherwise (for the case figure)")
    p.add_argument("-l", "--labels", nargs="+", metavar="LABEL_OR_REGION",
                   help="labels (1) or regions (1,2,4) to evaluate; default: the foreground labels/regions of "
                        "dataset.json")
    p.add_argument("--dataset-json", help="dataset.json for labels, channel names and file ending when no model is "
                                          "given (default: next to the reference folder, if there)")
    p.add_argument("--file-ending", default=".nii.gz", help="file ending when there is no dataset.json "
                                                            "(default: .nii.gz)")
    p.add_argument("-f", "--folds", nargs="+", help="folds of the models to use (default: all with a checkpoint)")
    p.add_argument("-chk", "--checkpoint", default="checkpoint_final.pth", help="checkpoint file name")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu", "mps"],
                   help="device for prediction (default: cuda if available)")
    p.add_argument("--disable-tta", action="store_true", help="no mirroring test-time augmentation")
    p.add_argument("--distance", default="asd", choices=TABLE_DISTANCES,
                   help="distance shown in the table (all are in the CSV/JSON); asd is the published convention")
    p.add_argument("--n-figure-cases", type=int, default=3,
                   help="cases in figures/cases.png, spread from worst to best Dice (0: none)")
    p.add_argument("-np", "--num-processes", type=int, default=None,
                   help="processes for prediction and metrics (default: nnU-Net's nnUNet_def_n_proc)")
    p.set_defaults(func=cli_command(_run))
