"""Every ``nnUNet_smms_*`` environment variable, read here and nowhere else.

Trainers and commands call these functions; ``architectures/`` never reads the environment (a network is
built from its constructor arguments alone).

| variable | read by | meaning |
|---|---|---|
| nnUNet_smms_channel_split | SMMS trainers (start of training) | "A|B" channels per branch, e.g. "0|1", "T1,T1ce|T2,FLAIR" |
| nnUNet_smms_unlabeled_batch_size | semi-supervised trainers | unlabeled cases per step (global over GPUs) |
| nnUNet_smms_epochs, nnUNet_smms_iterations_per_epoch, nnUNet_smms_val_iterations | trainers | shorter schedules |
| nnUNet_smms_seed | trainers | seed Python, NumPy and torch at start-up |
| nnUNet_smms_output_branch | prediction only (build_network_architecture) | fused / a / b: what an SMMS network returns |
"""
import contextlib
import os
from typing import Optional

from nnunetv2_smms.errors import SMMSUserError

CHANNEL_SPLIT = "nnUNet_smms_channel_split"
UNLABELED_BATCH_SIZE = "nnUNet_smms_unlabeled_batch_size"
EPOCHS = "nnUNet_smms_epochs"
ITERATIONS_PER_EPOCH = "nnUNet_smms_iterations_per_epoch"
VAL_ITERATIONS = "nnUNet_smms_val_iterations"
SEED = "nnUNet_smms_seed"
OUTPUT_BRANCH = "nnUNet_smms_output_branch"


class SettingsError(SMMSUserError, ValueError):
    pass


def _get(name: str) -> Optional[str]:
    value = os.environ.get(name)
    return value if value not in (None, "") else None


def env_int(name: str, default=None):
    value = _get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise SettingsError(f"environment variable {name}={value!r} must be an integer") from None


def channel_split() -> Optional[str]:
    return _get(CHANNEL_SPLIT)


def unlabeled_batch_size(default: Optional[int]) -> Optional[int]:
    return env_int(UNLABELED_BATCH_SIZE, default)


def schedule(num_epochs: int, iterations_per_epoch: int, val_iterations: int):
    """(epochs, iterations per epoch, validation iterations), each overridable by its variable."""
    return (env_int(EPOCHS, num_epochs), env_int(ITERATIONS_PER_EPOCH, iterations_per_epoch),
            env_int(VAL_ITERATIONS, val_iterations))


def seed() -> Optional[int]:
    return env_int(SEED, None)


def output_branch() -> Optional[str]:
    """The branch prediction asks for (None: the model's own setting, fused)."""
    value = _get(OUTPUT_BRANCH)
    if value is not None and value not in ("fused", "a", "b"):
        raise SettingsError(f"{OUTPUT_BRANCH}={value!r}: use fused, a or b")
    return value


@contextlib.contextmanager
def temporary_env(name: str, value: str):
    """Set one environment variable inside the block only (nnU-Net reads some settings from the environment at
    call time, e.g. nnUNet_extTrainer, nnUNet_n_proc_DA); the previous value, or its absence, is restored."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old
