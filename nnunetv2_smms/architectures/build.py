"""Build the SMMS dual-branch network from nnU-Net plans (from its arguments alone: no environment)."""
import dataclasses
from typing import Optional

from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

from nnunetv2_smms.architectures.config import SMMSNetworkConfig
from nnunetv2_smms.architectures.dual_branch import DualBranchUNet


def build_dual_branch_network(arch_class_name: str, arch_kwargs: dict, arch_kwargs_req_import,
                              num_input_channels: int, num_output_channels: int, config: SMMSNetworkConfig,
                              deep_supervision: bool = True) -> DualBranchUNet:
    used = config.channels_a + config.channels_b
    if max(used) >= num_input_channels:
        raise ValueError(f"SMMS channel split a={config.channels_a} b={config.channels_b} needs channel "
                         f"{max(used)}, but the network gets only {num_input_channels} input channels")

    def branch(n_in: int):
        return get_network_from_plans(arch_class_name, arch_kwargs, arch_kwargs_req_import, n_in,
                                      num_output_channels, allow_init=True, deep_supervision=deep_supervision)

    return DualBranchUNet(branch(len(config.channels_a)), branch(len(config.channels_b)), config)


def build_from_configuration(configuration_manager, num_input_channels: int, num_output_channels: int,
                             deep_supervision: bool = True, output_branch: Optional[str] = None) -> DualBranchUNet:
    """What the trainer's build_network_architecture does: read the SMMS settings that the trainer recorded
    in the configuration (plans.json of the model folder) and build the network. ``output_branch`` (fused | a |
    b), if given, replaces the recorded eval output (per-branch prediction)."""
    settings = configuration_manager.configuration.get("smms")
    if settings is None:
        raise RuntimeError("These plans carry no SMMS settings (plans['configurations'][<configuration>]['smms']). "
                           "SMMS trainers write them into the model folder's plans.json when training starts; "
                           "predict from a model folder trained with an nnUNetTrainerSMMS* trainer.")
    config = SMMSNetworkConfig.from_dict(settings)
    if output_branch:
        config = dataclasses.replace(config, output_branch=output_branch)
    return build_dual_branch_network(configuration_manager.network_arch_class_name,
                                     configuration_manager.network_arch_init_kwargs,
                                     configuration_manager.network_arch_init_kwargs_req_import,
                                     num_input_channels, num_output_channels, config, deep_supervision)
