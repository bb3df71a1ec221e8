"""What defines URPC and CPS, each pinned by a test that fails when the behaviour is removed.
URPC: the uncertainty-rectified pyramid loss (hand computation, value and gradient: nothing detached), the pyramid
interpolated to full resolution, the term moves the weights (weight 0 vs default), nnU-Net's network predicts.
CPS: the cross pseudo-supervision (hand computation), pseudo-labels carry no gradient (the other network gets none),
gradient clipping per network, two differently initialised networks, the term moves the weights, the original
variant covers the labeled cases too, network 1 predicts (one eval tensor; nnU-Net's checkpoint loads into a freshly
built network). In-process trainers on the session's prepared dataset."""
import math

import numpy as np
import pytest
import torch

from _step_helpers import step_update, started_trainer
from nnunetv2_smms.architectures.dual_branch import unwrap
from nnunetv2_smms.trainers.cps import cross_pseudo_supervision
from nnunetv2_smms.trainers.urpc import rectified_pyramid_consistency, upsample_logits


def updates(trainer, fixed, **attrs):
    """step_update, then the class attributes again."""
    try:
        return step_update(trainer, *fixed, **attrs)
    finally:
        for k in attrs:
            trainer.__dict__.pop(k, None)


def fixed_step_of(t):
    return (next(t.dataloader_train), next(t.dataloader_unlabeled),
            {k: v.clone() for k, v in t.network.state_dict().items()}, t.optimizer.state_dict())


def fresh_network_from_checkpoint(t, tmp_path):
    """nnU-Net's checkpoint of the trainer, loaded (strictly) as the predictor does: into the trainer class's
    build_network_architecture(..., enable_deep_supervision=False)."""
    t.save_checkpoint(str(tmp_path / "checkpoint.pth"))
    ckpt = torch.load(tmp_path / "checkpoint.pth", map_location="cpu", weights_only=False)
    net = type(t).build_network_architecture(t.plans_manager, t.configuration_manager, t.num_input_channels,
                                             t.label_manager.num_segmentation_heads, False)
    net.load_state_dict(ckpt["network_weights"])
    return net.eval()


# ================================================================================================== URPC
def urpc_by_hand(logits):
    """The URPC loss voxel by voxel (float64, differentiable): logits = K tensors (B, C, V)."""
    p = [torch.softmax(z.double(), 1) for z in logits]
    K, (B, C, V) = len(p), p[0].shape
    total = 0.0
    for k in range(K):
        num = den = dsum = 0.0
        for b in range(B):
            for v in range(V):
                p_bar = [sum(p[j][b, c, v] for j in range(K)) / K for c in range(C)]
                d = sum(p_bar[c] * (torch.log(p_bar[c]) - torch.log(p[k][b, c, v])) for c in range(C))
                e = torch.exp(-d)
                num = num + sum((p_bar[c] - p[k][b, c, v]) ** 2 * e for c in range(C))
                den, dsum = den + e, dsum + d
        total = total + (num / (B * V * C)) / (den / (B * V) + 1e-8) + dsum / (B * V)
    return total / K


def test_urpc_loss_and_its_gradient_match_a_hand_computation():
    torch.manual_seed(0)
    logits = [(2 * torch.randn(2, 3, 4)).requires_grad_() for _ in range(4)]
    loss = rectified_pyramid_consistency([z.reshape(2, 3, 2, 2) for z in logits])
    expected = urpc_by_hand(logits)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss.item() > 0
    # nothing is detached: the gradient reaches every scale through p_bar, D_k and exp(-D_k), as by hand
    grads = torch.autograd.grad(loss, logits)
    expected_grads = torch.autograd.grad(expected, logits)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-7)
    # identical outputs agree perfectly: no loss
    same = torch.randn(1, 2, 3, 3, 3)
    assert rectified_pyramid_consistency([same, same.clone()]).item() == pytest.approx(0.0, abs=1e-7)


def test_urpc_pyramid_is_interpolated_to_full_resolution():
    full = torch.zeros(1, 1, 4, 4, 4)
    half = torch.tensor([0.0, 4.0]).reshape(1, 1, 2, 1, 1).expand(1, 1, 2, 2, 2).contiguous()
    lin = upsample_logits([full, half], "linear")
    near = upsample_logits([full, half], "nearest")
    assert lin[0] is full and lin[1].shape == near[1].shape == full.shape
    # trilinear, align_corners=False along the first axis: source positions -0.25, 0.25, 0.75, 1.25 (clamped)
    torch.testing.assert_close(lin[1][0, 0, :, 1, 2], torch.tensor([0.0, 1.0, 3.0, 4.0]))
    torch.testing.assert_close(near[1][0, 0, :, 1, 2], torch.tensor([0.0, 0.0, 4.0, 4.0]))


@pytest.fixture(scope="module")
def urpc_trainer(prepared_dataset, tmp_path_factory):
    with started_trainer(prepared_dataset, tmp_path_factory, "nnUNetTrainerURPC") as t:
        yield t


def test_urpc_term_on_the_deep_supervision_outputs_moves_the_weights(urpc_trainer):
    t = urpc_trainer
    assert (t.unsup_weight, t.unsup_rampup, t.urpc_scales) == (0.1, 1.0, 4)
    fixed = fixed_step_of(t)
    unlabeled = fixed[1]["data"]
    with torch.no_grad():
        outputs = t.network(unlabeled)
        expected = rectified_pyramid_consistency(upsample_logits(outputs[:4]))
        terms = t.unlabeled_losses(unlabeled)
    assert len(outputs) >= 2 and terms["loss_urpc"].item() == pytest.approx(expected.item(), rel=1e-5)
    out0, u0 = updates(t, fixed, unsup_weight=0.0, unsup_rampup=0.0)
    out1, u1 = updates(t, fixed, unsup_weight=0.1, unsup_rampup=0.0)
    assert out0["skipped"] == 0 and out1["skipped"] == 0 and out1["loss_urpc"] > 0
    assert (u1 - u0).norm() > 1e-3 * u0.norm(), "the URPC term at weight 0.1 did not change the update"


def test_urpc_predicts_with_nnunets_network_and_its_checkpoint_loads(urpc_trainer, tmp_path):
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    t = urpc_trainer
    x = torch.randn(1, 2, *t.configuration_manager.patch_size)
    net = fresh_network_from_checkpoint(t, tmp_path)
    assert type(net) is PlainConvUNet  # nnU-Net's network, unchanged
    t.network.eval()
    try:
        with torch.no_grad():
            out, reference = net(x), t.network(x)[0]
    finally:
        t.network.train()
    assert isinstance(out, torch.Tensor) and out.shape == (1, 2, *t.configuration_manager.patch_size)
    torch.testing.assert_close(out, reference)


# ================================================================================================== CPS
def test_cps_loss_matches_a_hand_computation():
    torch.manual_seed(0)
    z1, z2 = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    terms = cross_pseudo_supervision(z1.reshape(2, 3, 5, 1), z2.reshape(2, 3, 5, 1))

    def ce_by_hand(z, other):
        total = 0.0
        for b in range(2):
            for v in range(5):
                y = int(np.argmax(other[b, :, v].numpy()))
                total += -math.log(math.exp(z[b, y, v]) / sum(math.exp(z[b, c, v]) for c in range(3)))
        return total / 10
    assert terms["loss_cps_1"].item() == pytest.approx(ce_by_hand(z1, z2), rel=1e-5)
    assert terms["loss_cps_2"].item() == pytest.approx(ce_by_hand(z2, z1), rel=1e-5)


@pytest.fixture(scope="module")
def cps_trainer(prepared_dataset, tmp_path_factory):
    with started_trainer(prepared_dataset, tmp_path_factory, "nnUNetTrainerCPS") as t:
        yield t


def test_cps_pseudo_labels_carry_no_gradient(cps_trainer):
    t = cps_trainer
    net = unwrap(t.network)
    x = next(t.dataloader_unlabeled)["data"]
    for own, other, name in ((net.net1, net.net2, "loss_cps_1"), (net.net2, net.net1, "loss_cps_2")):
        t.optimizer.zero_grad(set_to_none=True)
        out1, out2 = t.network(x)
        cross_pseudo_supervision(out1[0], out2[0])[name].backward()
        assert all(p.grad is None or not p.grad.any() for p in other.parameters()), \
            f"{name}: the pseudo-labels passed a gradient to the network that made them"
        assert sum(p.grad is not None and bool(p.grad.any()) for p in own.parameters()) > 0.5 * len(list(own.parameters()))
    t.optimizer.zero_grad(set_to_none=True)


def test_cps_clips_each_network_on_its_own(cps_trainer):
    t = cps_trainer
    net = unwrap(t.network)
    for p in net.net1.parameters():
        p.grad = torch.full_like(p, 10.0)   # far above nnU-Net's norm 12
    for p in net.net2.parameters():
        p.grad = torch.full_like(p, 1e-4)   # far below
    small = [p.grad.clone() for p in net.net2.parameters()]
    t.clip_gradients()
    norm1 = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in net.net1.parameters()]))
    assert norm1.item() == pytest.approx(12.0, rel=1e-4)
    for g, p in zip(small, net.net2.parameters()):  # joint clipping would have scaled these down too
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)
    t.optimizer.zero_grad(set_to_none=True)


def test_cps_networks_are_initialised_differently(cps_trainer):
    net = unwrap(cps_trainer.network)
    assert cps_trainer.second_network_init == "xavier_normal"
    w1 = net.net1.encoder.stages[0][0].convs[0].conv.weight
    w2 = net.net2.encoder.stages[0][0].convs[0].conv.weight
    fan_in, fan_out = w1[0].numel(), w1.shape[0] * w1[0, 0].numel()
    he = math.sqrt(2.0 / (1 + 0.01 ** 2) / fan_in)         # nnU-Net: kaiming_normal_, a = 1e-2
    xavier = math.sqrt(2.0 / (fan_in + fan_out))
    assert w1.std().item() == pytest.approx(he, rel=0.1)
    assert w2.std().item() == pytest.approx(xavier, rel=0.1)


def test_cps_term_moves_the_weights(cps_trainer):
    t = cps_trainer
    assert (t.unsup_weight, t.unsup_rampup, t.cps_on_labeled) == (0.1, 1.0, False)
    fixed = fixed_step_of(t)
    out0, u0 = updates(t, fixed, unsup_weight=0.0, unsup_rampup=0.0)
    out1, u1 = updates(t, fixed, unsup_weight=0.1, unsup_rampup=0.0)
    assert out1["loss_cps_1"] > 0 and out1["loss_cps_2"] > 0
    assert (u1 - u0).norm() > 1e-3 * u0.norm(), "the CPS term at weight 0.1 did not change the update"
    np.testing.assert_allclose(out1["loss"], out1["loss_sup_1"] + out1["loss_sup_2"]
                               + 0.1 * (out1["loss_cps_1"] + out1["loss_cps_2"]), rtol=1e-5)


def test_cps_original_covers_the_labeled_cases_too(cps_trainer):
    """One pass over labeled + unlabeled: CE over the joined batch (original) or its unlabeled part (SSL4MIS)."""
    from nnunetv2_smms.trainers.cps import nnUNetTrainerCPS_Original
    assert (nnUNetTrainerCPS_Original.cps_on_labeled, nnUNetTrainerCPS_Original.separate_unlabeled_pass,
            nnUNetTrainerCPS_Original.unsup_weight, nnUNetTrainerCPS_Original.unsup_rampup) == (True, False, 1.5, 0.0)
    t = cps_trainer
    batch = next(t.dataloader_train)
    data, target = batch["data"], batch["target"]
    unlabeled = next(t.dataloader_unlabeled)["data"]
    n = data.shape[0]
    with torch.no_grad():
        out1_, out2_ = t.network(torch.cat((data, unlabeled)))
        whole = cross_pseudo_supervision(out1_[0], out2_[0])
        only_unlabeled = cross_pseudo_supervision(out1_[0][n:], out2_[0][n:])
    for on_labeled, expected in ((True, whole), (False, only_unlabeled)):
        labeled = data.clone().requires_grad_()
        t.cps_on_labeled = on_labeled
        try:
            _, unsup = t.joint_losses(labeled, target, unlabeled)
        finally:
            del t.cps_on_labeled
        for k in expected:
            assert unsup[k].item() == pytest.approx(expected[k].item(), rel=1e-5)
        # the term depends on the labeled cases exactly when it covers them (nnU-Net's norms are per case)
        grad = torch.autograd.grad(unsup["loss_cps_1"] + unsup["loss_cps_2"], labeled, allow_unused=True)[0]
        reaches_labeled = grad is not None and bool(grad.abs().sum() > 0)
        assert reaches_labeled == on_labeled
    t.optimizer.zero_grad(set_to_none=True)


def test_cps_network_1_predicts_and_the_checkpoint_loads(cps_trainer, tmp_path):
    t = cps_trainer
    patch = tuple(t.configuration_manager.patch_size)
    x = torch.randn(1, 2, *patch)
    fresh = fresh_network_from_checkpoint(t, tmp_path)
    net = unwrap(t.network)
    net.eval()
    try:
        with torch.no_grad():
            out = fresh(x)
            ref1, ref2 = net.net1(x)[0], net.net2(x)[0]
            result = t.validation_step(next(t.dataloader_val))
    finally:
        net.train()
    assert isinstance(out, torch.Tensor) and out.shape == (1, 2, *patch)
    torch.testing.assert_close(out, ref1)
    assert (out - ref2).abs().max() > 1e-3
    assert "tp_hard" in result and "tp_hard_2" in result  # network 1 scored as the output, network 2 beside it
