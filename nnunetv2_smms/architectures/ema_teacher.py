"""A student network and its exponential-moving-average (EMA) teacher in one module (Mean Teacher, ICT).

Both live in ONE module so that nnU-Net's checkpoint (``network_weights``) carries the teacher and the predictor,
which loads ``network_weights`` into what ``build_network_architecture`` returns, gets it back.

- ``student``: the network the optimizer trains (nnU-Net's planned U-Net);
- ``teacher``: a copy of it whose parameters never get a gradient (``requires_grad = False``); it only moves by
  ``update_teacher``: alpha_t = min(1 - 1/(t + 1), decay), teacher <- alpha_t teacher + (1 - alpha_t) student,
  t = the number of updates made before this one (kept in the buffer ``ema_updates``, so it survives a resume):
  the first update copies the student (as SSL4MIS, whose first call gets iter_num = 0,
  train_mean_teacher_3D.py:72-76,162; CuriousAI counts from 1, main.py:189-193). Buffers (BatchNorm statistics,
  should a plan use BN; nnU-Net's InstanceNorm keeps none) are copied from the student, not averaged;
- train mode: ``forward`` is the student's (what the losses train); ``teacher_forward`` runs the teacher without
  autograd;
- eval mode: ``forward`` returns the output of the PREDICTING model only (``predict``: "student" or "teacher"),
  one tensor (a list while deep supervision is on), so nnUNetv2_predict, mirroring TTA and sliding windows
  work unchanged.
Parameter names ("student.*", "teacher.*") do not depend on the deep-supervision flag or on ``predict``.
"""
import copy

import torch
from torch import nn

PREDICTORS = ("student", "teacher")


class EMATeacherNetwork(nn.Module):
    def __init__(self, student: nn.Module, predict: str = "student"):
        super().__init__()
        if predict not in PREDICTORS:
            raise ValueError(f"predict must be one of {PREDICTORS}, not {predict!r}")
        self.student = student
        self.teacher = copy.deepcopy(student)
        self.teacher.requires_grad_(False)
        self.predict = predict
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))

    @property
    def predicting_model(self) -> nn.Module:
        return self.teacher if self.predict == "teacher" else self.student

    def forward(self, x: torch.Tensor):
        return self.student(x) if self.training else self.predicting_model(x)

    def teacher_forward(self, x: torch.Tensor):
        with torch.no_grad():
            return self.teacher(x)

    def set_deep_supervision(self, enabled: bool) -> None:
        for model in (self.student, self.teacher):
            model.decoder.deep_supervision = enabled

    @staticmethod
    def ema_factor(updates_before: int, decay: float) -> float:
        """alpha_t = min(1 - 1/(t + 1), decay)."""
        return min(1.0 - 1.0 / (updates_before + 1), decay)

    @torch.no_grad()
    def update_teacher(self, decay: float) -> float:
        """One EMA step of the teacher towards the student; returns the factor alpha_t used."""
        alpha = self.ema_factor(int(self.ema_updates), decay)
        for t, s in zip(self.teacher.parameters(), self.student.parameters()):
            t.mul_(alpha).add_(s.detach(), alpha=1.0 - alpha)
        for t, s in zip(self.teacher.buffers(), self.student.buffers()):
            t.copy_(s)
        self.ema_updates += 1
        return alpha
