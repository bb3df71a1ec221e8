"""The SMMS dual-branch network (MMF, MAE) built from nnU-Net plans."""
from nnunetv2_smms.architectures.build import build_dual_branch_network, build_from_configuration
from nnunetv2_smms.architectures.config import SMMSNetworkConfig, resolve_channel_split
from nnunetv2_smms.architectures.dual_branch import DualBranchUNet, has_branches, set_output_branch, unwrap

__all__ = ["build_dual_branch_network", "build_from_configuration", "SMMSNetworkConfig", "resolve_channel_split",
           "DualBranchUNet", "has_branches", "set_output_branch", "unwrap"]
