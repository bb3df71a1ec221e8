"""MCML: multi-modal contrastive mutual learning on unlabeled cases (Meng et al. 2025, eqs. 5-6).

    L_unsup = || p_a - sg(p_b) ||^2 + || p_b - sg(p_a) ||^2

p_a, p_b are the two branches' probabilities (softmax; sigmoid for nnU-Net's region-based training) and
sg() stops the gradient: each branch's prediction is a fixed pseudo-label for the other. ||.||^2 is the mean
squared error over batch, classes and voxels. Computed on the highest-resolution output only.
"""
import torch
from torch import nn


class MutualLearningLoss(nn.Module):
    def __init__(self, use_sigmoid: bool = False):
        super().__init__()
        self.use_sigmoid = use_sigmoid

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits) if self.use_sigmoid else torch.softmax(logits, dim=1)

    def forward(self, logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
        p_a, p_b = self.probabilities(logits_a.float()), self.probabilities(logits_b.float())
        return torch.mean((p_a - p_b.detach()) ** 2) + torch.mean((p_b - p_a.detach()) ** 2)

