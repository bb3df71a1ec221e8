"""Ablation trainers of the paper's Table 2: each flips switches of nnUNetTrainerSMMS (the full method)."""
from nnunetv2_smms.trainers.nnUNetTrainerSMMS import nnUNetTrainerSMMS


class nnUNetTrainerSMMS_Baseline(nnUNetTrainerSMMS):
    """Two branches, no MMF, no MAE, no MCML (labeled cases only)."""
    use_mmf = False
    use_mae = False
    use_mcml = False


class nnUNetTrainerSMMS_MMF(nnUNetTrainerSMMS):
    use_mae = False
    use_mcml = False


class nnUNetTrainerSMMS_MMF_MAE(nnUNetTrainerSMMS):
    use_mcml = False


class nnUNetTrainerSMMS_MMF_MCML(nnUNetTrainerSMMS):
    use_mae = False


class nnUNetTrainerSMMS_LightMMF(nnUNetTrainerSMMS):
    """The full method with pointwise (1x1x1) MMF convolutions: about a tenth of the paper's MMF compute."""
    mmf_kernel_size = 1


class nnUNetTrainerSMMS_ModalityDropout(nnUNetTrainerSMMS):
    """The full method trained for a missing modality at inference: per labeled sample, with probability 0.5 one
    branch's input is 0 (each branch 0.25, never both; trainers/modality_dropout.py). Predict cases that lack a
    modality's file with ``nnunetv2_smms predict`` (the present modality's branch predicts)."""
    modality_dropout_p = 0.5
