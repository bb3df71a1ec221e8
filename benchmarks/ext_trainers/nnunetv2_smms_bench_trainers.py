"""Benchmark-only plain nnU-Net trainer with a short schedule (found by nnUNetv2_train / nnUNetv2_predict when
this folder is in nnUNet_extTrainer; benchmarks/_common.py puts it there).

nnUNetTrainerBenchShort is nnU-Net's nnUNetTrainer with ONLY num_epochs / num_iterations_per_epoch /
num_val_iterations_per_epoch changed, read from the same variables as the SMMS trainer
(nnUNet_smms_epochs, nnUNet_smms_iterations_per_epoch, nnUNet_smms_val_iterations), so both get the same schedule.
nnUNet_smms_seed seeds Python, NumPy and torch as the SMMS trainer does.
Everything else (network, loss, augmentation, optimizer, LR schedule over the shortened run) is plain nnU-Net.
Like the SMMS trainers it writes checkpoint_latest.pth every epoch, atomically, so that a killed benchmark run
goes on with `--c` (this changes no weight: checkpoints are only written).
"""
import os
import random

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_smms.trainers.nnUNetTrainerSMMS import nnUNetTrainerSMMS


def _env_int(name, default):
    v = os.environ.get(name)
    return int(v) if v else default


class nnUNetTrainerBenchShort(nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        seed = _env_int("nnUNet_smms_seed", None)
        if seed is not None:  # the same seeding as nnUNetTrainerSMMS (weights initialised after __init__)
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
        self.num_epochs = _env_int("nnUNet_smms_epochs", self.num_epochs)
        self.num_iterations_per_epoch = _env_int("nnUNet_smms_iterations_per_epoch", self.num_iterations_per_epoch)
        self.num_val_iterations_per_epoch = _env_int("nnUNet_smms_val_iterations", self.num_val_iterations_per_epoch)
        self.save_every = 1

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint, written to a temporary file and renamed into place (never half-written)."""
        tmp = filename + ".tmp"
        super().save_checkpoint(tmp)
        if self.local_rank == 0 and os.path.isfile(tmp):
            os.replace(tmp, filename)


class nnUNetTrainerSMMS_BenchReplace(nnUNetTrainerSMMS):
    """The full method with the most literal MMF reading: both encoders continue from f_ab (mmf_mode 'replace')."""
    mmf_mode = "replace"
