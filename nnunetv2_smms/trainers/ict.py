"""nnUNetTrainerICT: Interpolation Consistency Training (Verma et al.) inside nnU-Net, as SSL4MIS applies it
(train_interpolation_consistency_training_3D.py:145-177). Mean Teacher's trainer (student + EMA teacher in one
module, EMA after every optimizer step, what predicts, validation) with mixup consistency instead of noise:

    x_mix = (1 - lam) u_i + lam u_j,   target = (1 - lam) sg(p_t(u_i)) + lam sg(p_t(u_j)),   lam ~ Beta(a, a)
    L = L_sup(student) + w(t) * mean((p_s(x_mix) - target)^2)

on the unlabeled batch (full-resolution output; softmax, sigmoid for region-based datasets). The teacher sees the
clean sources (no noise, as SSL4MIS ICT); the target is detached.

Choices (switchable class attributes):
- pairing: every unlabeled patch i is mixed with a partner j != i, j = (i + s) mod B_u for one random shift
  s in 1..B_u-1 per step (``pairing = "shift"``): B_u mixed samples per step and never a patch with itself.
  SSL4MIS 3D mixes exactly two patches into ONE sample (:150-151); the original pairs u with u[randperm]
  (main.py:280-294), which can pair a patch with itself (``pairing = "permutation"``);
- lam: one draw per mixed sample (``lambda_per_sample = True``, SSL4MIS draws one per pair, :147-149); False: one
  per step (the original's mixup_data);
- defaults (SSL4MIS :57-66): ict_alpha 0.2, EMA 0.99, weight 0.1, ramp 200 x 150 = the whole 30000-iteration run
  (``unsup_rampup = 1.0``); student predicts (SSL4MIS :222-233; the original evaluates the EMA model).
Needs at least 2 unlabeled patches per step on every GPU: training stops at start-up otherwise.
"""
import torch
from torch import distributed as dist

from nnunetv2_smms.errors import SMMSUserError
from nnunetv2_smms.settings import UNLABELED_BATCH_SIZE
from nnunetv2_smms.trainers.mean_teacher import nnUNetTrainerMeanTeacher
from nnunetv2_smms.trainers.recorded_settings import with_method_settings

PAIRINGS = ("shift", "permutation")


class UnlabeledBatchTooSmallError(SMMSUserError, ValueError):
    pass


def mix(x: torch.Tensor, partner: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """(1 - lam_i) x_i + lam_i x_partner(i), lam of shape (B,)."""
    lam = lam.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
    return (1.0 - lam) * x + lam * x[partner]


class nnUNetTrainerICT(nnUNetTrainerMeanTeacher):
    teacher_noise_std = 0.0       # SSL4MIS ICT: the teacher sees the unmixed sources as they are
    mixup_alpha = 0.2             # SSL4MIS ict_alpha
    pairing = "shift"             # "shift" (B_u mixed samples, no self-pairs) | "permutation" (original ICT)
    lambda_per_sample = True      # one lam per mixed sample (SSL4MIS) | one per step (original)

    def recorded_settings(self):
        return with_method_settings(super().recorded_settings(), "ict", {
            "mixup_alpha": float(self.mixup_alpha), "pairing": self.pairing,
            "lambda_per_sample": bool(self.lambda_per_sample)})

    def on_train_start(self):
        self.check_unlabeled_pairs()
        super().on_train_start()

    def check_unlabeled_pairs(self) -> None:
        if self.pairing not in PAIRINGS:
            raise ValueError(f"pairing must be one of {PAIRINGS}, not {self.pairing!r}")
        world = dist.get_world_size() if self.is_ddp else 1
        total = self.global_unlabeled_batch_size()
        if total < 2 * world:  # the smallest share of a global batch split over the GPUs is total // world
            raise UnlabeledBatchTooSmallError(
                f"ICT mixes pairs of unlabeled patches and needs at least 2 per step on every GPU; the unlabeled "
                f"batch is {total} over {world} GPU(s). Set {UNLABELED_BATCH_SIZE}={2 * world} or more (global "
                f"over GPUs).")

    # ------------------------------------------------------------------------------------------------ mixup
    def draw_mixing(self, n: int, device: torch.device):
        """(partner index per patch, lam per patch)."""
        if self.pairing == "shift":
            shift = int(torch.randint(1, n, ()))
            partner = (torch.arange(n) + shift) % n
        else:
            partner = torch.randperm(n)
        beta = torch.distributions.Beta(float(self.mixup_alpha), float(self.mixup_alpha))
        lam = beta.sample((n,)) if self.lambda_per_sample else beta.sample(()).expand(n)
        return partner.to(device), lam.to(device)

    def mixup(self, data: torch.Tensor):
        """(mixed images, mixed teacher probabilities (detached), partner, lam)."""
        partner, lam = self.draw_mixing(data.shape[0], data.device)
        target = mix(self.teacher_probabilities(self.teacher_input(data)), partner, lam)
        return mix(data, partner, lam), target, partner, lam

    def unlabeled_losses(self, data: torch.Tensor):
        mixed, target, _, _ = self.mixup(data)
        return {"loss_consistency": self.consistency(self.network(mixed), target)}
