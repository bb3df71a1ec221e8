"""nnUNetTrainerCPS: cross pseudo supervision (Chen et al., CVPR 2021) with two nnU-Net networks.

Single-modal method on the modalities concatenated as channels (SMMS section 3.2). Network: two nnU-Net networks of
the same plans in one module (architectures/two_networks.py; network 1 nnU-Net's He init, network 2 Xavier normal
as in SSL4MIS ``train_cross_pseudo_supervision_3D.py:80-109``, ``second_network_init``). Each network learns from
the other's hard pseudo-labels, which carry NO gradient (argmax of the other's detached output):

    L = sum_i DC+CE(f_i(x_l), y) + w(t) * [CE(f_1(x), argmax f_2(x)) + CE(f_2(x), argmax f_1(x))]

on the full-resolution outputs (the supervised part is nnU-Net's loss with deep supervision, per network).
Sources disagree, the default follows SSL4MIS (the medical re-implementation the SMMS comparison methods come from):
- SSL4MIS (default): x = the unlabeled cases only (:154-177); w = 0.1 with the sigmoid ramp-up over 200 x 150 =
  30 000 iterations (``--max_iterations`` 30000): its whole run, ``unsup_rampup = 1.0`` (:57-63,159). SSL4MIS
  weighs its supervised part 0.5 (CE + Dice); here it is nnU-Net's DC + CE (weight 1 each), so the
  pseudo-supervision counts half as much relative to it as in SSL4MIS.
- original (TorchSemiSeg ``exp.voc/voc8.res50v3+.CPS/train.py:179-223``; ``nnUNetTrainerCPS_Original``): x = labeled
  and unlabeled cases joined (one pass over both: ``separate_unlabeled_pass = False``), weight 1.5 (VOC,
  ``config.py:74``), no ramp-up.
Region-based (sigmoid) training: the pseudo-label is sigmoid > 0.5 per region and the term is BCE.

Both implementations use two SGD optimizers; here nnU-Net's one optimizer holds both networks (same schedule), and
the gradient norm is clipped per network (``clip_gradients``) as two optimizers would, not over both jointly.

Predicts: network 1 (the original's branch 1, ``network.py:18-21``; which of its two models SSL4MIS tests is not
recorded). Validation logs network 1's pseudo Dice (checkpoint_best) and network 2's (``mean_fg_dice_2``).
"""
import torch
import torch.nn.functional as F

from nnunetv2_smms.architectures.dual_branch import unwrap
from nnunetv2_smms.architectures.two_networks import SECOND_INITS, build_two_networks
from nnunetv2_smms.trainers.recorded_settings import with_method_settings
from nnunetv2_smms.trainers.semi_supervised import full_resolution, nnUNetTrainerSemiSupervised


def hard_pseudo_labels(logits: torch.Tensor, use_sigmoid: bool = False) -> torch.Tensor:
    """argmax over classes (softmax) or sigmoid > 0.5 per region; no gradient."""
    logits = logits.detach()
    return (logits > 0).float() if use_sigmoid else logits.argmax(1)


def pseudo_supervision(logits: torch.Tensor, pseudo: torch.Tensor, use_sigmoid: bool = False) -> torch.Tensor:
    """Mean CE (BCE for regions) of ``logits`` against hard pseudo-labels. Float32."""
    if use_sigmoid:
        return F.binary_cross_entropy_with_logits(logits.float(), pseudo)
    return F.cross_entropy(logits.float(), pseudo)


def cross_pseudo_supervision(logits1: torch.Tensor, logits2: torch.Tensor, use_sigmoid: bool = False) -> dict:
    """{'loss_cps_1': CE(f_1, pseudo(f_2)), 'loss_cps_2': CE(f_2, pseudo(f_1))}."""
    return {"loss_cps_1": pseudo_supervision(logits1, hard_pseudo_labels(logits2, use_sigmoid), use_sigmoid),
            "loss_cps_2": pseudo_supervision(logits2, hard_pseudo_labels(logits1, use_sigmoid), use_sigmoid)}


class nnUNetTrainerCPS(nnUNetTrainerSemiSupervised):
    unsup_weight = 0.1                   # SSL4MIS consistency 0.1 (original: 1.5, see nnUNetTrainerCPS_Original)
    unsup_rampup = 1.0                   # SSL4MIS: the whole run (original: none)
    cps_on_labeled = False               # SSL4MIS: unlabeled cases only; True (original): labeled ones too
    second_network_init = "xavier_normal"  # SSL4MIS: Kaiming vs Xavier normal; "he": both nnU-Net's init

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.second_network_init not in SECOND_INITS:
            raise ValueError(f"second_network_init must be one of {SECOND_INITS}, got {self.second_network_init!r}")
        if self.cps_on_labeled and self.separate_unlabeled_pass:
            raise ValueError("cps_on_labeled = True needs one pass over labeled + unlabeled cases joined "
                             "(separate_unlabeled_pass = False), as the original CPS computes it")
        self.use_sigmoid = self.label_manager.has_regions

    def recorded_settings(self):
        return with_method_settings(super().recorded_settings(), "cps", {
            "second_network_init": self.second_network_init, "cps_on_labeled": bool(self.cps_on_labeled)})

    # ------------------------------------------------------------------------------------------------ network
    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True):
        """Two networks of the plans; the init recorded in the plans (the default if none: it does not change
        which weights a checkpoint holds)."""
        recorded = configuration_manager.configuration.get("semi_supervised", {}).get("cps", {})
        return build_two_networks(configuration_manager.network_arch_class_name,
                                  configuration_manager.network_arch_init_kwargs,
                                  configuration_manager.network_arch_init_kwargs_req_import,
                                  num_input_channels, num_output_channels, enable_deep_supervision,
                                  second_init=recorded.get("second_network_init", "xavier_normal"))

    def set_deep_supervision_enabled(self, enabled: bool):
        unwrap(self.network).set_deep_supervision(enabled)

    def clip_gradients(self) -> None:
        """Each network's gradient norm on its own (as with the sources' two optimizers)."""
        for net in unwrap(self.network).networks():
            torch.nn.utils.clip_grad_norm_(net.parameters(), self.gradient_clip)

    # ------------------------------------------------------------------------------------------------ losses
    def _supervised(self, out1, out2, target) -> dict:
        return {"loss_sup_1": self.loss(out1, target), "loss_sup_2": self.loss(out2, target)}

    def labeled_losses(self, data, target):
        return self._supervised(*self.network(data), target)

    def unlabeled_losses(self, data):
        out1, out2 = self.network(data)
        terms = cross_pseudo_supervision(full_resolution(out1), full_resolution(out2), self.use_sigmoid)
        if isinstance(out1, (list, tuple)):  # DDP: the lower-resolution heads stay in the graph (weight 0)
            terms["loss_cps_1"] = terms["loss_cps_1"] + self.ddp_anchor(list(out1[1:]) + list(out2[1:]))
        return terms

    def joint_losses(self, data, target, unlabeled):
        """One pass over labeled + unlabeled cases joined (separate_unlabeled_pass = False); the pseudo-supervision
        covers both (cps_on_labeled, the original) or the unlabeled part only."""
        n = data.shape[0]
        out1, out2 = self.network(torch.cat((data, unlabeled), 0))

        def labeled(o):
            return [x[:n] for x in o] if isinstance(o, (list, tuple)) else o[:n]
        z1, z2 = full_resolution(out1), full_resolution(out2)
        if not self.cps_on_labeled:
            z1, z2 = z1[n:], z2[n:]
        return self._supervised(labeled(out1), labeled(out2), target), \
            cross_pseudo_supervision(z1, z2, self.use_sigmoid)

    # ------------------------------------------------------------------------------------------------ validation
    def validation_outputs(self, data, target):
        out1, out2 = unwrap(self.network).forward_both(data)
        return self.loss(out1, target) + self.loss(out2, target), {"": out1, "_2": out2}


class nnUNetTrainerCPS_Original(nnUNetTrainerCPS):
    """CPS with the original's settings (TorchSemiSeg VOC): pseudo-supervision on labeled and unlabeled cases
    joined, weight 1.5, no ramp-up."""
    unsup_weight = 1.5
    unsup_rampup = 0.0
    cps_on_labeled = True
    separate_unlabeled_pass = False
