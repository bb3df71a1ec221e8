"""nnUNetTrainerMeanTeacher: Mean Teacher (Tarvainen & Valpola 2017) inside nnU-Net, as SSL4MIS applies it to
medical volumes (train_mean_teacher_3D.py). One network on the modalities concatenated as channels (plain nnU-Net's
planned U-Net), as SMMS section 3.2 does for the single-modal comparison methods.

    L = L_sup(student) + w(t) * mean((p_s(x_u) - sg(p_t(x_u + n)))^2),   n = clamp(N(0, 1) * 0.1, -0.2, 0.2)

- L_sup: nnU-Net's Dice + CE with deep supervision on the labeled batch (SSL4MIS: 0.5 (CE + Dice), no DS);
- p_s, p_t: student and EMA-teacher probabilities (softmax; sigmoid for region-based datasets) of the unlabeled
  batch, full-resolution output only; the mean runs over batch, classes and voxels (SSL4MIS :150-158; CuriousAI
  sums over classes / num_classes over the WHOLE batch, main.py:263 - here unlabeled cases only, as SSL4MIS);
- the teacher (architectures/ema_teacher.py) gets the noisy input, runs without autograd and its parameters
  never get a gradient; it moves by EMA after EVERY optimizer step (after_optimizer_step; skipped steps do not
  count), alpha_t = min(1 - 1/(t + 1), ema_decay);
- the student and teacher see the SAME augmented patch (plus the teacher's noise), as SSL4MIS; the original
  gives each its own augmentation (TransformTwice). nnU-Net's U-Net has no dropout, so the noise is the only
  perturbation; SSL4MIS's 2D variant's zero weight for the first 1000 iterations is not applied (the 3D script
  has none).

Defaults (SSL4MIS train_mean_teacher_3D.py): ema_decay 0.99 (:56), weight 0.1 (:59-60), sigmoid ramp-up 200 x 150
= 30000 iterations = all of its 30000 (:61-62,67-69): ``unsup_rampup = 1.0`` (the whole run). What predicts:
``predict_with`` = "student" (SSL4MIS saves and tests the student, :201-214) or "teacher" (the original selects
the EMA model, main.py:110-115). It is recorded in the plans (``semi_supervised.ema_teacher``), so the model folder's
plans.json tells nnUNetv2_predict which sub-model to return; validation also reports the other one
(``mean_fg_dice_teacher`` / ``_student``).
"""
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_smms.architectures.dual_branch import unwrap
from nnunetv2_smms.architectures.ema_teacher import EMATeacherNetwork
from nnunetv2_smms.trainers.recorded_settings import recorded_method_settings, with_method_settings
from nnunetv2_smms.trainers.semi_supervised import full_resolution, nnUNetTrainerSemiSupervised

# recorded in plans['configurations'][c]['semi_supervised'][SETTINGS_KEY]: inside the base trainer's key because the
# unlabeled folder's preprocessing stamp (unlabeled/preprocess.py NOT_PREPROCESSING_KEYS) ignores only the base's
# and SMMS's keys; a key of its own would mark the preprocessed unlabeled cases stale
SETTINGS_KEY = "ema_teacher"


def probabilities(logits: torch.Tensor, use_sigmoid: bool) -> torch.Tensor:
    logits = logits.float()
    return torch.sigmoid(logits) if use_sigmoid else torch.softmax(logits, dim=1)


def consistency_mse(student_logits: torch.Tensor, target: torch.Tensor, use_sigmoid: bool) -> torch.Tensor:
    """mean((p_s - target)^2) over batch, classes and voxels; the target is used as given (detach it first)."""
    return torch.mean((probabilities(student_logits, use_sigmoid) - target) ** 2)


class nnUNetTrainerMeanTeacher(nnUNetTrainerSemiSupervised):
    unsup_weight = 0.1            # SSL4MIS consistency 0.1
    unsup_rampup = 1.0            # SSL4MIS: the ramp covers the whole run
    ema_decay = 0.99              # SSL4MIS 3D/2D; the original's default 0.999
    predict_with = "student"      # "student" (SSL4MIS) | "teacher" (original MT)
    teacher_noise_std = 0.1       # n = clamp(N(0,1) * std, -clip, clip) on the teacher's input
    teacher_noise_clip = 0.2
    validate_other_model = True   # also score the sub-model that does not predict (one more forward per batch)

    def recorded_settings(self):
        return with_method_settings(super().recorded_settings(), SETTINGS_KEY, {
            "predict": self.predict_with, "ema_decay": float(self.ema_decay),
            "teacher_noise_std": float(self.teacher_noise_std), "teacher_noise_clip": float(self.teacher_noise_clip)})

    # ------------------------------------------------------------------------------------------------ network
    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True):
        """nnU-Net's planned network as the student, a copy as the teacher; which one predicts comes from the
        settings recorded in the plans (the model folder's plans.json at prediction time)."""
        recorded = recorded_method_settings(configuration_manager.configuration, SETTINGS_KEY)
        if recorded is None:
            raise RuntimeError(f"These plans carry no EMA-teacher settings (plans['configurations'][<configuration>]"
                               f"['semi_supervised']['{SETTINGS_KEY}']). Mean-teacher trainers write them into the "
                               f"model folder's plans.json when training starts; predict from a folder trained with "
                               f"one.")
        student = nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                           num_output_channels, enable_deep_supervision)
        return EMATeacherNetwork(student, predict=recorded["predict"])

    @property
    def ema_network(self) -> EMATeacherNetwork:
        return unwrap(self.network)

    def set_deep_supervision_enabled(self, enabled: bool):
        self.ema_network.set_deep_supervision(enabled)

    def after_optimizer_step(self) -> None:
        self.ema_network.update_teacher(self.ema_decay)

    # ------------------------------------------------------------------------------------------------ losses
    @property
    def use_sigmoid(self) -> bool:
        return self.label_manager.has_regions

    def teacher_input(self, data: torch.Tensor) -> torch.Tensor:
        if self.teacher_noise_std <= 0:
            return data
        noise = torch.clamp(torch.randn_like(data) * self.teacher_noise_std, -self.teacher_noise_clip,
                            self.teacher_noise_clip)
        return data + noise

    def teacher_probabilities(self, data: torch.Tensor) -> torch.Tensor:
        """The teacher's full-resolution probabilities (no autograd: a fixed target)."""
        return probabilities(full_resolution(self.ema_network.teacher_forward(data)), self.use_sigmoid).detach()

    def consistency(self, student_output, target: torch.Tensor) -> torch.Tensor:
        loss = consistency_mse(full_resolution(student_output), target, self.use_sigmoid)
        if isinstance(student_output, (list, tuple)):  # the lower deep-supervision heads, for DDP
            loss = loss + self.ddp_anchor(list(student_output[1:]))
        return loss

    def unlabeled_losses(self, data: torch.Tensor):
        target = self.teacher_probabilities(self.teacher_input(data))
        return {"loss_consistency": self.consistency(self.network(data), target)}

    # ------------------------------------------------------------------------------------------------ validation
    def validation_outputs(self, data, target):
        output = self.network(data)  # eval mode: the predicting sub-model
        outputs = {"": output}
        if self.validate_other_model:
            other = "teacher" if self.ema_network.predict == "student" else "student"
            outputs["_" + other] = getattr(self.ema_network, other)(data)
        return self.loss(output, target), outputs
