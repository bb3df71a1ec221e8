"""What defines CMC, each pinned by a test that fails when the behaviour is removed: the CSC term is NT-Xent over
per-voxel bottleneck feature vectors (hand computation), the CAC term is 1 - squared soft Dice of the two outputs'
probabilities (hand computation), neither is detached (both modalities get gradients), the schedules follow the
source, the encoder (and decoder) is ONE module applied to each modality, the bottleneck fusion and channel
attention follow their formulas, both unlabeled terms move the weights (weight 0 vs default), nothing unlabeled is
used before ssl_start, validation scores the fused output and each output, and the eval network returns one tensor
and loads the training checkpoint."""
import math

import numpy as np
import pytest
import torch

from _step_helpers import step_update, started_trainer, fixed_step_inputs
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

from nnunetv2_smms.architectures import unwrap
from nnunetv2_smms.architectures.cmc_network import (BottleneckFusion, ChannelAttention, CMCNetwork,
                                                     CMCNetworkConfig, build_cmc_network)
from nnunetv2_smms.trainers.cmc import (agreement_loss, cac_schedule, contrastive_loss, csc_schedule, feature_rows,
                                        nt_xent)
from test_network import PLAIN, REQ_IMPORT, arch_kwargs


def build(dim=3, n_stages=3, n_out=3, ds=False, **cfg) -> CMCNetwork:
    return build_cmc_network(PLAIN, arch_kwargs(dim, n_stages), REQ_IMPORT, 2, n_out, CMCNetworkConfig(**cfg),
                             deep_supervision=ds)


# ------------------------------------------------------------------------------------------------ the terms
def _hand_nt_xent(z_a, z_b, t):
    rows = [r / r.norm() for r in list(z_a) + list(z_b)]
    n = len(z_a)
    total = 0.0
    for i, r in enumerate(rows):
        pos = (i + n) % (2 * n)
        num = math.exp(float(r @ rows[pos]) / t)
        den = sum(math.exp(float(r @ rows[k]) / t) for k in range(2 * n) if k != i)
        total += -math.log(num / den)
    return total / (2 * n)


def test_nt_xent_matches_a_hand_computation():
    z_a = torch.tensor([[1.0, 0.0], [0.5, 2.0]])
    z_b = torch.tensor([[0.8, 0.3], [-1.0, 1.0]])
    for t in (0.5, 0.1):
        assert nt_xent(z_a, z_b, t).item() == pytest.approx(_hand_nt_xent(z_a, z_b, t), rel=1e-5)
    # aligned pairs score lower than crossed ones
    assert nt_xent(z_a, z_a, 0.5) < nt_xent(z_a, z_a.flip(0), 0.5)


def test_csc_rows_are_per_voxel_feature_vectors_and_cases_are_averaged():
    torch.manual_seed(0)
    f_a, f_b = torch.randn(2, 3, 2, 2, 1), torch.randn(2, 3, 2, 2, 1)
    rows = feature_rows(f_a[0])
    assert rows.shape == (4, 3)
    for v, (x, y, z) in enumerate([(0, 0, 0), (0, 1, 0), (1, 0, 0), (1, 1, 0)]):
        torch.testing.assert_close(rows[v], f_a[0, :, x, y, z])  # row v = voxel v's C features
    expected = sum(_hand_nt_xent(f_a[i].reshape(3, -1).t(), f_b[i].reshape(3, -1).t(), 0.5) for i in range(2)) / 2
    assert contrastive_loss(f_a, f_b, 0.5).item() == pytest.approx(expected, rel=1e-5)
    # the released reshape(-1, C) gives other rows (chunks of the flattened channel maps) and another value
    torch.testing.assert_close(feature_rows(f_a[0], "released"), f_a[0].reshape(-1, 3))
    assert not torch.allclose(contrastive_loss(f_a, f_b, 0.5, "released"), contrastive_loss(f_a, f_b, 0.5))


def test_cac_is_one_minus_the_squared_soft_dice_of_the_probabilities():
    torch.manual_seed(0)
    a, b = torch.randn(2, 2, 3, 1, 1), torch.randn(2, 2, 3, 1, 1)
    p, q = torch.softmax(a, 1), torch.softmax(b, 1)
    eps = 1e-6
    dices = [(2 * float((p[i, c] * q[i, c]).sum()) + eps) / (float((p[i, c] ** 2).sum() + (q[i, c] ** 2).sum()) + eps)
             for i in range(2) for c in range(2)]
    assert agreement_loss(a, b).item() == pytest.approx(1 - sum(dices) / 4, rel=1e-5)
    assert agreement_loss(a, a).item() == pytest.approx(0.0, abs=1e-6)  # minimised when the modalities agree
    fg = [d for k, d in enumerate(dices) if k % 2 == 1]
    assert agreement_loss(a, b, include_background=False).item() == pytest.approx(1 - sum(fg) / 2, rel=1e-5)
    # as released: on the raw logits
    raw = [(2 * float((a[i, c] * b[i, c]).sum()) + eps) / (float((a[i, c] ** 2).sum() + (b[i, c] ** 2).sum()) + eps)
           for i in range(2) for c in range(2)]
    assert agreement_loss(a, b, on_probabilities=False).item() == pytest.approx(1 - sum(raw) / 4, rel=1e-5)
    s, r = torch.sigmoid(a), torch.sigmoid(b)
    sig = [(2 * float((s[i, c] * r[i, c]).sum()) + eps) / (float((s[i, c] ** 2).sum() + (r[i, c] ** 2).sum()) + eps)
           for i in range(2) for c in range(2)]
    assert agreement_loss(a, b, use_sigmoid=True).item() == pytest.approx(1 - sum(sig) / 4, rel=1e-5)


def test_neither_term_is_detached_both_modalities_get_gradients():
    torch.manual_seed(0)
    a = torch.randn(2, 2, 3, 3, 3, requires_grad=True)
    b = torch.randn(2, 2, 3, 3, 3, requires_grad=True)
    agreement_loss(a, b).backward()
    # the gradient w.r.t. a is that of the full formula (b not a constant for a, and a not for b)
    a_ref, b_ref = a.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    p, q = torch.softmax(a_ref, 1), torch.softmax(b_ref, 1)
    ax = (2, 3, 4)
    (1 - ((2 * (p * q).sum(ax) + 1e-6) / ((p * p).sum(ax) + (q * q).sum(ax) + 1e-6)).mean()).backward()
    torch.testing.assert_close(a.grad, a_ref.grad)
    torch.testing.assert_close(b.grad, b_ref.grad)
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0
    f_a = torch.randn(2, 4, 2, 2, 2, requires_grad=True)
    f_b = torch.randn(2, 4, 2, 2, 2, requires_grad=True)
    contrastive_loss(f_a, f_b).backward()
    assert f_a.grad.abs().sum() > 0 and f_b.grad.abs().sum() > 0


def test_schedules_follow_the_source():
    assert csc_schedule(0.7) == pytest.approx(math.exp(-5 * 0.09))   # 0.64 at epoch 350 of 500
    assert cac_schedule(0.7) == pytest.approx(0.5 * (math.cos(0.7 * math.pi) + 1))  # 0.21
    assert csc_schedule(1.0) == 1.0 and cac_schedule(1.0) == pytest.approx(0.0, abs=1e-12)
    assert cac_schedule(0.0) == 1.0 and csc_schedule(0.0) == pytest.approx(math.exp(-5))


# ------------------------------------------------------------------------------------------------ the network
def test_channel_attention_formula_and_identity_at_init():
    torch.manual_seed(0)
    m = ChannelAttention()
    x = torch.randn(2, 3, 2, 2, 2)
    torch.testing.assert_close(m(x), x)  # gamma starts at 0
    with torch.no_grad():
        m.gamma.fill_(0.7)
    flat = x.reshape(2, 3, -1)
    out = torch.empty_like(flat)
    for i in range(2):
        e = flat[i] @ flat[i].t()
        att = torch.softmax(e.max(dim=1, keepdim=True).values - e, dim=1)
        out[i] = att @ flat[i]
    torch.testing.assert_close(m(x), 0.7 * out.view_as(x) + x)


def test_bottleneck_fusion_is_sigmoid_of_two_conv_norm_nonlin_blocks():
    torch.manual_seed(0)
    m = BottleneckFusion(torch.nn.Conv3d, 4, 3, True, torch.nn.InstanceNorm3d, {"affine": True}, torch.nn.LeakyReLU,
                         {"inplace": True})
    h_a, h_b = torch.randn(2, 4, 3, 3, 3), torch.randn(2, 4, 3, 3, 3)
    with torch.no_grad():
        x = torch.cat((h_a, h_b), 1)
        for block in (m.block1, m.block2):
            x = torch.nn.functional.leaky_relu(block.norm(block.conv(x)))
        torch.testing.assert_close(m(h_a, h_b), torch.sigmoid(x))
    assert m.block1.conv.in_channels == 8 and m.block1.conv.kernel_size == (3, 3, 3)


def test_one_encoder_and_decoder_shared_by_both_modalities():
    torch.manual_seed(0)
    net = build().train()
    # all parameters: ONE one-channel U-Net (encoder + decoder) plus attention, fusion and projection
    unet = get_network_from_plans(PLAIN, arch_kwargs(3, 3), REQ_IMPORT, 1, 3, deep_supervision=False)
    extra = [net.attention, net.fusion, net.projections]
    assert sum(p.numel() for p in net.parameters()) == \
        sum(p.numel() for p in unet.parameters()) + sum(p.numel() for m in extra for p in m.parameters())
    assert net.decoder.encoder is net.encoder
    assert net.encoder.stages[0][0].convs[0].conv.in_channels == 1  # one modality's channels
    # the same weights for both: identical modalities give identical bottlenecks and outputs
    x = torch.randn(1, 1, 16, 16, 16).repeat(1, 2, 1, 1, 1)
    out_a, out_b, f_a, f_b = net(x)
    torch.testing.assert_close(f_a, f_b)
    torch.testing.assert_close(out_a, out_b)
    # and each modality's own path trains the shared encoder: f_a (modality a only) and f_b reach its weights
    y = torch.randn(1, 2, 16, 16, 16)
    first = net.encoder.stages[0][0].convs[0].conv.weight
    grads = []
    for k in (2, 3):  # f_a, f_b
        net.zero_grad()
        net(y)[k].square().mean().backward()
        grads.append(first.grad.clone())
    assert grads[0].abs().sum() > 0 and grads[1].abs().sum() > 0 and not torch.allclose(grads[0], grads[1])


def test_forward_fuses_the_bottlenecks_and_decodes_each_modality_with_its_own_skips():
    torch.manual_seed(0)
    net = build().eval()
    with torch.no_grad():
        net.attention.gamma.fill_(0.3)
        x = torch.randn(2, 2, 16, 16, 16)
        out_a, out_b, f_a, f_b = net.forward_features(x)
        skips_a, skips_b = net.encoder(x[:, [0]]), net.encoder(x[:, [1]])
        torch.testing.assert_close(f_a, skips_a[-1])
        torch.testing.assert_close(f_b, skips_b[-1])
        h_a, h_b = net.attention(f_a), net.attention(f_b)
        g = net.fusion(h_a, h_b)
        proj = net.projections[0]
        z_a = proj.conv(torch.nn.functional.leaky_relu(proj.norm(torch.cat((g, h_a), 1))))
        z_b = proj.conv(torch.nn.functional.leaky_relu(proj.norm(torch.cat((g, h_b), 1))))
        torch.testing.assert_close(out_a, net.decoder(skips_a[:-1] + [z_a]))
        torch.testing.assert_close(out_b, net.decoder(skips_b[:-1] + [z_b]))
        # each output depends on the other modality (through the fusion)
        y = x.clone()
        y[:, 1] += 1.0
        assert (net.forward_features(y)[0] - out_a).abs().max() > 1e-5
    assert len(net.projections) == 1 and len(build(separate_projections=True).projections) == 2


@pytest.mark.parametrize("branch", ["fused", "a", "b"])
def test_eval_mode_returns_one_tensor(branch):
    torch.manual_seed(0)
    net = build(output_branch=branch).eval()
    x = torch.randn(2, 2, 16, 16, 16)
    with torch.no_grad():
        out = net(x)
        out_a, out_b = net.forward_branches(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3, 16, 16, 16)
    torch.testing.assert_close(out, {"fused": (out_a + out_b) / 2, "a": out_a, "b": out_b}[branch])


def test_two_dimensional_and_unequal_modalities():
    net = build(dim=2, n_stages=4).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 2, 16, 16)).shape == (1, 3, 16, 16)
    with pytest.raises(ValueError, match="same number"):
        CMCNetworkConfig(channels_a=[0, 1], channels_b=[2])


# ------------------------------------------------------------------------------------------------ the trainer
@pytest.fixture(scope="module")
def cmc_trainer(prepared_dataset, tmp_path_factory):
    with started_trainer(prepared_dataset, tmp_path_factory, "nnUNetTrainerCMC") as t:
        yield t


@pytest.fixture(scope="module")
def fixed_step(cmc_trainer):
    return fixed_step_inputs(cmc_trainer)


def test_trainer_defaults_and_recorded_settings(cmc_trainer):
    t = cmc_trainer
    assert (t.ssl_start, t.csc_temperature, t.sup_scale, t.unsup_rampup) == (0.7, 0.5, 0.5, 0.0)
    recorded = t.plans_manager.plans["configurations"]["3d_fullres"]["semi_supervised"]["cmc"]
    assert recorded["network"]["channels_a"] == [0] and recorded["network"]["channels_b"] == [1]
    assert recorded["losses"]["csc_rows"] == "voxels" and recorded["losses"]["ssl_start"] == 0.7
    assert isinstance(unwrap(t.network), CMCNetwork)


def test_unsupervised_terms_change_the_update_and_wait_for_ssl_start(cmc_trainer, fixed_step):
    t = cmc_trainer
    try:
        out_early, u_early = step_update(t, *fixed_step)  # iteration 0 < 0.7 of training: the supervised step
        out0, u0 = step_update(t, *fixed_step, ssl_start=0.0, unsup_weight=0.0)
        out1, u1 = step_update(t, *fixed_step, ssl_start=0.0, unsup_weight=1.0)
    finally:
        t.ssl_start, t.unsup_weight = 0.7, 1.0
    assert "loss_csc" not in out_early and "loss_cac" not in out_early and out_early["skipped"] == 0
    assert out1["loss_csc"] > 0 and out1["loss_cac"] > 0 and out1["skipped"] == 0
    assert (u1 - u0).norm() > 1e-3 * u0.norm(), "CSC + CAC at weight 1 did not change the update"
    torch.testing.assert_close(u0, u_early, rtol=1e-4, atol=1e-9)  # weight 0 = the supervised step
    # the logged terms carry their schedule weights (t = 0: CSC x exp(-5), CAC x 1) and sum to the loss
    assert out1["loss"] == pytest.approx(out1["loss_sup_a"] + out1["loss_sup_b"] + out1["loss_csc"]
                                         + out1["loss_cac"], rel=1e-5)
    t._iteration = int(0.7 * t.num_epochs * t.num_iterations_per_epoch)
    assert t.next_unlabeled_batch() is not None and t._ssl_progress == pytest.approx(0.7, abs=1e-3)


def test_each_term_reaches_the_shared_encoder_and_the_decoder(cmc_trainer, fixed_step):
    t = cmc_trainer
    net = unwrap(t.network)
    groups = {"encoder": list(net.encoder.parameters()), "fusion": list(net.fusion.parameters()),
              "decoder": [p for n, p in net.decoder.named_parameters() if not n.startswith("encoder.")]}
    t._ssl_progress = 0.8  # both schedules > 0
    try:
        terms = t.unlabeled_losses(fixed_step[1]["data"])
        for name, term in terms.items():
            for group, params in groups.items():
                grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
                reached = sum(float(g.abs().sum()) for g in grads if g is not None)
                # CSC reads the encoder's bottleneck only; CAC reads the outputs (encoder, fusion, decoder)
                if name == "loss_csc" and group != "encoder":
                    assert reached == 0, (name, group)
                else:
                    assert reached > 0, (name, group)
        assert terms["loss_csc"].item() > 0 and terms["loss_cac"].item() > 0
    finally:
        t._ssl_progress = 0.0


def test_validation_scores_the_fused_output_and_each_output(cmc_trainer):
    t = cmc_trainer
    t.network.eval()
    batch = next(t.dataloader_val)
    try:
        with torch.no_grad():
            result = t.validation_step(batch)
            out_a, out_b = unwrap(t.network).forward_branches(batch["data"])
    finally:
        t.network.train()
    target = batch["target"][0] if isinstance(batch["target"], list) else batch["target"]
    for suffix, out in (("_a", out_a[0]), ("_b", out_b[0]), ("", (out_a[0] + out_b[0]) / 2)):
        for name, value in zip(("tp", "fp", "fn"), t._hard_tp_fp_fn(out, target)):
            np.testing.assert_array_equal(result[f"{name}_hard{suffix}"], value)


def test_checkpoint_loads_into_the_predictor_network(cmc_trainer, monkeypatch):
    t = cmc_trainer
    n_out = t.label_manager.num_segmentation_heads
    net = type(t).build_network_architecture(t.plans_manager, t.configuration_manager, 2, n_out, False)
    net.load_state_dict(unwrap(t.network).state_dict())  # strict
    net.eval()
    x = torch.randn(1, 2, *t.configuration_manager.patch_size)
    with torch.no_grad():
        out = net(x)
        out_a, out_b = unwrap(t.network).eval().forward_branches(x)
    t.network.train()
    assert isinstance(out, torch.Tensor) and out.shape == (1, n_out, *t.configuration_manager.patch_size)
    torch.testing.assert_close(out, (out_a[0] + out_b[0]) / 2)
    # the per-output prediction switch reaches the predictor's build, not the training network
    monkeypatch.setenv("nnUNet_smms_output_branch", "b")
    assert type(t).build_network_architecture(t.plans_manager, t.configuration_manager, 2, n_out,
                                              False).output_branch == "b"
    assert unwrap(t.network).output_branch == "fused"
