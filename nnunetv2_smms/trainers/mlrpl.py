"""nnUNetTrainerMLRPL: mutual learning with reliable pseudo-labels (Su et al., MedIA 2024; authors' code
``Jiawei0o0/mutual-learning-with-reliable-pseudo-labels``, ``code/train_Mutual_Reliable.py``).

Single-modal method on the modalities concatenated as channels (SMMS section 3.2). Network: one nnU-Net encoder and
two nnU-Net decoders that differ in upsampling (transposed convolution vs nearest interpolation + convolution), both
exposing their full-resolution pre-logit features (architectures/two_decoders.py). For each ordered pair (student
i, teacher j), i != j, on the full-resolution outputs (p = softmax, f = features, v = voxels of the whole batch):

    U_i = -sum_c p_i log(p_i + 1e-6), U_j likewise;   M = [U_i > U_j]     (learn where the teacher is surer)
    y_j = argmax_c p_j
    proto_{b,c} = normalize( sum_v f_j(v) [y_j(v) = c] / (sum_v [y_j(v) = c] + 1e-6) )   (per case b, teacher's)
    S_{b,c}(v)  = cos(f_j(v), proto_{b,c})
    w(v)  = (1 - mean_c (S_c(v) - p_{j,c}(v))^2) * M(v)
    L_ij  = sum_v CE(z_i(v), y_j(v)) * w(v) / (sum_v M(v) + 1e-6)

(source :166-198). The pseudo-label y_j and the reliability weight w carry no gradient (the source detaches both;
the teacher-side quantities are computed under no_grad here, the same gradients): only the student's CE moves the
weights. Vectorised: prototypes and similarities are einsums over the one-hot pseudo-label (no loops over cases,
classes or voxels).

Choices where the source differs or is silent (class attributes):
- ``ce_on_probabilities`` (False): the source applies ``nn.CrossEntropyLoss`` to the student's softmax
  PROBABILITIES (``consistency_criterion(y_all[i], ...)``, :197), i.e. a second softmax; the default is the
  ordinary CE of the student's logits (-log p_i(y_j)), the formula of the facts notes; True reproduces the code.
- ``mutual_on_labeled`` (True): the source computes L_ij over the whole batch, labeled and unlabeled cases
  (:166-198); it then needs one pass over both joined (``separate_unlabeled_pass = False``). False: unlabeled only.
- supervised part: nnU-Net's Dice + CE with deep supervision for BOTH decoders, times lambda = ``sup_weight``
  (0.5); the source uses foreground Dice only, on full resolution (CE commented out, :155);
  ``supervised_ce = False`` drops nnU-Net's CE (Dice only, as the source).
- dropout p = 0.5 on the bottleneck and on each decoder's features, as the source's training network
  (``feature_dropout``, ``bottleneck_dropout``); decoder 2 upsampling ``decoder2_upsampling`` = "nearest".
- deep supervision: the lower-resolution outputs enter the supervised loss only.
Softmax outputs only (region-based training is refused); the source is binary, the formulas work per class.

Predicts: decoder 1 (the source tests its first output only). Validation logs both decoders' pseudo Dice
(``mean_fg_dice`` = decoder 1, checkpoint_best; ``mean_fg_dice_2``).

Defaults (source :34-46): consistency weight 1, ramp-up 40 x 150 = 6000 of its 15 000 iterations
(``unsup_rampup = 0.4``), lambda 0.5. The source's ``temperature`` 0.1 is declared but unused.
"""
import torch
import torch.nn.functional as F
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper

from nnunetv2_smms.architectures.dual_branch import unwrap
from nnunetv2_smms.architectures.two_decoders import UPSAMPLINGS, build_two_decoder_network
from nnunetv2_smms.trainers.recorded_settings import with_method_settings
from nnunetv2_smms.trainers.semi_supervised import full_resolution, nnUNetTrainerSemiSupervised

DEFAULT_NETWORK = {"decoder2_upsampling": "nearest", "feature_dropout": 0.5, "bottleneck_dropout": 0.5}


def entropy(p: torch.Tensor) -> torch.Tensor:
    """-sum_c p log(p + 1e-6) per voxel: (B, C, ...) -> (B, ...)."""
    return -(p * torch.log(p + 1e-6)).sum(1)


def class_prototypes(features: torch.Tensor, pseudo: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, F, ...) features, (B, ...) hard labels -> (B, C, F): the L2-normalised mean feature of each class in
    each case (zero where a class is absent)."""
    f = features.flatten(2)
    onehot = F.one_hot(pseudo.flatten(1), num_classes).to(f.dtype)              # B, V, C
    sums = torch.einsum("bfv,bvc->bcf", f, onehot)
    return F.normalize(sums / (onehot.sum(1)[..., None] + 1e-6), dim=-1)


def prototype_similarity(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every voxel's feature with every class prototype of its case: (B, C, ...)."""
    f = F.normalize(features.flatten(2), dim=1, eps=1e-8)
    return torch.einsum("bfv,bcf->bcv", f, prototypes).reshape(prototypes.shape[:2] + features.shape[2:])


def reliability_weights(features_t: torch.Tensor, probs_t: torch.Tensor) -> torch.Tensor:
    """1 - mean_c (S_c - p_t,c)^2 per voxel, from the teacher's features and probabilities: (B, ...)."""
    prototypes = class_prototypes(features_t, probs_t.argmax(1), probs_t.shape[1])
    return 1 - ((prototype_similarity(features_t, prototypes) - probs_t) ** 2).mean(1)


def reliable_pseudo_label_loss(logits_s: torch.Tensor, logits_t: torch.Tensor, features_t: torch.Tensor,
                               ce_on_probabilities: bool = False) -> torch.Tensor:
    """L_ij of the module docstring: student logits (B, C, ...), teacher logits and features. Float32."""
    logits_s = logits_s.float()
    p_s = torch.softmax(logits_s, 1)
    with torch.no_grad():  # the teacher's side: pseudo-label, mask and reliability weight carry no gradient
        p_t = torch.softmax(logits_t.float(), 1)
        mask = (entropy(p_s) > entropy(p_t)).float()
        weight = reliability_weights(features_t.float(), p_t) * mask
        pseudo = p_t.argmax(1)
    ce = F.cross_entropy(p_s if ce_on_probabilities else logits_s, pseudo, reduction="none")
    return (ce * weight).sum() / (mask.sum() + 1e-6)


class nnUNetTrainerMLRPL(nnUNetTrainerSemiSupervised):
    unsup_weight = 1.0            # source: consistency 1
    unsup_rampup = 0.4            # source: 40 x 150 = 6000 of 15 000 iterations
    sup_weight = 0.5              # source: lamda 0.5 (on the supervised part)
    mutual_on_labeled = True      # source: the whole batch
    separate_unlabeled_pass = False
    supervised_ce = True          # nnU-Net's DC + CE; False: Dice only (source)
    ce_on_probabilities = False   # True: the source's CE on softmax probabilities
    decoder2_upsampling = DEFAULT_NETWORK["decoder2_upsampling"]
    feature_dropout = DEFAULT_NETWORK["feature_dropout"]
    bottleneck_dropout = DEFAULT_NETWORK["bottleneck_dropout"]

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.label_manager.has_regions:
            raise NotImplementedError("nnUNetTrainerMLRPL needs softmax outputs (entropy, argmax prototypes); this "
                                      "dataset uses region-based (sigmoid) training")
        if self.decoder2_upsampling not in UPSAMPLINGS:
            raise ValueError(f"decoder2_upsampling must be one of {UPSAMPLINGS}, got {self.decoder2_upsampling!r}")
        if self.mutual_on_labeled and self.separate_unlabeled_pass:
            raise ValueError("mutual_on_labeled = True (the source: the mutual loss over the whole batch) needs one "
                             "pass over labeled + unlabeled cases joined (separate_unlabeled_pass = False)")

    def recorded_settings(self):
        return with_method_settings(super().recorded_settings(), "mlrpl", self.method_settings())

    def method_settings(self) -> dict:
        return {"decoder2_upsampling": self.decoder2_upsampling, "feature_dropout": float(self.feature_dropout),
                "bottleneck_dropout": float(self.bottleneck_dropout), "sup_weight": float(self.sup_weight),
                "mutual_on_labeled": bool(self.mutual_on_labeled), "supervised_ce": bool(self.supervised_ce),
                "ce_on_probabilities": bool(self.ce_on_probabilities)}

    # ------------------------------------------------------------------------------------------------ network
    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True):
        """From the settings recorded in the plans (defaults if none: they change no parameter shape)."""
        method = configuration_manager.configuration.get("semi_supervised", {}).get("mlrpl", {})
        recorded = DEFAULT_NETWORK | {k: v for k, v in method.items() if k in DEFAULT_NETWORK}
        return build_two_decoder_network(configuration_manager.network_arch_class_name,
                                         configuration_manager.network_arch_init_kwargs,
                                         configuration_manager.network_arch_init_kwargs_req_import,
                                         num_input_channels, num_output_channels, enable_deep_supervision,
                                         **recorded)

    def set_deep_supervision_enabled(self, enabled: bool):
        unwrap(self.network).set_deep_supervision(enabled)

    def _build_loss(self):
        loss = super()._build_loss()
        if not self.supervised_ce:
            (loss.loss if isinstance(loss, DeepSupervisionWrapper) else loss).weight_ce = 0
        return loss

    # ------------------------------------------------------------------------------------------------ losses
    def _supervised(self, out1, out2, target) -> dict:
        return {"loss_sup_1": self.sup_weight * self.loss(out1, target),
                "loss_sup_2": self.sup_weight * self.loss(out2, target)}

    def _mutual(self, out1, out2, features1, features2) -> dict:
        z1, z2 = full_resolution(out1), full_resolution(out2)
        return {"loss_rpl_1": reliable_pseudo_label_loss(z1, z2, features2, self.ce_on_probabilities),
                "loss_rpl_2": reliable_pseudo_label_loss(z2, z1, features1, self.ce_on_probabilities)}

    def labeled_losses(self, data, target):
        out1, out2, _, _ = self.network(data)
        return self._supervised(out1, out2, target)

    def unlabeled_losses(self, data):
        out1, out2, features1, features2 = self.network(data)
        terms = self._mutual(out1, out2, features1, features2)
        if isinstance(out1, (list, tuple)):  # DDP: the lower-resolution heads stay in the graph (weight 0)
            terms["loss_rpl_1"] = terms["loss_rpl_1"] + self.ddp_anchor(list(out1[1:]) + list(out2[1:]))
        return terms

    def joint_losses(self, data, target, unlabeled):
        """One pass over labeled + unlabeled cases joined; the mutual loss over both (mutual_on_labeled, the
        source) or over the unlabeled part."""
        n = data.shape[0]
        out1, out2, features1, features2 = self.network(torch.cat((data, unlabeled), 0))

        def part(o, sl):
            return [x[sl] for x in o] if isinstance(o, (list, tuple)) else o[sl]
        sup = self._supervised(part(out1, slice(None, n)), part(out2, slice(None, n)), target)
        if self.mutual_on_labeled:
            return sup, self._mutual(out1, out2, features1, features2)
        rest = slice(n, None)
        return sup, self._mutual(part(out1, rest), part(out2, rest), features1[rest], features2[rest])

    # ------------------------------------------------------------------------------------------------ validation
    def validation_outputs(self, data, target):
        out1, out2 = unwrap(self.network).forward_both(data)
        return self.sup_weight * (self.loss(out1, target) + self.loss(out2, target)), {"": out1, "_2": out2}
