"""nnunetv2_smms: semi-supervised multi-modal segmentation (SMMS) as a plugin for nnU-Net v2."""

__version__ = "0.1.0"
