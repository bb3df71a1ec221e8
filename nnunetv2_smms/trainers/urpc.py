"""nnUNetTrainerURPC: uncertainty-rectified pyramid consistency (Luo et al., MedIA 2022; the authors' code is
SSL4MIS ``code/train_uncertainty_rectified_pyramid_consistency_3D.py``) on nnU-Net's own deep-supervision outputs.

Single network on the modalities concatenated as channels (as SMMS section 3.2 runs the single-modal methods):
nnU-Net's network, unchanged. Its deep-supervision outputs (full, 1/2, 1/4, 1/8 resolution, ...) are the pyramid:
the top ``urpc_scales`` = 4 (fewer if the network has fewer), their LOGITS interpolated to full resolution
(trilinear/bilinear, align_corners False, as the source's ``nn.Upsample(mode='trilinear')`` heads of
``networks/unet_3D_dv_semi.py``; ``urpc_interpolation = "nearest"`` is the 2D source's default), then softmax. On
the unlabeled cases, with p_k the K probability maps:

    p_bar = mean_k p_k
    D_k   = sum_c p_bar * (log p_bar - log p_k)                        (KL per voxel)
    L_k   = mean((p_bar - p_k)^2 * exp(-D_k)) / (mean(exp(-D_k)) + 1e-8) + mean(D_k)
    L     = mean_k L_k

(source :160-203). NOTHING is detached, as in the source: p_bar, D_k and exp(-D_k) all carry gradients.

Supervised part: nnU-Net's Dice + CE with deep supervision, i.e. every scale against its own downsampled label
with weights 1/2^i (the lowest scale 0), normalised to sum 1; the source instead averages CE + Dice of its 4
upsampled outputs against the full-resolution label with equal weights 1/4 (:148-158).

Not reproduced: the source's perturbations of the pyramid (3D: Dropout3d 0.5/0.3/0.2/0.1 after each up-block,
``unet_3D_dv_semi.py:61-64,89-98``; 2D: feature dropout and noise on the auxiliary heads): nnU-Net's network stays
unchanged, so its scales differ by resolution only.

Predicts: the full-resolution output (nnU-Net's network, so nnU-Net's predictor as is); the source too tests the
main output only (``test_urpc_util.py:62-69``).

Defaults (SSL4MIS URPC-3D, :36-64): weight 0.1; sigmoid ramp-up over 400 x 150 iterations = its whole 60 000-iteration
run, i.e. ``unsup_rampup = 1.0`` (the whole training). Softmax outputs only (region-based training is refused).
"""
from typing import Sequence

import torch
import torch.nn.functional as F

from nnunetv2_smms.trainers.recorded_settings import with_method_settings
from nnunetv2_smms.trainers.semi_supervised import nnUNetTrainerSemiSupervised

INTERPOLATIONS = ("linear", "nearest")


def upsample_logits(outputs: Sequence[torch.Tensor], mode: str = "linear") -> list:
    """Every output interpolated to the spatial size of the first (full-resolution) one."""
    if mode not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {mode!r}")
    size = outputs[0].shape[2:]
    linear = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(size)]
    out = []
    for o in outputs:
        if o.shape[2:] == size:
            out.append(o)
        elif mode == "nearest":
            out.append(F.interpolate(o, size=size, mode="nearest"))
        else:
            out.append(F.interpolate(o, size=size, mode=linear, align_corners=False))
    return out


def rectified_pyramid_consistency(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """mean_k L_k for K logit maps of the same shape (B, C, ...): see the module docstring. Float32."""
    log_p = [F.log_softmax(z.float(), dim=1) for z in logits]
    p = [lp.exp() for lp in log_p]
    p_bar = torch.stack(p).mean(0)
    p_bar_log_p_bar = torch.xlogy(p_bar, p_bar)
    losses = []
    for p_k, log_p_k in zip(p, log_p):
        d_k = (p_bar_log_p_bar - p_bar * log_p_k).sum(1, keepdim=True)
        w_k = torch.exp(-d_k)
        losses.append(torch.mean((p_bar - p_k) ** 2 * w_k) / (torch.mean(w_k) + 1e-8) + torch.mean(d_k))
    return torch.stack(losses).mean()


class nnUNetTrainerURPC(nnUNetTrainerSemiSupervised):
    unsup_weight = 0.1           # SSL4MIS URPC-3D consistency 0.1
    unsup_rampup = 1.0           # 400 x 150 = 60 000 = its max_iterations: the whole run
    urpc_scales = 4              # the top 4 deep-supervision outputs (the source's 4 heads)
    urpc_interpolation = "linear"

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.label_manager.has_regions:
            raise NotImplementedError("nnUNetTrainerURPC needs softmax outputs (the KL between class distributions);"
                                      " this dataset uses region-based (sigmoid) training")
        if not self.enable_deep_supervision or self.urpc_scales < 2:
            raise ValueError("nnUNetTrainerURPC needs deep supervision and urpc_scales >= 2 (the pyramid)")

    def recorded_settings(self):
        return with_method_settings(super().recorded_settings(), "urpc", {
            "scales": int(self.urpc_scales), "interpolation": self.urpc_interpolation})

    def unlabeled_losses(self, data):
        outputs = self.network(data)
        if not isinstance(outputs, (list, tuple)) or len(outputs) < 2:
            raise RuntimeError("URPC needs at least two deep-supervision outputs; the network returned "
                               f"{len(outputs) if isinstance(outputs, (list, tuple)) else 1}")
        k = min(self.urpc_scales, len(outputs))
        loss = rectified_pyramid_consistency(upsample_logits(outputs[:k], self.urpc_interpolation))
        return {"loss_urpc": loss + self.ddp_anchor(list(outputs[k:]))}
