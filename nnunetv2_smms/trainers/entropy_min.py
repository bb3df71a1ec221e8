"""nnUNetTrainerEntropyMin: entropy minimisation (Vu et al., ADVENT) as a semi-supervised baseline inside nnU-Net.
One network on the modalities concatenated as channels (plain nnU-Net's planned U-Net, SMMS section 3.2).

    L = L_sup + w(t) * mean_voxels( -sum_c p_c log p_c / log C )

- p: softmax probabilities of the full-resolution output, C = number of output channels; for region-based
  datasets (sigmoid) each region's binary entropy / log 2, averaged over regions. NOTHING is detached: the
  gradient flows through p (that is the method). log p is computed as log_softmax (log-sigmoid) instead of
  log(p + eps) (SSL4MIS utils/losses.py:30-36 adds 1e-6, ADVENT loss.py:30-38 1e-30): the same value without
  the guard, finite for saturated voxels;
- on which cases (``entropy_on``): "all" = labeled + unlabeled patches of the step, as SSL4MIS
  (train_entropy_minimization_3D.py:139-141; one forward over the joined batch, so about twice the activation
  memory of the separate passes), or "unlabeled" = the unlabeled batch only, as ADVENT (train_UDA.py:276-289);
  the default is SSL4MIS's, the medical reference whose weight and ramp are used;
- defaults (SSL4MIS :60-63): weight 0.1, sigmoid ramp 200 x 150 = its whole 30000-iteration run
  (``unsup_rampup = 1.0``); ADVENT's weight is 0.001 (config.py:73-74). Full-resolution output only (ADVENT
  also on its auxiliary head, SSL4MIS has no deep supervision);
- the network that trains predicts (nnU-Net's own network, checkpoint and prediction unchanged).
"""
import math

import torch
import torch.nn.functional as F

from nnunetv2_smms.trainers.recorded_settings import with_method_settings
from nnunetv2_smms.trainers.semi_supervised import full_resolution, nnUNetTrainerSemiSupervised

ENTROPY_ON = ("all", "unlabeled")


def normalised_entropy(logits: torch.Tensor, use_sigmoid: bool = False) -> torch.Tensor:
    """mean over batch and voxels of -sum_c p_c log p_c / log C (sigmoid: mean over regions too, / log 2)."""
    logits = logits.float()
    if use_sigmoid:
        p = torch.sigmoid(logits)
        h = -(p * F.logsigmoid(logits) + (1.0 - p) * F.logsigmoid(-logits)) / math.log(2.0)
        return h.mean()
    n_classes = logits.shape[1]
    if n_classes < 2:
        raise ValueError("the normalised entropy needs at least 2 classes")
    log_p = torch.log_softmax(logits, dim=1)
    return (-(log_p.exp() * log_p).sum(1) / math.log(n_classes)).mean()


class nnUNetTrainerEntropyMin(nnUNetTrainerSemiSupervised):
    unsup_weight = 0.1        # SSL4MIS
    unsup_rampup = 1.0        # SSL4MIS: the ramp covers the whole run
    entropy_on = "all"        # "all" (SSL4MIS) | "unlabeled" (ADVENT)

    @property
    def separate_unlabeled_pass(self) -> bool:
        return self.entropy_on == "unlabeled"  # "all": one pass over labeled + unlabeled (joint_losses)

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        if self.entropy_on not in ENTROPY_ON:
            raise ValueError(f"entropy_on must be one of {ENTROPY_ON}, not {self.entropy_on!r}")
        super().__init__(plans, configuration, fold, dataset_json, device)

    def recorded_settings(self):
        return with_method_settings(super().recorded_settings(), "entropy_min", {"entropy_on": self.entropy_on})

    def entropy(self, output) -> torch.Tensor:
        loss = normalised_entropy(full_resolution(output), self.label_manager.has_regions)
        if isinstance(output, (list, tuple)):  # the lower deep-supervision heads, for DDP
            loss = loss + self.ddp_anchor(list(output[1:]))
        return loss

    def unlabeled_losses(self, data: torch.Tensor):
        return {"loss_entropy": self.entropy(self.network(data))}

    def joint_losses(self, data, target, unlabeled):
        n = data.shape[0]
        output = self.network(torch.cat((data, unlabeled), 0))
        labeled = [o[:n] for o in output] if isinstance(output, (list, tuple)) else output[:n]
        return {"loss_sup": self.loss(labeled, target)}, {"loss_entropy": normalised_entropy(
            full_resolution(output), self.label_manager.has_regions)}
