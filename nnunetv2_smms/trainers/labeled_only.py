"""nnUNetTrainerLabeledOnly: plain nnU-Net on the labeled cases, as the reference row of a comparison.

The network, loss, augmentation and update are nnUNetTrainer's (the base trainer's step without an unlabeled
batch is nnU-Net's step: zero_grad, forward, backward, clip to 12, one optimizer step); what it adds is what
makes a comparison fair: it reads the plugin's schedule and seed variables (nnUNet_smms_epochs,
nnUNet_smms_iterations_per_epoch, nnUNet_smms_val_iterations, nnUNet_smms_seed) like every semi-supervised
trainer of the plugin, and writes its checkpoints atomically. It needs no unlabeled data.
"""
from nnunetv2_smms.trainers.semi_supervised import nnUNetTrainerSemiSupervised


class nnUNetTrainerLabeledOnly(nnUNetTrainerSemiSupervised):
    uses_unlabeled = False
    unsup_weight = 0.0
