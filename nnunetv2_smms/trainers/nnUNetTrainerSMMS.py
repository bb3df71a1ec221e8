"""nnUNetTrainerSMMS: semi-supervised multi-modal segmentation (Meng et al. 2025) inside nnU-Net.

The semi-supervised plumbing (unlabeled loader, the two-pass step, ramp-up, logging, recorded settings,
checkpoints) is nnUNetTrainerSemiSupervised's. What SMMS adds:
- the network: two planned encoder-decoders, one per modality (channel split), joined by MMF and MAE
  (architectures/); its settings are recorded in plans['configurations'][c]['smms'] for nnUNetv2_predict;
- the loss: L = L_sup(a) + L_sup(b) + alpha * L_unsup (MCML, trainers/mutual_learning.py), L_unsup on the
  unlabeled part of each step;
- validation: the fused output's pseudo Dice (the one nnU-Net uses for checkpoint_best), plus each branch's;
- optional modality dropout (``modality_dropout_p``, default 0 = off; trainers/modality_dropout.py): per labeled
  sample, with probability p one branch's input is 0, so that the other branch learns to predict alone
  (``nnunetv2_smms predict`` for cases that lack a modality's file). Not applied to the unlabeled batch unless
  ``modality_dropout_unlabeled``: MCML makes each branch's output the other's target, and a branch without its
  input (it sees the other modality only through MMF and MAE) would be a poor target. Both branches' supervised
  losses stay as they are on a dropped sample. Never in validation.

Switches are class attributes; the ablation trainers (variants.py) flip them. The environment variables are
listed in nnunetv2_smms/settings.py.
"""
import torch

from nnunetv2_smms import settings
from nnunetv2_smms.architectures import SMMSNetworkConfig, build_from_configuration, resolve_channel_split, unwrap
from nnunetv2_smms.architectures.config import branch_channel_names
from nnunetv2_smms.architectures.dual_branch import DualBranchUNet, set_output_branch
from nnunetv2_smms.trainers.modality_dropout import drop_modalities
from nnunetv2_smms.trainers.mutual_learning import MutualLearningLoss
from nnunetv2_smms.trainers.recorded_settings import with_method_settings
from nnunetv2_smms.trainers.semi_supervised import full_resolution, nnUNetTrainerSemiSupervised


class nnUNetTrainerSMMS(nnUNetTrainerSemiSupervised):
    # --- SMMS switches (ablations flip these) ---
    use_mmf = True
    use_mae = True
    use_mcml = True
    mmf_stages = 4
    mmf_mode = "residual_gate"
    mmf_kernel_size = 3          # paper (the stage's planned kernel, e.g. 3x3x3 or 1x3x3); 1 = light MMF
    mae_position = "bottleneck"
    dropout_p = 0.5
    # --- modality dropout (missing modality at inference; not in the paper) ---
    modality_dropout_p = 0.0             # per sample: probability that ONE branch's input is 0 (p/2 each)
    modality_dropout_unlabeled = False   # also drop on the unlabeled (MCML) batch
    # --- mutual learning ---
    unsup_weight = 1.0           # paper: alpha = 1.0
    supervised_only_alternative = "nnUNetTrainerSMMS_MMF_MAE (no MCML)"

    @property
    def uses_unlabeled(self) -> bool:
        return self.use_mcml

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        channels_a, channels_b = resolve_channel_split(dataset_json, settings.channel_split())
        self.smms_config = SMMSNetworkConfig(
            channels_a=channels_a, channels_b=channels_b, mmf=self.use_mmf, mmf_stages=self.mmf_stages,
            mmf_mode=self.mmf_mode, mmf_kernel_size=self.mmf_kernel_size, mae=self.use_mae,
            mae_position=self.mae_position, dropout_p=self.dropout_p)
        self.mutual_loss = MutualLearningLoss(use_sigmoid=self.label_manager.has_regions)
        self.print_to_log_file(
            f"SMMS: branch a = channels {channels_a} ({branch_channel_names(dataset_json, channels_a)}), branch b = "
            f"channels {channels_b} ({branch_channel_names(dataset_json, channels_b)}); MMF={self.use_mmf} "
            f"({self.mmf_mode}, kernel {self.mmf_kernel_size}), MAE={self.use_mae} ({self.mae_position}), "
            f"MCML={self.use_mcml} (alpha={self.unsup_weight}, ramp-up over {self.unsup_rampup:.0%} of training), "
            f"dropout={self.dropout_p}, modality dropout p={self.modality_dropout_p}"
            f"{' (labeled and unlabeled)' if self.modality_dropout_unlabeled else ' (labeled)'}",
            also_print_to_console=True)
        if not 0 <= self.modality_dropout_p <= 1:
            raise ValueError(f"{type(self).__name__}.modality_dropout_p must be in [0, 1], "
                             f"got {self.modality_dropout_p}")

    def recorded_settings(self):
        """The network settings (plans 'smms', read back at prediction time) and, when it is on, modality dropout
        in the base entry (semi_supervised.modality_dropout: a key of its own would count as a preprocessing change
        for the unlabeled data's stamp, unlabeled/preprocess.py NOT_PREPROCESSING_KEYS). Off (p = 0) it is not
        written, so a model trained before the option existed and one trained with it off record the same thing;
        a resume with another p stops either way (trained with None vs. the dict, or the other way round)."""
        recorded = super().recorded_settings() | {"smms": self.smms_config.to_dict()}
        if self.modality_dropout_p > 0:
            recorded = with_method_settings(recorded, "modality_dropout", {
                "p": float(self.modality_dropout_p), "unlabeled": bool(self.modality_dropout_unlabeled)})
        return recorded

    # ------------------------------------------------------------------------------------------------ network
    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True):
        """From the settings recorded in the plans (the model folder's plans.json at prediction time);
        nnUNet_smms_output_branch picks the output for prediction (the trainer resets it, see initialize)."""
        return build_from_configuration(configuration_manager, num_input_channels, num_output_channels,
                                        enable_deep_supervision, output_branch=settings.output_branch())

    def initialize(self):
        super().initialize()
        # nnUNet_smms_output_branch is for prediction only: training, validation and the final validation
        # always use the recorded output (fused)
        set_output_branch(self.network, self.smms_config.output_branch)

    def set_deep_supervision_enabled(self, enabled: bool):
        unwrap(self.network).set_deep_supervision(enabled)

    # ------------------------------------------------------------------------------------------------ losses
    def drop_modalities(self, data: torch.Tensor) -> torch.Tensor:
        """The batch with one branch's input set to 0 in about modality_dropout_p of its samples (p = 0: the batch
        itself, no random numbers drawn)."""
        if not self.modality_dropout_p:
            return data
        return drop_modalities(data, self.smms_config.channels_a, self.smms_config.channels_b,
                               self.modality_dropout_p)[0]

    def _unlabeled_input(self, data: torch.Tensor) -> torch.Tensor:
        return self.drop_modalities(data) if self.modality_dropout_unlabeled else data

    def labeled_losses(self, data, target):
        out_a, out_b = self.network(self.drop_modalities(data))
        return {"loss_sup_a": self.loss(out_a, target), "loss_sup_b": self.loss(out_b, target)}

    def unlabeled_losses(self, data):
        out_a, out_b = self.network(self._unlabeled_input(data))
        unsup = self.mutual_loss(full_resolution(out_a), full_resolution(out_b))
        if isinstance(out_a, (list, tuple)):
            # L_unsup uses the full-resolution outputs only; DDP needs the other seg heads in the graph (nnU-Net
            # itself gives its lowest deep-supervision output the weight 1e-6 under DDP for the same reason)
            unsup = unsup + self.ddp_anchor(list(out_a[1:]) + list(out_b[1:]))
        return {"loss_unsup": unsup}

    def joint_losses(self, data, target, unlabeled):
        """One pass over labeled + unlabeled cases joined (separate_unlabeled_pass = False)."""
        n = data.shape[0]
        out_a, out_b = self.network(torch.cat((self.drop_modalities(data), self._unlabeled_input(unlabeled)), 0))

        def labeled(o):
            return [x[:n] for x in o] if isinstance(o, (list, tuple)) else o[:n]
        sup = {"loss_sup_a": self.loss(labeled(out_a), target), "loss_sup_b": self.loss(labeled(out_b), target)}
        return sup, {"loss_unsup": self.mutual_loss(full_resolution(out_a)[n:], full_resolution(out_b)[n:])}

    # ------------------------------------------------------------------------------------------------ validation
    def validation_outputs(self, data, target):
        out_a, out_b = unwrap(self.network).forward_branches(data)
        loss = self.loss(out_a, target) + self.loss(out_b, target)
        return loss, {"": DualBranchUNet.fuse(out_a, out_b), "_a": out_a, "_b": out_b}
