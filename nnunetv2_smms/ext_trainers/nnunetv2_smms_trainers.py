# nnUNet_extTrainer points at this folder. Re-exports only (absolute imports): the classes nnU-Net finds here
# are the same objects as `from nnunetv2_smms.trainers import ...` gives, so checkpoints and pickling work.
# The list itself is nnunetv2_smms.trainers.TRAINERS.
from nnunetv2_smms.trainers import *  # noqa: F401,F403
