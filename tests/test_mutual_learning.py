"""MCML loss: value, stop-gradient on the pseudo-labels, ramp-up."""
import math

import torch

from nnunetv2_smms.trainers.mutual_learning import MutualLearningLoss
from nnunetv2_smms.trainers.semi_supervised import rampup_weight


def test_loss_is_squared_difference_of_probabilities():
    a, b = torch.randn(2, 3, 4, 4, 4), torch.randn(2, 3, 4, 4, 4)
    expected = 2 * torch.mean((torch.softmax(a, 1) - torch.softmax(b, 1)) ** 2)
    torch.testing.assert_close(MutualLearningLoss()(a, b), expected)
    assert MutualLearningLoss()(a, a).item() == 0
    sig = MutualLearningLoss(use_sigmoid=True)(a, b)
    torch.testing.assert_close(sig, 2 * torch.mean((torch.sigmoid(a) - torch.sigmoid(b)) ** 2))


def test_no_gradient_flows_into_the_pseudo_label():
    """d L / d logits_a must equal the gradient of ||p_a - const||^2 alone: the term in which p_a is the
    pseudo-label for branch b contributes nothing to branch a (and vice versa)."""
    torch.manual_seed(0)
    a = torch.randn(2, 3, 5, 5, 5, requires_grad=True)
    b = torch.randn(2, 3, 5, 5, 5, requires_grad=True)
    MutualLearningLoss()(a, b).backward()

    a_ref = a.detach().clone().requires_grad_(True)
    b_ref = b.detach().clone().requires_grad_(True)
    torch.mean((torch.softmax(a_ref, 1) - torch.softmax(b_ref, 1).detach()) ** 2).backward()
    torch.testing.assert_close(a.grad, a_ref.grad)
    assert b_ref.grad is None  # b was only a pseudo-label in that term

    # and without stop-gradient the gradient would differ (so the check above can fail)
    a_full = a.detach().clone().requires_grad_(True)
    (2 * torch.mean((torch.softmax(a_full, 1) - torch.softmax(b.detach(), 1)) ** 2)).backward()
    assert not torch.allclose(a_full.grad, a.grad)


def test_rampup_over_a_fraction_of_training():
    assert rampup_weight(1.0, 0.0, 0.0) == 1.0
    assert math.isclose(rampup_weight(2.0, 0.0, 0.1), 2.0 * math.exp(-5))
    assert math.isclose(rampup_weight(1.0, 0.05, 0.1), math.exp(-5 * 0.25))
    assert rampup_weight(1.0, 0.05, 0.1) < rampup_weight(1.0, 0.09, 0.1) < 1.0
    assert rampup_weight(1.0, 0.5, 0.1) == 1.0
