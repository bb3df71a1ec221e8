"""Where nnU-Net finds the SMMS trainers.

nnU-Net (>= 2.8) looks up ``-tr NAME`` in its own trainer folder and then in every folder listed in the
``nnUNet_extTrainer`` environment variable. It imports every module at the root of such a folder as a
top-level module, so the folder must not be a package folder with relative imports, and a class defined
there would be a new class object at every lookup (and not pickle). ``ext_trainers/`` therefore holds a
single module that only re-exports the trainer classes with absolute imports from this installed package:
the class nnU-Net finds is the very object a normal ``import`` gives.
"""
import os

TRAINER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ext_trainers")


def trainer_dir() -> str:
    return TRAINER_DIR


def ext_trainer_env(existing: str = None) -> str:
    """Value for nnUNet_extTrainer that contains our folder (kept first) plus any folders already set."""
    existing = os.environ.get("nnUNet_extTrainer", "") if existing is None else existing
    parts = [p for p in existing.split(os.pathsep) if p and os.path.abspath(p) != TRAINER_DIR]
    return os.pathsep.join([TRAINER_DIR] + parts)


def ext_trainers_visible():
    """A context in which nnUNet_extTrainer names our folder (nnU-Net reads it when it looks a trainer up, e.g. in
    nnUNetPredictor.initialize_from_trained_model_folder); the process's variable is restored after."""
    from nnunetv2_smms.settings import temporary_env
    return temporary_env("nnUNet_extTrainer", ext_trainer_env())


def _run(args) -> int:
    print(trainer_dir())
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "trainer-dir",
        help="print the folder to put in nnUNet_extTrainer (export nnUNet_extTrainer=$(nnunetv2_smms trainer-dir))",
        description="Print the folder that nnU-Net's nnUNet_extTrainer variable must name so that "
                    "nnUNetv2_train / nnUNetv2_predict find the SMMS trainers.")
    p.set_defaults(func=_run)
