"""What defines the SMMS network, each pinned by a test that fails when the behaviour is removed: MMF joins both
encoders (eq. 2 in the documented order, each injection mode's formula), MAE reads (own, other) from the features
before either is enhanced (eq. 3), dropout acts in training only, and the modules follow the planned kernels."""
import pytest
import torch

from nnunetv2_smms.architectures import SMMSNetworkConfig, build_dual_branch_network
from nnunetv2_smms.architectures.fusion import MultiModalFusion, inject_fusion
from test_network import PLAIN, REQ_IMPORT, arch_kwargs, build


def _branches(net, x):
    with torch.no_grad():
        return net.forward_branches(x)


def _perturbed(x, channel):
    y = x.clone()
    y[:, channel] += torch.randn_like(y[:, channel])
    return y


@pytest.mark.parametrize("mode", ["residual_gate", "gate", "add", "replace"])
def test_mmf_makes_each_branch_depend_on_the_other_modality(mode):
    torch.manual_seed(0)
    net = build(3, 3, ds=False, mae=False, dropout_p=0.0, mmf_mode=mode).eval()
    x = torch.randn(1, 2, 16, 16, 16)
    a0, b0 = _branches(net, x)
    a1, b1 = _branches(net, _perturbed(x, 0))  # only branch a's modality changes
    a2, b2 = _branches(net, _perturbed(x, 1))  # only branch b's modality changes
    assert (b1 - b0).abs().max() > 1e-4, "branch b does not see modality a"
    assert (a2 - a0).abs().max() > 1e-4, "branch a does not see modality b"


def test_without_mmf_and_mae_the_branches_are_independent():
    torch.manual_seed(0)
    net = build(3, 3, ds=False, mmf=False, mae=False, dropout_p=0.0).eval()
    assert len(net.mmf) == 0 and net.mae_levels == []
    x = torch.randn(1, 2, 16, 16, 16)
    a0, b0 = _branches(net, x)
    a1, b1 = _branches(net, _perturbed(x, 0))
    a2, b2 = _branches(net, _perturbed(x, 1))
    torch.testing.assert_close(b1, b0, rtol=0, atol=0)
    torch.testing.assert_close(a2, a0, rtol=0, atol=0)
    assert (a1 - a0).abs().max() > 1e-4 and (b2 - b0).abs().max() > 1e-4


def test_mae_alone_also_joins_the_branches():
    torch.manual_seed(0)
    net = build(3, 3, ds=False, mmf=False, dropout_p=0.0).eval()
    x = torch.randn(1, 2, 16, 16, 16)
    a0, b0 = _branches(net, x)
    a1, b1 = _branches(net, _perturbed(x, 0))
    assert (b1 - b0).abs().max() > 1e-4


def test_mmf_block_is_eq2_conv_prelu_norm_then_sigmoid():
    torch.manual_seed(0)
    m = MultiModalFusion(torch.nn.Conv3d, 4, torch.nn.InstanceNorm3d, {"affine": True}, kernel_size=3)
    with torch.no_grad():  # non-trivial PReLU slopes and norm affine parameters
        for p in (m.act1.weight, m.act2.weight, m.norm1.weight, m.norm2.weight, m.norm1.bias, m.norm2.bias):
            p.copy_(torch.randn_like(p))
    f_a, f_b = torch.randn(2, 4, 6, 6, 6), torch.randn(2, 4, 6, 6, 6)
    with torch.no_grad():
        out = m(f_a, f_b)
        expected = torch.sigmoid(m.norm2(m.act2(m.conv2(m.norm1(m.act1(m.conv1(torch.cat((f_a, f_b), 1))))))))
    torch.testing.assert_close(out, expected)
    assert out.min() >= 0 and out.max() <= 1 and out.shape == f_a.shape
    assert m.conv1.in_channels == 8 and m.conv1.kernel_size == (3, 3, 3) and m.conv2.kernel_size == (3, 3, 3)


def test_injection_modes_formulas():
    f, g = torch.randn(2, 3, 4), torch.rand(2, 3, 4)
    torch.testing.assert_close(inject_fusion(f, g, "residual_gate"), f * (1 + g))
    torch.testing.assert_close(inject_fusion(f, g, "gate"), f * g)
    torch.testing.assert_close(inject_fusion(f, g, "add"), f + g)
    torch.testing.assert_close(inject_fusion(f, g, "replace"), g)
    with pytest.raises(ValueError):
        inject_fusion(f, g, "multiply")


def test_encoder_applies_the_same_fused_map_to_both_encoders():
    """Stage by stage: f_ab = MMF(f_a, f_b) from the two stage outputs, both continue from inject(f, f_ab)."""
    torch.manual_seed(0)
    net = build(3, 3, ds=False, mae=False, dropout_p=0.0, mmf_mode="residual_gate").eval()
    x_a, x_b = net.split_input(torch.randn(1, 2, 16, 16, 16))
    with torch.no_grad():
        skips_a, skips_b = net.encode(x_a, x_b)
        ea, eb = net.branch_a.encoder, net.branch_b.encoder
        h_a, h_b = x_a, x_b
        for s in range(len(ea.stages)):
            h_a, h_b = ea.stages[s](h_a), eb.stages[s](h_b)
            if s < net.mmf_stages:
                f_ab = net.mmf[s](h_a, h_b)
                h_a, h_b = h_a * (1 + f_ab), h_b * (1 + f_ab)
            torch.testing.assert_close(skips_a[s], h_a)
            torch.testing.assert_close(skips_b[s], h_b)
    assert net.mmf_stages == 2  # at most n_stages - 1: f_ab must have a next stage to enter


def test_mae_takes_own_and_other_from_the_unenhanced_features():
    torch.manual_seed(0)
    net = build(3, 3, ds=False, mmf=False, dropout_p=0.0, mae_position="all_skips").eval()
    skips_a = [torch.randn(1, c, s, s, s) for c, s in zip((4, 8, 16), (16, 8, 4))]
    skips_b = [torch.randn_like(t) for t in skips_a]
    with torch.no_grad():
        out_a, out_b = net.enhance(skips_a, skips_b)
        for level in net.mae_levels:
            ma, mb = net.mae_a[str(level)], net.mae_b[str(level)]
            torch.testing.assert_close(out_a[level], ma(skips_a[level], skips_b[level]))
            torch.testing.assert_close(out_b[level], mb(skips_b[level], skips_a[level]))
            assert not torch.allclose(out_b[level], mb(skips_a[level], skips_b[level]))


def test_mae_is_eq3_softmax_over_modalities_of_the_pooled_sum():
    from nnunetv2_smms.architectures.enhancement import ModalityAwareEnhancement
    torch.manual_seed(0)
    m = ModalityAwareEnhancement(torch.nn.Conv3d, 8, torch.nn.InstanceNorm3d, {"affine": True}).eval()
    own, other = torch.randn(2, 8, 5, 5, 5), torch.randn(2, 8, 5, 5, 5)
    with torch.no_grad():
        u1, u2 = m.psi_own(own), m.psi_other(other)
        w = torch.softmax(m.excite(m.squeeze((u1 + u2).mean((2, 3, 4)))).view(2, 2, 8), dim=1)
        expected = w[:, 0, :, None, None, None] * u1 + w[:, 1, :, None, None, None] * u2
        torch.testing.assert_close(m(own, other), expected)
    assert m.psi_other[0].dilation == (2, 2, 2) and m.psi_own[0].dilation == (1, 1, 1)


def test_dropout_acts_in_training_only():
    torch.manual_seed(0)
    net = build(3, 3, ds=False, dropout_p=0.5)
    x = torch.randn(1, 2, 16, 16, 16)
    net.train()
    t1, t2 = _branches(net, x), _branches(net, x)
    assert (t1[0] - t2[0]).abs().max() > 1e-4 and (t1[1] - t2[1]).abs().max() > 1e-4
    net.eval()
    e1, e2 = _branches(net, x), _branches(net, x)
    torch.testing.assert_close(e1, e2, rtol=0, atol=0)
    no_dropout = build(3, 3, ds=False, dropout_p=0.0)
    no_dropout.load_state_dict(net.state_dict())
    torch.testing.assert_close(_branches(no_dropout.eval(), x), e1)


def test_modules_use_the_planned_kernel_of_their_stage():
    """Anisotropic plans ((1, 3, 3) in the first stages): MMF and MAE convolutions follow the stage's kernel."""
    kw = arch_kwargs(3, 4)
    kw["kernel_sizes"] = [[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3]]
    kw["strides"] = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]]
    for mmf_kernel, expected in ((3, [(1, 3, 3), (1, 3, 3), (3, 3, 3)]), (1, [(1, 1, 1)] * 3)):
        cfg = SMMSNetworkConfig(channels_a=[0], channels_b=[1], mae_position="all_skips", mmf_kernel_size=mmf_kernel)
        net = build_dual_branch_network(PLAIN, kw, REQ_IMPORT, 2, 2, cfg, deep_supervision=False).eval()
        assert [m.conv1.kernel_size for m in net.mmf] == expected
        assert [m.conv2.kernel_size for m in net.mmf] == expected
        assert [net.mae_a[str(i)].psi_own[0].kernel_size for i in range(4)] == \
            [(1, 3, 3), (1, 3, 3), (3, 3, 3), (3, 3, 3)]
        assert net.mae_b["0"].psi_other[0].padding == (0, 2, 2)
        with torch.no_grad():
            out = net(torch.randn(1, 2, 4, 16, 16))
        assert out.shape == (1, 2, 4, 16, 16)
