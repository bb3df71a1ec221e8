"""nnUNetTrainerVerSemi: VerSemi, "Segment Together" (Zeng et al., IEEE TMI 2025; code maxwell0027/VerSemi) on one
nnU-Net dataset, both of the paper's stages.

Network (architectures/dynamic_head.py): the planned nnU-Net U-Net (modalities as channels, 2D or 3D) as trunk,
run once per input, and a dynamic head whose 1x1 convolutions a controller generates from GAP(bottleneck) joined
with a one-hot task prompt. Prompts: K class prompts (one per foreground label, or per region for region-based
datasets) and one synthetic "any foreground" prompt (index K; the source's task 5). For prompt t, z_t = its logit,
p_t = sigmoid(z_t), y_t = its binary target (label == c, or the region), u = max_t y_t (any foreground).

Losses (Dice = the source's soft Dice with squared denominator over the whole batch, smooth 1e-5,
``utils1/losses.py:25-33``, one per prompt channel, averaged; BCE = binary CE with logits, the source's two-class
CE on one logit). CutMix (architectures/cutmix.py): mix(a, b) = a outside a box, b inside it; the box is a
fraction r of the patch per axis, one per sample, at a random position; labeled case i is mixed with case i + 1.

    labeled, every step (labeled_losses):
      loss_sup       = mean_c [Dice(p_c(x), y_c) + BCE(z_c(x), y_c)]                          class prompts
      loss_synthetic = Dice(p_K(x_mix), max_c y_mix,c)                 the union of the pasted foregrounds
      loss_specific  = mean_c Dice(p_c(x_mix), y_mix,c)           each class prompt segments its own label
    unlabeled, stage 2 only (unlabeled_losses; x_c = u outside, a labeled case inside the box):
      loss_aggregate = Dice(p_K(x_c), max_c p_c(x_c))     synthetic prompt vs the aggregate of the class prompts
      loss_cube_gt   = Dice(p_K(x_c) * inside, u_l * inside)   the labeled box's ground truth (labeled part only)
    L = loss_sup + loss_synthetic + loss_specific + unsup_weight * (loss_aggregate + loss_cube_gt)

- What is detached: nothing. ``max_c p_c`` is not detached (the source, ``train.py:461``): the aggregate term
  trains the synthetic prompt towards the class prompts AND the class prompts towards the synthetic one;
  ``detach_aggregate = True`` makes it a pseudo-label (gradient to the synthetic prompt only).
- Stages: the source's "pretrain" (``train.py:198-309``, labeled only, box ratio 2/3) for the first
  ``labeled_only_fraction`` = 0.5 of all iterations (its 1000 + 1000 epochs, ``:62-63``), during which no
  unlabeled batch is drawn; then its "train" (``:344-482``, box ratios U(0.3, 0.6), drawn per step for the
  labeled and for the labeled-unlabeled mix, ``:402-419``). 0 = stage 2 from the start; 1.0 = the released
  ``__main__`` (stage 1 only, ``:500-517``), which then needs no unlabeled cases.
- The source's stage 2 drops loss_specific; the issue asks for it every step: ``specific_in_stage2 = True``
  (False: as the source). The CutMix terms are Dice only as in the source (``mix_terms_ce = True`` adds BCE).
- In the source each labeled case has ONE task (its dataset); here every case carries every class, so each class
  prompt's target on a mix is the mixed label itself (the source's "same task" branch, ``:285-288``), and the
  synthetic target is any foreground of the mix.
- The source's in-cube GT term multiplies by the B x 1 x ... image mask (a broadcasting slip); here it is the
  per-sample box. Its Dice over the masked tensors equals a Dice restricted to the box.
- Weights: every term 1 (``:465``; the consistency weight and ramp it computes are unused, ``:454-455``), so
  ``unsup_weight = 1``, no ramp-up; each term has its own weight attribute.
- Not taken over: Adam 1e-3 (nnU-Net's SGD + poly, over both stages), the EMA network (never used to predict),
  96^3 crops (nnU-Net's patch; the box ratio is a fraction of it), the labeled/unlabeled batch halves (nnU-Net's
  batch + as many unlabeled cases; pairs by a cyclic shift).
- Deep supervision: off (the source has none; one head at full resolution): ``enable_deep_supervision = False``,
  so nnU-Net's loss and targets come without the DS wrapper (nnU-Net's self.loss is built but unused: the
  prompts' binary losses are written here because nnU-Net's Dice computes the target's sums without gradient,
  and the aggregate term needs one).
- Ignore label: voxels with nnU-Net's ignore label are left out of every labeled sum (mixed with the images).
- Predicts (eval mode, dynamic_head.py): from the class prompts, background = 1 - max_c p_c
  (``combination = "one_minus_max"``; regions: the region logits). The synthetic prompt is never used to
  predict. Validation: pseudo Dice of that output, loss = loss_sup.
Recorded in plans[...]['semi_supervised']['versemi'] (network, losses, CutMix, stage fraction); the network is
rebuilt from what is recorded.
"""
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from nnunetv2_smms.architectures.cutmix import check_ratio, cube_mask, draw_ratio, mix, partner_index
from nnunetv2_smms.architectures.dual_branch import unwrap
from nnunetv2_smms.architectures.dynamic_head import DynamicHeadConfig, build_versemi_network
from nnunetv2_smms.trainers.recorded_settings import recorded_method_settings, with_method_settings
from nnunetv2_smms.trainers.semi_supervised import nnUNetTrainerSemiSupervised


# ---------------------------------------------------------------------------------------------------- the terms
def _reduction_axes(x: torch.Tensor):
    return (0,) + tuple(range(2, x.ndim))


def soft_dice_loss(prob: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None,
                   smooth: float = 1e-5) -> torch.Tensor:
    """1 - mean over channels of (2 sum p t + s) / (sum p^2 + sum t^2 + s), sums over the batch and space (the
    source's dice_loss); ``mask`` (broadcastable, e.g. B x 1 x ...) restricts the sums. Float32; the target
    keeps its gradient."""
    p, t = prob.float(), target.float()
    if mask is not None:
        m = mask.float()
        p, t = p * m, t * m
    axes = _reduction_axes(p)
    dice = (2 * (p * t).sum(axes) + smooth) / ((p * p).sum(axes) + (t * t).sum(axes) + smooth)
    return 1 - dice.mean()


def binary_ce(logits: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean binary CE with logits over all (or the masked) voxels and channels."""
    loss = F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none")
    if mask is None:
        return loss.mean()
    m = mask.float().expand_as(loss)
    return (loss * m).sum() / m.sum().clamp_min(1.0)


def dice_bce(logits: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    return soft_dice_loss(torch.sigmoid(logits.float()), target, mask) + binary_ce(logits, target, mask)


def aggregate_consistency(logits: torch.Tensor, n_class_prompts: int, detach: bool = False) -> torch.Tensor:
    """Dice(p_synthetic, max_c p_c) on (B, K + 1, ...) prompt logits (synthetic prompt last)."""
    k = n_class_prompts
    synthetic = torch.sigmoid(logits[:, k:k + 1].float())
    aggregate = torch.sigmoid(logits[:, :k].float()).amax(1, keepdim=True)
    return soft_dice_loss(synthetic, aggregate.detach() if detach else aggregate)


def cube_gt_consistency(synthetic_logits: torch.Tensor, labeled_union: torch.Tensor, inside: torch.Tensor,
                        valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Dice of the synthetic prompt against the labeled case's any-foreground target, inside the pasted box only
    (and where the labeled case is annotated)."""
    mask = inside[:, None]
    if valid is not None:
        mask = mask & valid.bool()
    return soft_dice_loss(torch.sigmoid(synthetic_logits.float()), labeled_union, mask)


def mixed_pairs(data: torch.Tensor, targets: torch.Tensor, valid: Optional[torch.Tensor], ratio: float):
    """Labeled CutMix: case i + 1 (cyclic) pasted into case i in one box per sample.
    Returns (x_mix, y_mix, valid_mix, inside)."""
    n = data.shape[0]
    j = partner_index(n, data.device)
    inside = cube_mask(n, data.shape[2:], ratio, data.device)
    valid_mix = None if valid is None else mix(valid, valid[j], inside)
    return mix(data, data[j], inside), mix(targets, targets[j], inside), valid_mix, inside


def _fmt(ratio) -> str:
    return "U(" + ", ".join(f"{r:.3g}" for r in ratio) + ")" if isinstance(ratio, (list, tuple)) else f"{ratio:.3g}"


# ---------------------------------------------------------------------------------------------------- trainer
class nnUNetTrainerVerSemi(nnUNetTrainerSemiSupervised):
    # --- stages and CutMix ---
    labeled_only_fraction = 0.5        # stage 1 share of all iterations (source: 1000 + 1000 epochs)
    stage1_cube_ratio = 2 / 3          # source: mask_ratio 2/3 (train.py:34)
    stage2_cube_ratio = (0.3, 0.6)     # labeled mix in stage 2, drawn per step (train.py:402-405)
    unlabeled_cube_ratio = (0.3, 0.6)  # labeled box in the unlabeled case (train.py:416-419)
    # --- labeled terms ---
    sup_weight = 1.0
    synthetic_weight = 1.0
    specific_weight = 1.0
    specific_in_stage2 = True          # the issue: every step; the source's stage 2 drops it
    mix_terms_ce = False               # source: Dice only on the mixes
    # --- unlabeled terms (times unsup_weight) ---
    aggregate_weight = 1.0
    cube_gt_weight = 1.0
    detach_aggregate = False           # source: not detached (train.py:461)
    unsup_weight = 1.0                 # source: all weights 1, no ramp (train.py:465)
    unsup_rampup = 0.0
    # --- network ---
    head_channels = 8
    hidden_layers = 2
    combination = "one_minus_max"      # eval: background = 1 - max_c p_c | "zero_logit"
    supervised_only_alternative = "nnUNetTrainerVerSemi_Stage1Only (stage 1 only: labeled cases)"

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.enable_deep_supervision = False  # before initialize(): loss and targets without the DS wrapper
        if not 0.0 <= float(self.labeled_only_fraction) <= 1.0:
            raise ValueError(f"labeled_only_fraction must be a fraction of training in [0, 1] (0: unlabeled terms "
                             f"from the start, 1: labeled only), got {self.labeled_only_fraction!r}")
        for name in ("stage1_cube_ratio", "stage2_cube_ratio", "unlabeled_cube_ratio"):
            check_ratio(getattr(self, name), name)
        lm = self.label_manager
        n_class_prompts = len(lm.foreground_regions) if lm.has_regions else len(lm.foreground_labels)
        self.head_config = DynamicHeadConfig(n_class_prompts=n_class_prompts, regions=lm.has_regions,
                                             head_channels=self.head_channels, hidden_layers=self.hidden_layers,
                                             combination=self.combination)
        if self.labeled_only_fraction >= 1.0:
            self.uses_unlabeled = False  # the released __main__: stage 1 only
        self._stage = 1 if self.labeled_only_fraction > 0 else 2
        self._labeled_for_mix = None
        total = self.num_epochs * self.num_iterations_per_epoch
        cut = self.cutmix_settings()
        self.print_to_log_file(
            f"VerSemi: {n_class_prompts} class prompts ({'regions' if lm.has_regions else 'labels'}) + 1 synthetic; "
            f"stage 1 (labeled only, box {_fmt(cut['stage1_cube_ratio'])} of the patch) for the first "
            f"{self.labeled_only_fraction:.0%} of {total} iterations, then stage 2 (boxes "
            f"{_fmt(cut['stage2_cube_ratio'])} labeled, {_fmt(cut['unlabeled_cube_ratio'])} labeled-unlabeled, "
            f"unlabeled terms x {self.unsup_weight}); aggregate detached: {self.detach_aggregate}; predicts from the "
            f"class prompts ({self.combination})", also_print_to_console=True)

    @property
    def n_class_prompts(self) -> int:
        return self.head_config.n_class_prompts

    def loss_settings(self) -> dict:
        return {"sup_weight": float(self.sup_weight), "synthetic_weight": float(self.synthetic_weight),
                "specific_weight": float(self.specific_weight), "specific_in_stage2": bool(self.specific_in_stage2),
                "mix_terms_ce": bool(self.mix_terms_ce), "aggregate_weight": float(self.aggregate_weight),
                "cube_gt_weight": float(self.cube_gt_weight), "detach_aggregate": bool(self.detach_aggregate)}

    def cutmix_settings(self) -> dict:
        def plain(r):
            return [float(v) for v in r] if isinstance(r, (list, tuple)) else float(r)
        return {"stage1_cube_ratio": plain(self.stage1_cube_ratio), "stage2_cube_ratio": plain(self.stage2_cube_ratio),
                "unlabeled_cube_ratio": plain(self.unlabeled_cube_ratio)}

    def recorded_settings(self):
        """Under semi_supervised.versemi (recorded_settings.with_method_settings): the network (read back by
        build_network_architecture), the losses, the CutMix boxes and the stage fraction."""
        return with_method_settings(super().recorded_settings(), "versemi", {
            "network": self.head_config.to_dict(), "losses": self.loss_settings(), "cutmix": self.cutmix_settings(),
            "labeled_only_fraction": float(self.labeled_only_fraction)})

    # ------------------------------------------------------------------------------------------------ network
    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True):
        """From the settings recorded in the plans (the model folder's plans.json at prediction time); deep
        supervision is never built (the flag is ignored)."""
        recorded = recorded_method_settings(configuration_manager.configuration, "versemi")
        if recorded is None:
            raise RuntimeError("These plans carry no VerSemi settings (plans['configurations'][<configuration>]"
                               "['semi_supervised']['versemi']); nnUNetTrainerVerSemi writes them into the model "
                               "folder's plans.json when training starts: predict from a folder it trained.")
        return build_versemi_network(configuration_manager.network_arch_class_name,
                                     configuration_manager.network_arch_init_kwargs,
                                     configuration_manager.network_arch_init_kwargs_req_import,
                                     num_input_channels, num_output_channels,
                                     DynamicHeadConfig.from_dict(recorded["network"]))

    def set_deep_supervision_enabled(self, enabled: bool):
        """Nothing to switch: nnU-Net turns deep supervision off for its final validation and back on after it
        (nnUNetTrainer.perform_actual_validation), but this network has none; it stays off."""
        unwrap(self.network).set_deep_supervision(False)

    # ------------------------------------------------------------------------------------------------ targets
    def class_targets(self, target: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(B, K, ...) float binary target per class prompt, and (B, 1, ...) bool annotated-voxel mask (None
        without an ignore label)."""
        lm = self.label_manager
        if lm.has_regions:
            if lm.has_ignore_label:  # nnU-Net appends the ignore label as the last region channel
                return target[:, :-1].float(), ~target[:, -1:].bool()
            return target.float(), None
        y = torch.cat([target == label for label in lm.foreground_labels], 1).float()
        return y, (target != lm.ignore_label) if lm.has_ignore_label else None

    # ------------------------------------------------------------------------------------------------ schedule
    def next_unlabeled_batch(self):
        """Stage 1 (the first labeled_only_fraction of all iterations): no unlabeled batch is drawn."""
        progress = self._iteration / max(1, self.num_epochs * self.num_iterations_per_epoch)
        self._stage = 1 if progress < self.labeled_only_fraction else 2
        if self._stage == 1:
            return None
        return super().next_unlabeled_batch()

    TERMS = ("loss_sup", "loss_synthetic", "loss_specific", "loss_aggregate", "loss_cube_gt")

    def train_step(self, batch: dict) -> dict:
        """The base's step; every step reports every term (NaN where a stage does not use it), as nnU-Net's
        collate_outputs needs the same keys in all steps of an epoch (the stage can change within one)."""
        out = super().train_step(batch)
        return {**{k: np.array(np.nan) for k in self.TERMS}, **out}

    # ------------------------------------------------------------------------------------------------ losses
    def _mix_loss(self, logits, target, valid):
        loss = soft_dice_loss(torch.sigmoid(logits.float()), target, valid)
        return loss + binary_ce(logits, target, valid) if self.mix_terms_ce else loss

    def labeled_losses(self, data, target):
        k = self.n_class_prompts
        y, valid = self.class_targets(target)
        ratio = draw_ratio(self.stage1_cube_ratio if self._stage == 1 else self.stage2_cube_ratio)
        x_mix, y_mix, valid_mix, _ = mixed_pairs(data, y, valid, ratio)
        n = data.shape[0]
        logits = self.network(torch.cat((data, x_mix), 0))  # one trunk pass for the cases and their mixes
        plain, mixed = logits[:n], logits[n:]
        terms = {"loss_sup": self.sup_weight * dice_bce(plain[:, :k], y, valid),
                 "loss_synthetic": self.synthetic_weight * self._mix_loss(mixed[:, k:], y_mix.amax(1, keepdim=True),
                                                                          valid_mix)}
        if self._stage == 1 or self.specific_in_stage2:
            terms["loss_specific"] = self.specific_weight * self._mix_loss(mixed[:, :k], y_mix, valid_mix)
        # for the labeled-unlabeled mix of this step (unlabeled_losses runs right after)
        self._labeled_for_mix = (data, y.amax(1, keepdim=True), valid)
        return terms

    def unlabeled_losses(self, data):
        if self._labeled_for_mix is None:
            raise RuntimeError("VerSemi's unlabeled terms paste a labeled case into each unlabeled one: "
                               "labeled_losses must run first in the step")
        labeled, union, valid = self._labeled_for_mix
        self._labeled_for_mix = None
        k = self.n_class_prompts
        idx = torch.arange(data.shape[0], device=data.device) % labeled.shape[0]
        inside = cube_mask(data.shape[0], data.shape[2:], draw_ratio(self.unlabeled_cube_ratio), data.device)
        logits = self.network(mix(data, labeled[idx], inside))  # unlabeled outside, labeled case inside the box
        return {"loss_aggregate": self.aggregate_weight * aggregate_consistency(logits, k, self.detach_aggregate),
                "loss_cube_gt": self.cube_gt_weight * cube_gt_consistency(
                    logits[:, k:k + 1], union[idx], inside, None if valid is None else valid[idx])}

    # ------------------------------------------------------------------------------------------------ validation
    def validation_outputs(self, data, target):
        net = unwrap(self.network)
        logits = net.forward_prompts(data, net.class_prompts)
        y, valid = self.class_targets(target)
        return self.sup_weight * dice_bce(logits, y, valid), {"": net.combine(logits)}


# ------------------------------------------------------------------------------------------ diagnostic variants
class nnUNetTrainerVerSemi_Stage1Only(nnUNetTrainerVerSemi):
    """VerSemi's first stage for the whole schedule (labeled cases and their CutMix only; the source's released
    ``__main__``): needs no unlabeled cases. Against nnUNetTrainerVerSemi it shows what stage 2 adds."""
    labeled_only_fraction = 1.0


class nnUNetTrainerVerSemi_DetachedAggregate(nnUNetTrainerVerSemi):
    """VerSemi with the aggregate of the class prompts detached in the unlabeled term: a pseudo-label for the
    synthetic prompt, so the unlabeled cases no longer pull the class prompts (which predict) towards it."""
    detach_aggregate = True
