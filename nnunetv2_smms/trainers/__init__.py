"""The plugin's nnU-Net trainers. ``TRAINERS`` is the one list of them: the nnUNet_extTrainer module re-exports
it, and tests and benchmarks read it."""
from nnunetv2_smms.trainers.cmc import nnUNetTrainerCMC
from nnunetv2_smms.trainers.cps import nnUNetTrainerCPS, nnUNetTrainerCPS_Original
from nnunetv2_smms.trainers.dkuxnet import nnUNetTrainerDKUXNet, nnUNetTrainerDKUXNet_Light
from nnunetv2_smms.trainers.entropy_min import nnUNetTrainerEntropyMin
from nnunetv2_smms.trainers.ict import nnUNetTrainerICT
from nnunetv2_smms.trainers.labeled_only import nnUNetTrainerLabeledOnly
from nnunetv2_smms.trainers.mean_teacher import nnUNetTrainerMeanTeacher
from nnunetv2_smms.trainers.mlrpl import nnUNetTrainerMLRPL
from nnunetv2_smms.trainers.mmcml import nnUNetTrainerMMCML
from nnunetv2_smms.trainers.nnUNetTrainerSMMS import nnUNetTrainerSMMS
from nnunetv2_smms.trainers.semi_supervised import nnUNetTrainerSemiSupervised
from nnunetv2_smms.trainers.urpc import nnUNetTrainerURPC
from nnunetv2_smms.trainers.versemi import (nnUNetTrainerVerSemi, nnUNetTrainerVerSemi_DetachedAggregate,
                                            nnUNetTrainerVerSemi_Stage1Only)
from nnunetv2_smms.trainers.variants import (nnUNetTrainerSMMS_Baseline, nnUNetTrainerSMMS_LightMMF,
                                             nnUNetTrainerSMMS_MMF, nnUNetTrainerSMMS_MMF_MAE,
                                             nnUNetTrainerSMMS_MMF_MCML, nnUNetTrainerSMMS_ModalityDropout)

# the ablation rows of the paper's Table 2, in its order
TABLE2_ABLATIONS = (nnUNetTrainerSMMS_Baseline, nnUNetTrainerSMMS_MMF, nnUNetTrainerSMMS_MMF_MAE,
                    nnUNetTrainerSMMS_MMF_MCML, nnUNetTrainerSMMS)
# the rows of the paper's Table 1 (its order), plus plain nnU-Net on the labeled cases first and CPS
TABLE1_TRAINERS = (nnUNetTrainerLabeledOnly, nnUNetTrainerMeanTeacher, nnUNetTrainerICT, nnUNetTrainerEntropyMin,
                   nnUNetTrainerURPC, nnUNetTrainerCPS, nnUNetTrainerMLRPL, nnUNetTrainerMMCML, nnUNetTrainerCMC,
                   nnUNetTrainerSMMS)
# the two further systems our users ask for (issues 12, 13): not rows of the paper's Table 1
OTHER_METHODS = (nnUNetTrainerVerSemi, nnUNetTrainerDKUXNet)
# trainers a user can pass to nnUNetv2_train -tr (the base class is not one: it has no method)
TRAINERS = tuple(dict.fromkeys(TABLE1_TRAINERS + TABLE2_ABLATIONS + OTHER_METHODS + (
    nnUNetTrainerSMMS_LightMMF, nnUNetTrainerSMMS_ModalityDropout, nnUNetTrainerCPS_Original,
    nnUNetTrainerDKUXNet_Light, nnUNetTrainerVerSemi_Stage1Only, nnUNetTrainerVerSemi_DetachedAggregate)))
TRAINER_NAMES = tuple(t.__name__ for t in TRAINERS)

__all__ = ["TRAINERS", "TABLE1_TRAINERS", "TABLE2_ABLATIONS", "OTHER_METHODS", "TRAINER_NAMES", "nnUNetTrainerSemiSupervised",
           *TRAINER_NAMES]
