"""What defines ICT and entropy minimisation, each pinned by a test that fails when the behaviour is removed.
ICT: the student sees the mixed unlabeled pair, the target is the teacher's probabilities of the two sources mixed
with the same lambda (detached), pairs never join a patch with itself, at least two unlabeled patches per step.
Entropy minimisation: the normalised entropy and its gradient (nothing detached) against the hand formula, on
labeled + unlabeled in one pass or on the unlabeled batch only. Both: the term moves the weights (weight 0 vs
default), the eval network returns one tensor and nnU-Net's weights load into a freshly built network."""
import math

import numpy as np
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet

from conftest import make_trainer
from _step_helpers import fixed_step_inputs, started_trainer
from test_mean_teacher import grads, lagging_teacher, updates
from nnunetv2_smms.architectures.ema_teacher import EMATeacherNetwork
from nnunetv2_smms.trainers.entropy_min import normalised_entropy
from nnunetv2_smms.trainers.ict import UnlabeledBatchTooSmallError


def _fresh_network_loads_and_returns_one_tensor(t, expected_model=None):
    """The predictor's path: build_network_architecture(..., deep supervision off), load the training weights,
    eval forward; returns (network, input, output)."""
    x = next(t.dataloader_val)["data"][:1]
    n_out = t.label_manager.num_segmentation_heads
    net = type(t).build_network_architecture(t.plans_manager, t.configuration_manager, x.shape[1], n_out,
                                             enable_deep_supervision=False)
    net.load_state_dict(t.network.state_dict())  # strict
    net.eval()
    with torch.no_grad():
        out = net(x)
    assert isinstance(out, torch.Tensor) and out.shape == (1, n_out, *t.configuration_manager.patch_size)
    return net, x, out


# ==================================================================================================== ICT
@pytest.fixture(scope="module")
def ict_trainer(prepared_dataset, tmp_path_factory):
    with started_trainer(prepared_dataset, tmp_path_factory, "nnUNetTrainerICT") as t:
        t.network.train()
        yield t


@pytest.fixture(scope="module")
def ict_step(ict_trainer):
    torch.manual_seed(0)
    weights = lagging_teacher(ict_trainer.network.state_dict())
    weights["ema_updates"].fill_(1000)
    return fixed_step_inputs(ict_trainer, weights)


def test_ict_defaults_are_ssl4mis(ict_trainer):
    t = ict_trainer
    assert (t.mixup_alpha, t.unsup_weight, t.unsup_rampup, t.ema_decay, t.predict_with) == (0.2, 0.1, 1.0, 0.99,
                                                                                           "student")
    assert t.teacher_noise_std == 0.0 and t.pairing == "shift" and t.lambda_per_sample
    assert t.plans_manager.plans["configurations"]["3d_fullres"]["semi_supervised"]["ict"]["pairing"] == "shift"


@pytest.mark.parametrize("pairing,per_sample", [("shift", True), ("permutation", True), ("shift", False)])
def test_ict_mixup_target_is_the_hand_mixed_teacher_probabilities(ict_trainer, ict_step, pairing, per_sample):
    t = ict_trainer
    t.network.load_state_dict(ict_step[2])
    u = ict_step[1]["data"]
    u = torch.cat((u, u.flip(-1)))  # 4 patches
    n = u.shape[0]
    t.pairing, t.lambda_per_sample = pairing, per_sample
    try:
        torch.manual_seed(3)
        mixed, target, partner, lam = t.mixup(u)
    finally:
        t.__dict__.pop("pairing")
        t.__dict__.pop("lambda_per_sample")
    assert sorted(partner.tolist()) == list(range(n))  # every patch is a source once
    if pairing == "shift":
        assert all(int(partner[i]) != i for i in range(n)), "a patch was mixed with itself"
        assert len({(int(partner[i]) - i) % n for i in range(n)}) == 1
    assert bool(((lam >= 0) & (lam <= 1)).all())
    assert (len(set(lam.tolist())) == n) if per_sample else (len(set(lam.tolist())) == 1)
    with torch.no_grad():
        p = torch.softmax(t.network.teacher(u)[0], 1)  # the clean sources (no noise in ICT)
    for i in range(n):
        j, l_i = int(partner[i]), float(lam[i])
        torch.testing.assert_close(mixed[i], (1 - l_i) * u[i] + l_i * u[j])
        torch.testing.assert_close(target[i], (1 - l_i) * p[i] + l_i * p[j])
    assert not target.requires_grad


def test_ict_student_sees_the_mixed_image_and_only_the_student_gets_a_gradient(ict_trainer, ict_step):
    t = ict_trainer
    t.network.load_state_dict(ict_step[2])
    net, u = t.network, ict_step[1]["data"]
    torch.manual_seed(4)
    loss = t.unlabeled_losses(u)["loss_consistency"]
    torch.manual_seed(4)
    mixed, target, _, lam = t.mixup(u)  # the same draws
    assert (lam - lam.round()).abs().max() > 1e-3, "a degenerate lambda: the test would not see the mixing"
    hand = torch.mean((torch.softmax(net.student(mixed)[0], 1) - target) ** 2)
    torch.testing.assert_close(loss, hand)
    with torch.no_grad():
        unmixed = torch.mean((torch.softmax(net.student(u)[0], 1) - target) ** 2)
    assert abs(loss.item() - unmixed.item()) > 1e-7
    net.zero_grad(set_to_none=True)
    loss.backward()
    assert all(p.grad is None for p in net.teacher.parameters())
    got = grads(net.student)
    net.zero_grad(set_to_none=True)
    hand.backward()
    for g, h in zip(got, grads(net.student)):
        torch.testing.assert_close(g, h)
    net.zero_grad(set_to_none=True)


def test_ict_consistency_changes_the_update(ict_trainer, ict_step):
    t = ict_trainer
    n = sum(p.numel() for p in t.network.student.parameters())
    out0, u0 = updates(t, ict_step, unsup_weight=0.0, unsup_rampup=0.0)
    out1, u1 = updates(t, ict_step, unsup_rampup=0.0)
    assert out0["skipped"] == 0 and out1["skipped"] == 0 and out1["loss_consistency"] > 0
    assert (u1 - u0)[:n].norm() > 1e-3 * u0[:n].norm(), "the ICT term at its default weight did not change the update"


def test_ict_network_returns_one_tensor_of_the_recorded_model(ict_trainer, ict_step):
    t = ict_trainer
    t.network.load_state_dict(ict_step[2])
    net, x, out = _fresh_network_loads_and_returns_one_tensor(t)
    assert isinstance(net, EMATeacherNetwork) and net.predict == "student"
    with torch.no_grad():
        torch.testing.assert_close(out, net.student(x))


def test_ict_needs_two_unlabeled_patches_per_step(prepared_dataset, monkeypatch, tmp_path):
    t = make_trainer(prepared_dataset, monkeypatch, tmp_path, trainer="nnUNetTrainerICT", start=False,
                     nnUNet_smms_unlabeled_batch_size=1)
    with pytest.raises(UnlabeledBatchTooSmallError, match="nnUNet_smms_unlabeled_batch_size=2"):
        t.on_train_start()
    assert not t.was_initialized  # stopped before anything was built or started


# ==================================================================================================== EM
def hand_entropy(logits):
    p = torch.softmax(logits, 1)
    return torch.mean(-(p * torch.log(p)).sum(1) / math.log(logits.shape[1]))


def hand_binary_entropy(logits):
    p = torch.sigmoid(logits)
    return torch.mean(-(p * torch.log(p) + (1 - p) * torch.log(1 - p)) / math.log(2))


@pytest.mark.parametrize("use_sigmoid", [False, True])
def test_normalised_entropy_and_its_gradient_match_the_hand_formula(use_sigmoid):
    torch.manual_seed(0)
    logits = (2 * torch.randn(2, 3, 5, 5, 5)).requires_grad_()
    loss = normalised_entropy(logits, use_sigmoid)
    (g,) = torch.autograd.grad(loss, logits)
    hand = (hand_binary_entropy if use_sigmoid else hand_entropy)(logits)
    (g_hand,) = torch.autograd.grad(hand, logits)
    torch.testing.assert_close(loss, hand)
    torch.testing.assert_close(g, g_hand)
    assert g.abs().max() > 1e-4
    # normalised: a uniform prediction has entropy 1, a confident one nearly 0
    assert normalised_entropy(torch.zeros(1, 3, 2, 2), use_sigmoid).item() == pytest.approx(1.0)
    confident = torch.tensor([30.0, -30.0, -30.0]).view(1, 3, 1, 1)
    assert normalised_entropy(confident, use_sigmoid).item() < 1e-6


@pytest.fixture(scope="module")
def em_trainer(prepared_dataset, tmp_path_factory):
    with started_trainer(prepared_dataset, tmp_path_factory, "nnUNetTrainerEntropyMin") as t:
        t.network.train()
        yield t


@pytest.fixture(scope="module")
def em_step(em_trainer):
    return fixed_step_inputs(em_trainer)


def test_entropy_on_all_is_one_pass_over_labeled_and_unlabeled_cases(em_trainer, em_step):
    t = em_trainer
    assert (t.unsup_weight, t.unsup_rampup, t.entropy_on) == (0.1, 1.0, "all") and not t.separate_unlabeled_pass
    batch, unlabeled = em_step[0], em_step[1]["data"]
    data, target = batch["data"], batch["target"]
    t.network.load_state_dict(em_step[2])
    with torch.no_grad():
        sup, unsup = t.joint_losses(data, target, unlabeled)
        out_l, out_u = t.network(data), t.network(unlabeled)
        torch.testing.assert_close(unsup["loss_entropy"], hand_entropy(torch.cat((out_l[0], out_u[0]))))
        torch.testing.assert_close(sup["loss_sup"], t.loss(out_l, target))
        t.entropy_on = "unlabeled"
        try:
            assert t.separate_unlabeled_pass
            torch.testing.assert_close(t.unlabeled_losses(unlabeled)["loss_entropy"], hand_entropy(out_u[0]))
        finally:
            t.__dict__.pop("entropy_on")


@pytest.mark.parametrize("entropy_on", ["all", "unlabeled"])
def test_entropy_term_changes_the_update(em_trainer, em_step, entropy_on):
    t = em_trainer
    out0, u0 = updates(t, em_step, unsup_weight=0.0, unsup_rampup=0.0, entropy_on=entropy_on)
    out1, u1 = updates(t, em_step, unsup_rampup=0.0, entropy_on=entropy_on)
    assert out0["skipped"] == 0 and out1["skipped"] == 0 and out1["loss_entropy"] > 0
    assert (u1 - u0).norm() > 1e-3 * u0.norm(), "the entropy term at its default weight did not change the update"
    np.testing.assert_allclose(out1["loss"], out1["loss_sup"] + 0.1 * out1["loss_entropy"], rtol=1e-5)
    # at weight 0 the step is the supervised-only step, in one joint pass as in two
    _, u_sup = updates(t, em_step, uses_unlabeled=False)
    torch.testing.assert_close(u0, u_sup, rtol=1e-3, atol=1e-7)


def test_entropy_min_network_is_nnunets_own_and_loads(em_trainer):
    net, _, _ = _fresh_network_loads_and_returns_one_tensor(em_trainer)
    assert type(net) is PlainConvUNet
