"""The plugin's nnU-Net trainers. ``TRAINERS`` is the one list of them: the nnUNet_extTrainer module re-exports
it, and tests and benchmarks read it."""
from nnunetv2_smms.trainers.labeled_only import nnUNetTrainerLabeledOnly
from nnunetv2_smms.trainers.nnUNetTrainerSMMS import nnUNetTrainerSMMS
from nnunetv2_smms.trainers.semi_supervised import nnUNetTrainerSemiSupervised
from nnunetv2_smms.trainers.variants import (nnUNetTrainerSMMS_Baseline, nnUNetTrainerSMMS_LightMMF,
                                             nnUNetTrainerSMMS_MMF, nnUNetTrainerSMMS_MMF_MAE,
                                             nnUNetTrainerSMMS_MMF_MCML)

# trainers a user can pass to nnUNetv2_train -tr (the base class is not one: it has no method)
TRAINERS = (nnUNetTrainerSMMS, nnUNetTrainerSMMS_Baseline, nnUNetTrainerSMMS_MMF, nnUNetTrainerSMMS_MMF_MAE,
            nnUNetTrainerSMMS_MMF_MCML, nnUNetTrainerSMMS_LightMMF, nnUNetTrainerLabeledOnly)
# the ablation rows of the paper's Table 2, in its order
TABLE2_ABLATIONS = (nnUNetTrainerSMMS_Baseline, nnUNetTrainerSMMS_MMF, nnUNetTrainerSMMS_MMF_MAE,
                    nnUNetTrainerSMMS_MMF_MCML, nnUNetTrainerSMMS)
TRAINER_NAMES = tuple(t.__name__ for t in TRAINERS)

__all__ = ["TRAINERS", "TABLE2_ABLATIONS", "TRAINER_NAMES", "nnUNetTrainerSemiSupervised", *TRAINER_NAMES]
