"""SMMS trainers for nnU-Net v2."""
from nnunetv2_smms.trainers.nnUNetTrainerSMMS import nnUNetTrainerSMMS
from nnunetv2_smms.trainers.variants import (nnUNetTrainerSMMS_Baseline, nnUNetTrainerSMMS_LightMMF,
                                             nnUNetTrainerSMMS_MMF, nnUNetTrainerSMMS_MMF_MAE,
                                             nnUNetTrainerSMMS_MMF_MCML)

__all__ = ["nnUNetTrainerSMMS", "nnUNetTrainerSMMS_Baseline", "nnUNetTrainerSMMS_MMF", "nnUNetTrainerSMMS_MMF_MAE",
           "nnUNetTrainerSMMS_MMF_MCML", "nnUNetTrainerSMMS_LightMMF"]
