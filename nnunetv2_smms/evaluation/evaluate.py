"""``nnunetv2_smms evaluate``: per-branch Dice, ASD/ASSD/HD95 (mm) and volumes of trained models or of
prediction folders against reference labels, with the paper-style table, CSV, JSON and figures.

A *source* is one set of predictions: (method, output, folder). A trained model folder gives one source per
output: an SMMS dual-branch model its branch a, branch b and fused output (predicted in-process with
nnU-Net's predictor, switching the branch on the network), a plain nnU-Net model the single output
"fused". Prediction folders can also be given directly. Every source is evaluated on the cases of the
reference folder.

This module is the command (``run_evaluation`` and its parser); see ``inputs``, ``prediction``, ``scoring``,
``report`` and ``figure_writing`` for the steps.
"""
import os
from typing import Optional, Sequence, Tuple

from nnunetv2_smms.errors import cli_command
from nnunetv2_smms.evaluation.figure_writing import write_figures
from nnunetv2_smms.evaluation.inputs import (EvaluationError, Model, Source, find_dataset_json, folds_to_load,
                                             labels_from_dataset_json, labels_from_tokens, parse_model,
                                             reference_cases)
from nnunetv2_smms.evaluation.prediction import predict_model
from nnunetv2_smms.evaluation.scoring import evaluate_sources

TABLE_DISTANCES = ("asd", "assd", "hd95")


def run_evaluation(*, reference: str, output: str, models: Sequence[Model] = (),
                   preds: Sequence[Tuple[str, str, str]] = (), images: Optional[str] = None,
                   labels: Optional[Sequence[str]] = None, dataset_json_file: Optional[str] = None,
                   file_ending: str = ".nii.gz", folds: Optional[Sequence[str]] = None,
                   checkpoint: str = "checkpoint_final.pth", device: str = "auto", tta: bool = True,
                   distance: str = "asd", n_figure_cases: int = 3, num_processes: Optional[int] = None) -> dict:
    """The whole command; returns the summary. ``models`` are trained model folders (see ``parse_model``),
    ``preds`` (method, output, folder) prediction folders, ``labels`` the ``-l`` tokens (default: dataset.json's
    foreground labels or regions), ``file_ending`` the one used when there is no dataset.json, ``num_processes``
    None for nnU-Net's default. Raises EvaluationError on bad input, before predicting where it can."""
    from nnunetv2.configuration import default_num_processes
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    from nnunetv2_smms.evaluation import report

    models = list(models)
    sources = [Source(m, o, os.path.abspath(f)) for m, o, f in preds]
    if not models and not sources:
        raise EvaluationError("give at least one trained model (-m) or prediction folder (--pred)")
    if models and not images:
        raise EvaluationError("-m needs the test images (-i imagesTs)")
    for role, folder in (("reference", reference), ("images", images)):
        if folder and not os.path.isdir(folder):
            raise EvaluationError(f"{role} folder {folder} does not exist")
    if len({m.name for m in models}) != len(models):
        raise EvaluationError("two models have the same name; name them with -m NAME=FOLDER")
    model_folds = {m: folds_to_load(m, folds, checkpoint) for m in models}
    dataset_json = find_dataset_json(models, dataset_json_file, reference, bool(labels))
    if labels:
        label_set = labels_from_tokens(labels)
    elif dataset_json is not None:
        label_set = labels_from_dataset_json(dataset_json)
    else:
        raise EvaluationError("no dataset.json found next to the reference folder: give the labels with -l "
                              "or the file with --dataset-json")
    file_ending = dataset_json["file_ending"] if dataset_json else file_ending
    cases = reference_cases(reference, file_ending)
    reader = determine_reader_writer_from_dataset_json(
        dict(dataset_json or {}, file_ending=file_ending), os.path.join(reference, cases[0] + file_ending),
        verbose=False)()
    num_processes = num_processes or default_num_processes
    for m in models:
        sources += predict_model(m, images, cases, os.path.join(output, "predictions"), model_folds[m],
                                 checkpoint, device, tta, num_processes)
    if len({(s.method, s.output) for s in sources}) != len(sources):
        raise EvaluationError("two prediction sources have the same method and output name")

    rows = evaluate_sources(reference, sources, cases, file_ending, reader, label_set, num_processes)
    summary = report.summarize(rows)
    out = output
    settings = dict(reference=os.path.abspath(reference), images=images and os.path.abspath(images),
                    sources=[vars(s) for s in sources], models=[dict(vars(m), folds=model_folds[m]) for m in models],
                    checkpoint=checkpoint, tta=tta, table_distance=distance)
    report.write_csv(rows, os.path.join(out, "metrics_per_case.csv"))
    report.write_summary_json(summary, os.path.join(out, "summary.json"), label_set.names, cases, settings)
    tables = "\n".join(report.format_table(summary, key, name, distance) for key, name in label_set.names.items())
    report.write_text(tables, os.path.join(out, "table.md"))
    figures = write_figures(out, rows, label_set, sources, images, dataset_json, reader, file_ending,
                            reference, n_figure_cases)
    print("\n" + tables)
    for path in [os.path.join(out, n) for n in ("metrics_per_case.csv", "summary.json", "table.md")] + figures:
        print(f"wrote {path}")
    return summary


def _run(args) -> int:
    run_evaluation(reference=args.reference, output=args.output, models=[parse_model(t) for t in args.model or []],
                   preds=args.pred or [], images=args.images, labels=args.labels,
                   dataset_json_file=args.dataset_json, file_ending=args.file_ending, folds=args.folds,
                   checkpoint=args.checkpoint, device=args.device, tta=not args.disable_tta,
                   distance=args.distance, n_figure_cases=args.n_figure_cases, num_processes=args.num_processes)
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
