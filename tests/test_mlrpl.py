"""What defines MLRPL, each pinned by a test that fails when the behaviour is removed: the entropy mask, the teacher's
class prototypes, cosine similarities and reliability weights and the pair loss (hand computations), the teacher's
side (pseudo-label, weight) carries no gradient, decoder 2 upsamples by interpolation while decoder 1 keeps nnU-Net's
transposed convolutions and both expose their full-resolution pre-logit features, the mutual loss covers the whole
batch by default, the term moves the weights (weight 0 vs default), decoder 1 predicts (one eval tensor; nnU-Net's
checkpoint loads into a freshly built network). In-process trainer on the session's prepared dataset."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from _step_helpers import started_trainer
from nnunetv2_smms.architectures.dual_branch import unwrap
from nnunetv2_smms.architectures.two_decoders import InterpolationUpsampling
from nnunetv2_smms.trainers.mlrpl import (class_prototypes, entropy, prototype_similarity, reliability_weights,
                                          reliable_pseudo_label_loss)
from test_urpc_cps import fixed_step_of, fresh_network_from_checkpoint, updates

B, C, NF, V = 2, 3, 4, 6


def softmax_np(z):
    e = np.exp(z - z.max(0))
    return e / e.sum(0)


def tiny(seed=0):
    g = torch.Generator().manual_seed(seed)
    z_s, z_t = 2 * torch.randn(B, C, V, generator=g), 2 * torch.randn(B, C, V, generator=g)
    f_t = torch.randn(B, NF, V, generator=g)
    return z_s, z_t, f_t


def by_hand(z_s, z_t, f_t, ce_on_probabilities=False):
    """Prototypes, similarities, weights, mask and the pair loss, case by case and voxel by voxel (numpy)."""
    z_s, z_t, f_t = (x.detach().double().numpy() for x in (z_s, z_t, f_t))
    proto, sim, weight, mask = np.zeros((B, C, NF)), np.zeros((B, C, V)), np.zeros((B, V)), np.zeros((B, V))
    loss_sum = 0.0
    for b in range(B):
        p_t = np.stack([softmax_np(z_t[b, :, v]) for v in range(V)], 1)
        p_s = np.stack([softmax_np(z_s[b, :, v]) for v in range(V)], 1)
        y = p_t.argmax(0)
        for c in range(C):
            members = [v for v in range(V) if y[v] == c]
            mean = sum((f_t[b, :, v] for v in members), np.zeros(NF)) / (len(members) + 1e-6)
            norm = np.linalg.norm(mean)
            proto[b, c] = mean / norm if norm > 0 else 0.0
        for v in range(V):
            f = f_t[b, :, v]
            for c in range(C):
                sim[b, c, v] = f @ proto[b, c] / max(np.linalg.norm(f) * np.linalg.norm(proto[b, c]), 1e-8)
            u_s = -sum(p * math.log(p + 1e-6) for p in p_s[:, v])
            u_t = -sum(p * math.log(p + 1e-6) for p in p_t[:, v])
            mask[b, v] = float(u_s > u_t)
            weight[b, v] = (1 - np.mean((sim[b, :, v] - p_t[:, v]) ** 2)) * mask[b, v]
            scores = p_s[:, v] if ce_on_probabilities else z_s[b, :, v]
            ce = -math.log(math.exp(scores[y[v]]) / sum(math.exp(s) for s in scores))
            loss_sum += ce * weight[b, v]
    return proto, sim, weight, mask, loss_sum / (mask.sum() + 1e-6)


def test_prototypes_similarities_and_weights_match_a_hand_computation():
    z_s, z_t, f_t = tiny()
    proto, sim, weight, mask, _ = by_hand(z_s, z_t, f_t)
    spatial = (2, 3)  # the functions take (B, C, ...) maps
    f, p_t = f_t.reshape(B, NF, *spatial), torch.softmax(z_t, 1).reshape(B, C, *spatial)
    prototypes = class_prototypes(f, p_t.argmax(1), C)
    np.testing.assert_allclose(prototypes.numpy(), proto, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(prototype_similarity(f, prototypes).reshape(B, C, V).numpy(), sim, rtol=1e-5, atol=1e-6)
    u_s = entropy(torch.softmax(z_s, 1))
    u_t = entropy(torch.softmax(z_t, 1))
    np.testing.assert_array_equal((u_s > u_t).float().numpy(), mask)
    w = reliability_weights(f, p_t).reshape(B, V) * torch.from_numpy(mask).float()
    np.testing.assert_allclose(w.numpy(), weight, rtol=1e-5, atol=1e-6)
    assert 0 < mask.sum() < mask.size  # the mask both keeps and drops voxels here


def test_a_class_absent_from_a_case_gets_a_zero_prototype():
    f = torch.randn(1, NF, 4)
    pseudo = torch.tensor([[0, 0, 2, 2]])
    prototypes = class_prototypes(f, pseudo, C)
    assert torch.equal(prototypes[0, 1], torch.zeros(NF))
    torch.testing.assert_close(prototypes[0, 0], nn.functional.normalize(f[0, :, :2].mean(1), dim=0))


@pytest.mark.parametrize("ce_on_probabilities", [False, True])
def test_pair_loss_matches_a_hand_computation(ce_on_probabilities):
    z_s, z_t, f_t = tiny(1)
    *_, expected = by_hand(z_s, z_t, f_t, ce_on_probabilities)
    loss = reliable_pseudo_label_loss(z_s.reshape(B, C, 2, 3), z_t.reshape(B, C, 2, 3), f_t.reshape(B, NF, 2, 3),
                                      ce_on_probabilities)
    assert expected > 0 and loss.item() == pytest.approx(expected, rel=1e-5)


def test_the_teachers_side_carries_no_gradient():
    z_s, z_t, f_t = (x.clone().requires_grad_() for x in tiny(2))
    loss = reliable_pseudo_label_loss(z_s, z_t, f_t)
    loss.backward()
    assert z_t.grad is None and f_t.grad is None, "the pseudo-label or the reliability weight carries a gradient"
    # the student's gradient is that of CE against a constant target with constant weights
    _, _, weight, mask, _ = by_hand(z_s, z_t, f_t)
    z = z_s.detach().clone().requires_grad_()
    y = torch.softmax(z_t.detach(), 1).argmax(1)
    ce = nn.functional.cross_entropy(z, y, reduction="none")
    ((ce * torch.from_numpy(weight).float()).sum() / (mask.sum() + 1e-6)).backward()
    torch.testing.assert_close(z_s.grad, z.grad, rtol=1e-5, atol=1e-7)


def test_interpolation_upsampling_is_nearest_then_convolution():
    torch.manual_seed(0)
    up = InterpolationUpsampling(nn.Conv3d, 2, 3, [1, 2, 2], [1, 3, 3], "nearest")
    x = torch.randn(1, 2, 2, 3, 3)
    repeated = x.repeat_interleave(2, 3).repeat_interleave(2, 4)  # stride 1 on the first axis
    torch.testing.assert_close(up(x), up.conv(repeated))
    assert up.conv.kernel_size == (1, 3, 3) and up.conv.padding == (0, 1, 1)


# ---------------------------------------------------------------------------------------------------- trainer
@pytest.fixture(scope="module")
def mlrpl_trainer(prepared_dataset, tmp_path_factory):
    with started_trainer(prepared_dataset, tmp_path_factory, "nnUNetTrainerMLRPL") as t:
        yield t


def test_two_decoders_differ_in_upsampling_and_expose_full_resolution_features(mlrpl_trainer):
    t = mlrpl_trainer
    net = unwrap(t.network)
    assert all(isinstance(u, nn.ConvTranspose3d) for u in net.decoder1.transpconvs)
    assert all(isinstance(u, InterpolationUpsampling) and u.mode == "nearest" for u in net.decoder2.transpconvs)
    assert net.decoder1.encoder is net.encoder and net.decoder2.encoder is net.encoder  # one encoder
    x = torch.randn(2, 2, *t.configuration_manager.patch_size)
    net.eval()
    try:
        with torch.no_grad():  # decode() is nnU-Net's decoder forward, plus the features
            stock = net.decoder1(net.encoder(x))
            mine, features = net.decode(net.decoder1, net.encoder(x))
    finally:
        net.train()
    for a, b in zip(stock, mine):
        torch.testing.assert_close(a, b)
    assert features.shape == (2, net.encoder.output_channels[0], *t.configuration_manager.patch_size)
    torch.manual_seed(0)
    with torch.no_grad():  # train mode: the (dropped-out) features are what the last segmentation layer reads
        out1, out2, f1, f2 = t.network(x)
    torch.testing.assert_close(net.decoder1.seg_layers[-1](f1), out1[0])
    torch.testing.assert_close(net.decoder2.seg_layers[-1](f2), out2[0])
    assert isinstance(net.feature_dropout, nn.Dropout3d) and net.feature_dropout.p == 0.5
    assert isinstance(net.bottleneck_dropout, nn.Dropout3d) and net.bottleneck_dropout.p == 0.5


@pytest.fixture()
def without_dropout(mlrpl_trainer):
    """The same forward in every repetition of a step."""
    net = unwrap(mlrpl_trainer.network)
    saved = net.feature_dropout, net.bottleneck_dropout
    net.feature_dropout = net.bottleneck_dropout = nn.Identity()
    yield mlrpl_trainer
    net.feature_dropout, net.bottleneck_dropout = saved


def test_mutual_loss_covers_the_whole_batch(without_dropout):
    t = without_dropout
    assert (t.sup_weight, t.mutual_on_labeled, t.separate_unlabeled_pass) == (0.5, True, False)
    batch = next(t.dataloader_train)
    data, target, unlabeled = batch["data"], batch["target"], next(t.dataloader_unlabeled)["data"]
    n = data.shape[0]
    with torch.no_grad():
        out1, out2, f1, f2 = t.network(torch.cat((data, unlabeled)))
        whole = reliable_pseudo_label_loss(out1[0], out2[0], f2)
        unl = reliable_pseudo_label_loss(out1[0][n:], out2[0][n:], f2[n:])
        sup_expected = 0.5 * t.loss([o[:n] for o in out1], target)
    for on_labeled, expected in ((True, whole), (False, unl)):
        labeled = data.clone().requires_grad_()
        t.mutual_on_labeled = on_labeled
        try:
            sup, unsup = t.joint_losses(labeled, target, unlabeled)
        finally:
            del t.mutual_on_labeled
        assert unsup["loss_rpl_1"].item() == pytest.approx(expected.item(), rel=1e-5)
        assert sup["loss_sup_1"].item() == pytest.approx(sup_expected.item(), rel=1e-5)  # lambda * DC+CE
        # the term depends on the labeled cases exactly when it covers them (nnU-Net's norms are per case)
        grad = torch.autograd.grad(unsup["loss_rpl_1"] + unsup["loss_rpl_2"], labeled, allow_unused=True)[0]
        reaches_labeled = grad is not None and bool(grad.abs().sum() > 0)
        assert reaches_labeled == on_labeled


def test_mutual_loss_moves_the_weights(without_dropout):
    t = without_dropout
    assert (t.unsup_weight, t.unsup_rampup) == (1.0, 0.4)
    fixed = fixed_step_of(t)
    out0, u0 = updates(t, fixed, unsup_weight=0.0, unsup_rampup=0.0)
    out1_, u1 = updates(t, fixed, unsup_weight=1.0, unsup_rampup=0.0)
    assert out1_["loss_rpl_1"] > 0 and out1_["loss_rpl_2"] > 0
    assert (u1 - u0).norm() > 1e-3 * u0.norm(), "the mutual loss at weight 1 did not change the update"
    np.testing.assert_allclose(out1_["loss"], out1_["loss_sup_1"] + out1_["loss_sup_2"] + out1_["loss_rpl_1"]
                               + out1_["loss_rpl_2"], rtol=1e-5)


def test_decoder_1_predicts_and_the_checkpoint_loads(mlrpl_trainer, tmp_path):
    t = mlrpl_trainer
    patch = tuple(t.configuration_manager.patch_size)
    x = torch.randn(1, 2, *patch)
    fresh = fresh_network_from_checkpoint(t, tmp_path)
    net = unwrap(t.network)
    net.eval()
    try:
        with torch.no_grad():
            out = fresh(x)
            ref1, ref2 = net.forward_both(x)
            result = t.validation_step(next(t.dataloader_val))
    finally:
        net.train()
    assert isinstance(out, torch.Tensor) and out.shape == (1, 2, *patch)
    torch.testing.assert_close(out, ref1[0])
    assert (out - ref2[0]).abs().max() > 1e-3
    assert "tp_hard" in result and "tp_hard_2" in result
    settings = t.plans_manager.plans["configurations"]["3d_fullres"]["semi_supervised"]["mlrpl"]
    assert settings["decoder2_upsampling"] == "nearest" and settings["sup_weight"] == 0.5
