"""nnUNetTrainerMMCML: multi-modal contrastive mutual learning and pseudo-label re-learning (Zhang et al., MedIA
2023, vol. 83, 102656) in nnU-Net.

RE-IMPLEMENTATION FROM THE PAPER'S ABSTRACT: no public code exists (SSL4MIS README line 107 lists it as "None")
and the paper's text was not available. The abstract fixes the ideas: decoupled per-modality models (inference
needs one modality), "Semi-CML" mutual learning between them with an area-similarity contrastive (ASC) loss that
uses cross-modal information and prediction consistency, and a soft pseudo-label re-learning (PReL) stage in
which the better modality's soft predictions remedy the weaker one. Every formula, default and schedule below is
OUR CHOICE (a class attribute, so each can be switched):

Network: the plugin's dual-branch network (architectures/dual_branch.py) with MMF and MAE off: two planned
nnU-Net encoder-decoders, one per modality (channel split as for SMMS: nnUNet_smms_channel_split, dataset.json's
"smms" entry, or channels 0 | 1), no fusion, no dropout (``dropout_p = 0``; nnU-Net's U-Net has none).

Loss per step (p_m = softmax of branch m's full-resolution logits; sigmoid for region training):

    L = DC+CE(out_a, y) + DC+CE(out_b, y)                                      labeled cases (nnU-Net's loss, DS)
      + w(t) * [ consistency_weight * L_cons + asc_weight * L_asc + prel_weight * L_prel ]   unlabeled cases

- L_cons (cross-modal consistency): ||p_a - sg(p_b)||^2 + ||p_b - sg(p_a)||^2 (mean squared error; sg = stop
  gradient: each branch's prediction is a fixed target for the other), the plugin's MutualLearningLoss.
- L_asc (area-similarity contrastive, InfoNCE over the unlabeled cases of the batch): for cases i, j,
      s(i, j) = mean_c (2 sum_v q_a[i,c] q_b[j,c] + eps) / (sum_v q_a[i,c]^2 + sum_v q_b[j,c]^2 + eps),
  q_m = the foreground probability maps (softmax channels 1.., or every sigmoid region), eps 1e-5: the soft Dice
  similarity of the two modalities' predicted areas (``asc_squared = False``: sum q instead of sum q^2 in the
  denominator). Positives: the same case across the modalities (the diagonal), negatives: the other cases of
  the batch. L_asc = 1/2 [CE(S / T, diag) + CE(S^T / T, diag)], T = ``asc_temperature`` = 0.1. Nothing is
  detached: both branches learn from it. With one unlabeled case per step (per GPU under DDP) it is 0.
- L_prel (PReL), from ``prel_start`` = 0.5 of training on (``use_prel``): KL(sg(p_strong) || p_weak), mean over
  voxels (sum over classes; Bernoulli KL per region for sigmoid training); only the weaker branch learns.
  ``prel_stronger = "val_dice"`` (default): the stronger branch is the one with the higher exponential moving
  average (0.9, as nnU-Net's ema_fg_dice) of its validation pseudo Dice (mean_fg_dice_a / _b, logged every
  epoch), decided at the start of every epoch; no PReL term until both have been validated once. ``"entropy"``:
  per voxel, the branch with the lower entropy teaches the other. The mutual terms continue during PReL
  (``prel_replaces_mutual = True`` drops L_cons and L_asc then).
- w(t): the base trainer's sigmoid ramp-up exp(-5 (1 - t/L)^2) with L = ``unsup_rampup`` = 1.0, i.e. over the
  whole run: the SSL4MIS convention most of Table 1's baselines share (ramps.py, consistency_rampup 200 x 150 =
  max_iterations 30000, ssl-methods-facts section 1); MMCML's own ramp is unknown. All weights 1.0.
  Terms are logged with their weights (not w(t)) applied.

Predicts: the mean of the two branches' logits (``output_branch = "fused"``); "a" / "b" predict one branch from
its modality alone (nnUNet_smms_output_branch at prediction time, as for SMMS; the plugin's evaluation scores
a, b and fused). Validation scores the predicting output ("" -> nnU-Net's pseudo Dice and checkpoint_best) and
each branch ("_a", "_b", which also feed prel_stronger = "val_dice").
"""
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from nnunetv2_smms import settings
from nnunetv2_smms.architectures import SMMSNetworkConfig, build_from_configuration, resolve_channel_split, unwrap
from nnunetv2_smms.architectures.config import branch_channel_names
from nnunetv2_smms.architectures.dual_branch import DualBranchUNet, set_output_branch
from nnunetv2_smms.trainers.mutual_learning import MutualLearningLoss
from nnunetv2_smms.trainers.recorded_settings import with_method_settings
from nnunetv2_smms.trainers.semi_supervised import full_resolution, nnUNetTrainerSemiSupervised

PREL_STRONGER = ("val_dice", "entropy")


# ---------------------------------------------------------------------------------------------------- the terms
def probabilities(logits: torch.Tensor, use_sigmoid: bool) -> torch.Tensor:
    return torch.sigmoid(logits.float()) if use_sigmoid else torch.softmax(logits.float(), 1)


def foreground_maps(logits: torch.Tensor, use_sigmoid: bool) -> torch.Tensor:
    """(B, K, V): the foreground probability maps, flattened (softmax channels 1..; every sigmoid region)."""
    p = probabilities(logits, use_sigmoid)
    if not use_sigmoid:
        p = p[:, 1:]
    return p.flatten(2)


def area_similarity(q_a: torch.Tensor, q_b: torch.Tensor, squared: bool = True, eps: float = 1e-5) -> torch.Tensor:
    """(B, B) soft Dice similarity s(i, j) between q_a[i] and q_b[j] (each (K, V)), averaged over the K maps.
    In float32 with autocast off: the sums run over every voxel of the patch (fp16 ends at 65504)."""
    with torch.autocast(device_type=q_a.device.type, enabled=False):
        q_a, q_b = q_a.float(), q_b.float()
        inter = torch.einsum("ikv,jkv->ijk", q_a, q_b)
        size_a, size_b = ((q_a * q_a).sum(-1), (q_b * q_b).sum(-1)) if squared else (q_a.sum(-1), q_b.sum(-1))
        return ((2 * inter + eps) / (size_a[:, None] + size_b[None] + eps)).mean(-1)


def area_similarity_contrastive(logits_a: torch.Tensor, logits_b: torch.Tensor, temperature: float = 0.1,
                                use_sigmoid: bool = False, squared: bool = True) -> torch.Tensor:
    """ASC: symmetric InfoNCE over the batch with the area similarity; positives = same case, other modality."""
    s = area_similarity(foreground_maps(logits_a, use_sigmoid), foreground_maps(logits_b, use_sigmoid), squared)
    logits = s / temperature
    target = torch.arange(s.shape[0], device=s.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def soft_kl(student_logits: torch.Tensor, teacher_probs: torch.Tensor, use_sigmoid: bool) -> torch.Tensor:
    """Per-voxel KL(teacher || student), summed over classes (sigmoid: Bernoulli KL summed over regions);
    shape (B, *spatial). The teacher's probabilities are taken as given (detach them before)."""
    z = student_logits.float()
    if use_sigmoid:
        t = teacher_probs
        kl = (torch.xlogy(t, t) + torch.xlogy(1 - t, 1 - t)
              - t * F.logsigmoid(z) - (1 - t) * F.logsigmoid(-z))
    else:
        kl = torch.xlogy(teacher_probs, teacher_probs) - teacher_probs * torch.log_softmax(z, 1)
    return kl.sum(1)


def entropy(p: torch.Tensor, use_sigmoid: bool) -> torch.Tensor:
    if use_sigmoid:
        h = -(torch.xlogy(p, p) + torch.xlogy(1 - p, 1 - p))
    else:
        h = -torch.xlogy(p, p)
    return h.sum(1)


def prel_loss(logits_a: torch.Tensor, logits_b: torch.Tensor, stronger: str, use_sigmoid: bool = False):
    """PReL: the weaker branch learns the stronger one's (detached) soft prediction. ``stronger``: "a", "b", or
    "entropy" (per voxel, the branch with the lower entropy teaches)."""
    p_a, p_b = probabilities(logits_a, use_sigmoid).detach(), probabilities(logits_b, use_sigmoid).detach()
    if stronger == "a":
        return soft_kl(logits_b, p_a, use_sigmoid).mean()
    if stronger == "b":
        return soft_kl(logits_a, p_b, use_sigmoid).mean()
    if stronger == "entropy":
        a_teaches = (entropy(p_a, use_sigmoid) < entropy(p_b, use_sigmoid)).float()
        return (a_teaches * soft_kl(logits_b, p_a, use_sigmoid)
                + (1 - a_teaches) * soft_kl(logits_a, p_b, use_sigmoid)).mean()
    raise ValueError(f"stronger must be 'a', 'b' or 'entropy', got {stronger!r}")


def moving_average(values, momentum: float = 0.9) -> Optional[float]:
    """nnU-Net's ema_fg_dice rule (ema = m * ema + (1 - m) * value) over the finite values; None if none."""
    ema = None
    for v in values:
        if v is None or not np.isfinite(v):
            continue
        ema = float(v) if ema is None else momentum * ema + (1 - momentum) * float(v)
    return ema


# ---------------------------------------------------------------------------------------------------- trainer
class nnUNetTrainerMMCML(nnUNetTrainerSemiSupervised):
    # --- network ---
    dropout_p = 0.0
    output_branch = "fused"          # fused (mean of the branches' logits) | a | b
    # --- Semi-CML ---
    consistency_weight = 1.0
    asc_weight = 1.0
    asc_temperature = 0.1
    asc_squared = True               # soft Dice with sum q^2 (True) or sum q (False) in the denominator
    # --- PReL ---
    use_prel = True
    prel_start = 0.5                 # fraction of training
    prel_weight = 1.0
    prel_stronger = "val_dice"       # val_dice | entropy
    prel_dice_momentum = 0.9
    prel_replaces_mutual = False
    # --- weight of all unlabeled terms ---
    unsup_weight = 1.0
    unsup_rampup = 1.0
    supervised_only_alternative = "nnUNetTrainerSMMS_Baseline (two branches, labeled cases only)"

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.prel_stronger not in PREL_STRONGER:
            raise ValueError(f"prel_stronger must be one of {PREL_STRONGER}, got {self.prel_stronger!r}")
        channels_a, channels_b = resolve_channel_split(dataset_json, settings.channel_split())
        self.network_config = SMMSNetworkConfig(channels_a=channels_a, channels_b=channels_b, mmf=False, mae=False,
                                                dropout_p=self.dropout_p, output_branch=self.output_branch)
        self.consistency = MutualLearningLoss(use_sigmoid=self.label_manager.has_regions)
        self._prel_teacher: Optional[str] = None
        self._progress = 0.0  # fraction of training at the current step (set when its unlabeled batch is drawn)
        self.print_to_log_file(
            f"MMCML (re-implementation from the abstract): branch a = channels {channels_a} "
            f"({branch_channel_names(dataset_json, channels_a)}), branch b = channels {channels_b} "
            f"({branch_channel_names(dataset_json, channels_b)}), decoupled; consistency x {self.consistency_weight}, "
            f"ASC x {self.asc_weight} (T={self.asc_temperature}), PReL={self.use_prel} from {self.prel_start:.0%} "
            f"({self.prel_stronger}); ramp-up over {self.unsup_rampup:.0%} of training; predicts "
            f"{self.output_branch}", also_print_to_console=True)

    def method_settings(self) -> dict:
        return {"consistency_weight": float(self.consistency_weight), "asc_weight": float(self.asc_weight),
                "asc_temperature": float(self.asc_temperature), "asc_squared": bool(self.asc_squared),
                "use_prel": bool(self.use_prel), "prel_start": float(self.prel_start),
                "prel_weight": float(self.prel_weight), "prel_stronger": self.prel_stronger,
                "prel_dice_momentum": float(self.prel_dice_momentum),
                "prel_replaces_mutual": bool(self.prel_replaces_mutual)}

    def recorded_settings(self):
        """The network under the plugin's dual-branch key 'smms' (read by build_from_configuration at prediction
        time and by the evaluation for the branch names), the loss settings under semi_supervised.mmcml."""
        recorded = with_method_settings(super().recorded_settings(), "mmcml", self.method_settings())
        return recorded | {"smms": self.network_config.to_dict()}

    # ------------------------------------------------------------------------------------------------ network
    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True):
        """The dual-branch network from the recorded settings; nnUNet_smms_output_branch (fused | a | b) picks
        the output for prediction (training resets it)."""
        return build_from_configuration(configuration_manager, num_input_channels, num_output_channels,
                                        enable_deep_supervision, output_branch=settings.output_branch())

    def initialize(self):
        super().initialize()
        set_output_branch(self.network, self.network_config.output_branch)

    def set_deep_supervision_enabled(self, enabled: bool):
        unwrap(self.network).set_deep_supervision(enabled)

    # ------------------------------------------------------------------------------------------------ PReL
    def branch_dice(self, branch: str) -> Optional[float]:
        """The moving average of branch ``branch``'s validation pseudo Dice so far (None: not validated yet)."""
        # the local logger's series travel in the checkpoint: the decision survives --c
        return moving_average(self.logger.local_logger.my_fantastic_logging.get(f"mean_fg_dice_{branch}", []),
                              self.prel_dice_momentum)

    def stronger_branch(self) -> Optional[str]:
        """'a' or 'b' by validation Dice (ties: a), 'entropy' in the per-voxel mode, None before both branches
        have a validation Dice."""
        if self.prel_stronger == "entropy":
            return "entropy"
        dice_a, dice_b = self.branch_dice("a"), self.branch_dice("b")
        if dice_a is None or dice_b is None:
            return None
        return "a" if dice_a >= dice_b else "b"

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        teacher = self.stronger_branch() if self.use_prel else None
        if teacher != self._prel_teacher and teacher is not None:
            self.print_to_log_file(f"PReL teacher: {teacher}" + (
                f" (validation Dice a {self.branch_dice('a'):.4f}, b {self.branch_dice('b'):.4f})"
                if teacher != "entropy" else ""))
        self._prel_teacher = teacher

    def next_unlabeled_batch(self):
        self._progress = self._iteration / max(1, self.num_epochs * self.num_iterations_per_epoch)
        return super().next_unlabeled_batch()

    def prel_active(self) -> bool:
        """PReL from prel_start (a fraction of all training iterations) on, once a teacher is known."""
        return self.use_prel and self._prel_teacher is not None and self._progress >= self.prel_start

    # ------------------------------------------------------------------------------------------------ losses
    def labeled_losses(self, data, target):
        out_a, out_b = self.network(data)
        return {"loss_sup_a": self.loss(out_a, target), "loss_sup_b": self.loss(out_b, target)}

    def unlabeled_losses(self, data):
        out_a, out_b = self.network(data)
        logits_a, logits_b = full_resolution(out_a), full_resolution(out_b)
        sigmoid = self.label_manager.has_regions
        prel = self.prel_active()
        terms = {}
        if not (prel and self.prel_replaces_mutual):
            terms["loss_consistency"] = self.consistency_weight * self.consistency(logits_a, logits_b)
            terms["loss_asc"] = self.asc_weight * area_similarity_contrastive(
                logits_a, logits_b, self.asc_temperature, sigmoid, self.asc_squared)
        if prel:
            terms["loss_prel"] = self.prel_weight * prel_loss(logits_a, logits_b, self._prel_teacher, sigmoid)
        first = next(iter(terms))
        # both full-resolution heads are in every term set; DDP needs the other seg heads in the graph too
        if isinstance(out_a, (list, tuple)):
            terms[first] = terms[first] + self.ddp_anchor(list(out_a[1:]) + list(out_b[1:]))
        if prel and self._prel_teacher in ("a", "b") and self.prel_replaces_mutual:
            terms[first] = terms[first] + self.ddp_anchor([logits_a, logits_b])  # the teacher's head
        return terms

    # ------------------------------------------------------------------------------------------------ validation
    def validation_outputs(self, data, target):
        net = unwrap(self.network)
        out_a, out_b = net.forward_branches(data)
        loss = self.loss(out_a, target) + self.loss(out_b, target)
        predicting = out_a if net.output_branch == "a" else out_b if net.output_branch == "b" \
            else DualBranchUNet.fuse(out_a, out_b)
        return loss, {"": predicting, "_a": out_a, "_b": out_b}
