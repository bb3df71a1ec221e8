# nnUNet_extTrainer points at this folder. Re-exports only (absolute imports): the classes nnU-Net finds here
# are the same objects as `from nnunetv2_smms.trainers import ...` gives, so checkpoints and pickling work.
from nnunetv2_smms.trainers import (nnUNetTrainerSMMS, nnUNetTrainerSMMS_Baseline,  # noqa: F401
                                    nnUNetTrainerSMMS_LightMMF, nnUNetTrainerSMMS_MMF, nnUNetTrainerSMMS_MMF_MAE,
                                    nnUNetTrainerSMMS_MMF_MCML)
