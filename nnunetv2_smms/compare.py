"""``nnunetv2_smms compare``: train (what is missing), predict and evaluate several trainers on the same dataset,
plans, fold, schedule and test cases, and print one table in the layout of the SMMS paper's Table 1.

For each trainer, in the order given (a progress bar over the runs):
1. **train**: ``nnUNetv2_train D C F -tr T -p P`` unless ``fold_F/checkpoint_final.pth`` exists; a run that has
   only ``checkpoint_latest.pth`` (interrupted) continues with ``--c``. The schedule options (``--epochs``,
   ``--iterations-per-epoch``, ``--val-iterations``, ``--seed``) reach every trainer as the plugin's
   ``nnUNet_smms_*`` variables; a trainer that does not read them (nnU-Net's own ``nnUNetTrainer``) is refused
   when they are given (use ``nnUNetTrainerLabeledOnly``: plain nnU-Net that reads them). A finished run whose
   schedule (from its ``debug.json``) differs from the requested one is an error naming both, never silently
   mixed into one table. Each run's output goes to ``OUT/logs/<trainer>.log``.
2. **predict** the test images with nnU-Net's predictor (every output of a model: an SMMS-style model's branches
   and the fused output, a single-output model its one output) into ``OUT/predictions/<trainer>/<output>``;
   skipped when a stamp there says the same checkpoint (size and modification time), cases and TTA setting
   were predicted before.
3. **evaluate** all predictions on the same reference cases (``nnunetv2_smms evaluate``'s metrics) and write
   ``metrics_per_case.csv``, ``summary.json``, ``table.md`` and ``figures/dice_boxplot.png`` to ``OUT``.

``--evaluate-only`` trains nothing and stops with an error naming the unfinished runs; ``--finished-only`` trains
nothing and leaves the unfinished runs out of the table (naming them), for a report while the rest still trains.
"""
import json
import os
import subprocess
import sys
from typing import Dict, List, Optional, Sequence

from nnunetv2_smms.errors import SMMSUserError, cli_command
from nnunetv2_smms.evaluation.report import atomic_path

SCHEDULE_OPTIONS = {  # option -> (nnUNet_smms_* variable, the trainer attribute nnU-Net writes to debug.json)
    "epochs": ("nnUNet_smms_epochs", "num_epochs"),
    "iterations_per_epoch": ("nnUNet_smms_iterations_per_epoch", "num_iterations_per_epoch"),
    "val_iterations": ("nnUNet_smms_val_iterations", "num_val_iterations_per_epoch"),
    "seed": ("nnUNet_smms_seed", "seed"),
}
STAMP = "prediction_stamp.json"


class CompareError(SMMSUserError):
    """A run cannot be trained, resumed, predicted or compared as asked; the message says how to fix it."""


def find_trainer_class(name: str):
    """The class nnUNetv2_train would use for ``-tr name`` (nnU-Net's trainers, then nnUNet_extTrainer)."""
    import contextlib
    import io

    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from nnunetv2_smms.ext_trainer_dir import ext_trainers_visible

    with ext_trainers_visible(), contextlib.redirect_stdout(io.StringIO()):
        try:
            return recursive_find_trainer_class_by_name(name)
        except (RuntimeError, AssertionError):
            pass
    raise CompareError(f"trainer {name} not found among nnU-Net's trainers and the plugin's (nnunetv2_smms "
                       f"trainer-dir) or is not an nnU-Net trainer; check the spelling")


def check_trainers(trainers: Sequence[str], schedule: Dict[str, int]) -> None:
    from nnunetv2_smms.trainers.semi_supervised import nnUNetTrainerSemiSupervised

    if len(set(trainers)) != len(trainers):
        raise CompareError(f"a trainer is given twice: {' '.join(trainers)}")
    for name in trainers:
        cls = find_trainer_class(name)
        if schedule and not issubclass(cls, nnUNetTrainerSemiSupervised):
            raise CompareError(
                f"{name} does not read the schedule options ({', '.join('--' + k.replace('_', '-') for k in schedule)}"
                f"): its runs would not have the same schedule as the others. For nnU-Net on the labeled cases with "
                f"the same schedule use nnUNetTrainerLabeledOnly, or drop the schedule options")


class Run:
    """One trainer's training run: ``fold_F`` of its model folder."""

    def __init__(self, dataset_name: str, trainer: str, plans: str, configuration: str, fold: str):
        from nnunetv2.utilities.file_path_utilities import get_output_folder

        self.trainer, self.fold = trainer, fold
        self.model_folder = get_output_folder(dataset_name, trainer, plans, configuration)
        self.fold_folder = os.path.join(self.model_folder, f"fold_{fold}")

    def checkpoint(self, name: str = "checkpoint_final.pth") -> str:
        return os.path.join(self.fold_folder, name)

    @property
    def finished(self) -> bool:
        return os.path.isfile(self.checkpoint())

    @property
    def interrupted(self) -> bool:
        return not self.finished and os.path.isfile(self.checkpoint("checkpoint_latest.pth"))

    def recorded_schedule(self) -> Dict[str, str]:
        """What nnU-Net wrote to fold_F/debug.json at the start of the run (values as strings)."""
        path = os.path.join(self.fold_folder, "debug.json")
        if not os.path.isfile(path):
            return {}
        with open(path, encoding="utf-8") as f:
            debug = json.load(f)
        return {option: debug.get(attribute) for option, (_, attribute) in SCHEDULE_OPTIONS.items()}

    def check_schedule(self, schedule: Dict[str, int]) -> None:
        recorded = self.recorded_schedule()
        different = {k: (recorded.get(k), v) for k, v in schedule.items() if recorded.get(k) != str(v)}
        if different and recorded:
            shown = "; ".join(f"--{k.replace('_', '-')} {want} requested, the run has {had}"
                              for k, (had, want) in different.items())
            raise CompareError(f"{self.trainer}: the run in {self.fold_folder} was trained with another schedule "
                               f"({shown}). Compare it with the schedule it has, or delete that fold folder to "
                               f"train it again")


def train(run: Run, args, schedule: Dict[str, int], env: dict, log_path: str) -> None:
    resume = run.interrupted
    cmd = ["nnUNetv2_train", str(args.dataset), args.configuration, run.fold, "-tr", run.trainer, "-p", args.plans]
    if args.device != "auto":
        cmd += ["-device", args.device]
    if resume:
        cmd.append("--c")
    run_env = dict(env, **{SCHEDULE_OPTIONS[k][0]: str(v) for k, v in schedule.items()})
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    print(f"{'resuming' if resume else 'training'} {run.trainer}: {' '.join(cmd)} (log: {log_path})", flush=True)
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        code = subprocess.call(cmd, env=run_env, stdout=log, stderr=subprocess.STDOUT)
    if code != 0 or not run.finished:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            tail = f.read()[-3000:]
        raise CompareError(f"training {run.trainer} failed (exit code {code}); the whole output is in {log_path}; "
                           f"it ended with:\n{tail}\nFix the cause and run compare again: finished runs are kept, "
                           f"this one resumes from its last checkpoint")


def checkpoint_identity(path: str) -> dict:
    st = os.stat(path)
    return {"checkpoint": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def predictions_up_to_date(folder: str, identity: dict, cases: Sequence[str], tta: bool, file_ending: str) \
        -> Optional[List[str]]:
    """The outputs predicted before for this checkpoint, cases and TTA setting, or None."""
    path = os.path.join(folder, STAMP)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        stamp = json.load(f)
    if stamp.get("identity") != identity or stamp.get("cases") != list(cases) or stamp.get("tta") != tta:
        return None
    outputs = stamp["outputs"]
    if not all(os.path.isfile(os.path.join(folder, o, c + file_ending)) for o in outputs for c in cases):
        return None
    return outputs


def predict(run: Run, args, cases: Sequence[str], file_ending: str, num_processes: int):
    from nnunetv2_smms.evaluation.inputs import Model, Source
    from nnunetv2_smms.evaluation.prediction import predict_model

    folder = os.path.join(args.output, "predictions", run.trainer)
    identity = checkpoint_identity(run.checkpoint(args.checkpoint))
    tta = not args.disable_tta
    outputs = predictions_up_to_date(folder, identity, cases, tta, file_ending)
    if outputs is not None:
        print(f"{run.trainer}: predictions up to date ({', '.join(outputs)})", flush=True)
        return [Source(run.trainer, o, os.path.join(folder, o)) for o in outputs]
    if os.path.isfile(os.path.join(folder, STAMP)):
        os.remove(os.path.join(folder, STAMP))  # stale: never trusted again if predicting fails half-way
    sources = predict_model(Model(run.trainer, run.model_folder), args.images, cases,
                            os.path.join(args.output, "predictions"), [run.fold], args.checkpoint, args.device,
                            tta, num_processes)
    with atomic_path(os.path.join(folder, STAMP)) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump({"identity": identity, "cases": list(cases), "tta": tta, "outputs": [s.output for s in sources]},
                  f, indent=2)
    return sources


def run_compare(args) -> dict:
    from nnunetv2.configuration import default_num_processes
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from tqdm import tqdm

    from nnunetv2_smms.evaluation import report
    from nnunetv2_smms.evaluation.figure_writing import write_figures
    from nnunetv2_smms.evaluation.inputs import labels_from_dataset_json, reference_cases
    from nnunetv2_smms.evaluation.scoring import evaluate_sources
    from nnunetv2_smms.ext_trainer_dir import ext_trainer_env

    for role, folder in (("test images", args.images), ("reference", args.reference)):
        if not os.path.isdir(folder):
            raise CompareError(f"{role} folder {folder} does not exist")
    try:
        dataset_name = maybe_convert_to_dataset_name(args.dataset)
    except RuntimeError as e:
        raise CompareError(f"dataset {args.dataset}: {e}") from None
    schedule = {k: getattr(args, k) for k in SCHEDULE_OPTIONS if getattr(args, k) is not None}
    check_trainers(args.trainers, schedule)
    runs = [Run(dataset_name, t, args.plans, args.configuration, str(args.fold)) for t in args.trainers]
    for r in runs:
        if r.finished or r.interrupted:
            r.check_schedule(schedule)
    missing = [r.trainer for r in runs if not r.finished]
    if args.evaluate_only and missing:
        raise CompareError(f"--evaluate-only: {', '.join(missing)} not trained (no "
                           f"fold_{args.fold}/checkpoint_final.pth); run compare without --evaluate-only, "
                           f"or with --finished-only to leave them out")
    if args.finished_only:
        runs = [r for r in runs if r.finished]
        if not runs:
            raise CompareError(f"--finished-only: none of {', '.join(args.trainers)} has finished (no "
                               f"fold_{args.fold}/checkpoint_final.pth); run compare without --finished-only")
        if missing:
            print(f"--finished-only: left out (not finished): {', '.join(missing)}", flush=True)
    env = dict(os.environ, nnUNet_extTrainer=ext_trainer_env(os.environ.get("nnUNet_extTrainer", "")))
    num_processes = args.num_processes or default_num_processes

    for r in tqdm(runs, desc="training runs", unit="run", file=sys.stdout):
        if r.finished:
            tqdm.write(f"{r.trainer}: trained ({r.checkpoint()})", file=sys.stdout)
        else:
            train(r, args, schedule, env, os.path.join(args.output, "logs", f"{r.trainer}.log"))

    with open(os.path.join(runs[0].model_folder, "dataset.json"), encoding="utf-8") as f:
        dataset_json = json.load(f)
    file_ending = dataset_json["file_ending"]
    cases = reference_cases(args.reference, file_ending)
    sources = []
    for r in tqdm(runs, desc="predicting", unit="run", file=sys.stdout):
        sources += predict(r, args, cases, file_ending, num_processes)

    labels = labels_from_dataset_json(dataset_json)
    reader = determine_reader_writer_from_dataset_json(
        dataset_json, os.path.join(args.reference, cases[0] + file_ending), verbose=False)()
    rows = evaluate_sources(args.reference, sources, cases, file_ending, reader, labels, num_processes)
    summary = report.summarize(rows)
    out = args.output
    settings = dict(dataset=dataset_name, configuration=args.configuration, fold=args.fold, plans=args.plans,
                    trainers=[r.trainer for r in runs], schedule=schedule,
                    runs={r.trainer: dict(model_folder=r.model_folder, schedule=r.recorded_schedule()) for r in runs},
                    images=os.path.abspath(args.images), reference=os.path.abspath(args.reference),
                    checkpoint=args.checkpoint, tta=not args.disable_tta, table_distance=args.distance)
    report.write_csv(rows, os.path.join(out, "metrics_per_case.csv"))
    report.write_summary_json(summary, os.path.join(out, "summary.json"), labels.names, cases, settings)
    tables = "\n".join(report.format_table(summary, key, name, args.distance) for key, name in labels.names.items())
    report.write_text(tables, os.path.join(out, "table.md"))
    figures = write_figures(out, rows, labels, sources, None, dataset_json, reader, file_ending, args.reference, 0)
    print("\n" + tables)
    for path in [os.path.join(out, n) for n in ("metrics_per_case.csv", "summary.json", "table.md")] + figures:
        print(f"wrote {path}")
    return summary


def _run(args) -> int:
    run_compare(args)
    return 0


def register(subparsers) -> None:
    from nnunetv2_smms.evaluation.evaluate import TABLE_DISTANCES

    p = subparsers.add_parser(
        "compare",
        help="train what is missing, predict and evaluate several trainers on the same test cases; one table "
             "in the paper's Table 1 layout",
        description="Train (or resume with --c) every trainer that has no checkpoint_final.pth for this dataset, "
                    "configuration, plans and fold, with the same schedule; predict the test images with each; "
                    "evaluate all on the same reference cases. Writes metrics_per_case.csv, summary.json, table.md, "
                    "figures/dice_boxplot.png, logs/ and predictions/ to -o. Run it again to resume: finished "
                    "runs and up-to-date predictions are not redone.")
    p.add_argument("-d", "--dataset", required=True, help="dataset name or id")
    p.add_argument("-c", "--configuration", required=True, help="nnU-Net configuration, e.g. 3d_fullres or 2d")
    p.add_argument("-f", "--fold", default="0", help="fold (default 0; 'all' for fold_all)")
    p.add_argument("-tr", "--trainers", nargs="+", required=True, metavar="TRAINER",
                   help="trainers to compare, e.g. nnUNetTrainerLabeledOnly nnUNetTrainerMeanTeacher "
                        "nnUNetTrainerSMMS (table rows in this order)")
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("-i", "--images", required=True, help="test images in nnU-Net naming (e.g. imagesTs)")
    p.add_argument("-r", "--reference", required=True, help="reference labels of the test cases (e.g. labelsTs)")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--epochs", type=int, help="epochs for every trainer (default: each trainer's own)")
    p.add_argument("--iterations-per-epoch", type=int, help="training iterations per epoch for every trainer")
    p.add_argument("--val-iterations", type=int, help="validation iterations per epoch for every trainer")
    p.add_argument("--seed", type=int, help="random seed for every trainer")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--evaluate-only", action="store_true",
                       help="train nothing; evaluate the runs (an error names any that has not finished)")
    group.add_argument("--finished-only", action="store_true",
                       help="train nothing; evaluate the finished runs and leave the others out of the table")
    p.add_argument("-chk", "--checkpoint", default="checkpoint_final.pth", help="checkpoint to predict with")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu", "mps"],
                   help="device for training and prediction (default: nnU-Net's default / cuda if available)")
    p.add_argument("--disable-tta", action="store_true", help="no mirroring test-time augmentation")
    p.add_argument("--distance", default="asd", choices=TABLE_DISTANCES, help="distance shown in the table")
    p.add_argument("-np", "--num-processes", type=int, default=None,
                   help="processes for prediction and metrics (default: nnU-Net's nnUNet_def_n_proc)")
    p.set_defaults(func=cli_command(_run))
