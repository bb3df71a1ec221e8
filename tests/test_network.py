"""The dual-branch network built from plans: shapes (2D/3D, plain and residual encoders), eval contract,
branch switch, MAE weights, MMF placement, parameter names, gradients."""
import pytest
import torch
from torch import nn

from nnunetv2_smms.architectures import (SMMSNetworkConfig, build_dual_branch_network, has_branches,
                                         set_output_branch)
from nnunetv2_smms.architectures.enhancement import ModalityAwareEnhancement

PLAIN = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
RESENC = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
REQ_IMPORT = ["conv_op", "norm_op", "dropout_op", "nonlin"]


def arch_kwargs(dim: int, n_stages: int, residual=False) -> dict:
    conv = f"torch.nn.Conv{dim}d"
    kw = {"n_stages": n_stages, "features_per_stage": [4 * 2 ** i for i in range(n_stages)], "conv_op": conv,
          "kernel_sizes": [[3] * dim] * n_stages, "strides": [[1] * dim] + [[2] * dim] * (n_stages - 1),
          "n_conv_per_stage_decoder": [1] * (n_stages - 1), "conv_bias": True,
          "norm_op": f"torch.nn.InstanceNorm{dim}d", "norm_op_kwargs": {"eps": 1e-5, "affine": True},
          "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
          "nonlin_kwargs": {"inplace": True}}
    kw["n_blocks_per_stage" if residual else "n_conv_per_stage"] = [1] * n_stages
    return kw


def build(dim=3, n_stages=4, residual=False, n_in=2, n_out=3, ds=True, **cfg):
    config = SMMSNetworkConfig(**({"channels_a": [0], "channels_b": [1]} | cfg))
    return build_dual_branch_network(RESENC if residual else PLAIN, arch_kwargs(dim, n_stages, residual), REQ_IMPORT,
                                     n_in, n_out, config, deep_supervision=ds)


@pytest.mark.parametrize("dim,n_stages,residual", [(3, 4, False), (2, 5, False), (3, 3, True), (2, 6, True)])
def test_train_mode_returns_both_branches_with_deep_supervision(dim, n_stages, residual):
    torch.manual_seed(0)
    net = build(dim, n_stages, residual).train()
    size = 2 ** n_stages  # bottleneck of 2 voxels per axis
    x = torch.randn(2, 2, *([size] * dim))
    out_a, out_b = net(x)
    assert len(out_a) == len(out_b) == n_stages - 1
    for s, (a, b) in enumerate(zip(out_a, out_b)):
        assert a.shape == b.shape == (2, 3, *([size // 2 ** s] * dim))
    assert net.mmf_stages == min(4, n_stages - 1) and len(net.mmf) == net.mmf_stages
    assert net.mae_levels == [n_stages - 1]


@pytest.mark.parametrize("dim", [2, 3])
def test_eval_returns_one_tensor_equal_to_mean_of_branch_logits(dim):
    torch.manual_seed(0)
    net = build(dim, 3, ds=False).eval()
    x = torch.randn(1, 2, *([16] * dim))
    with torch.no_grad():
        fused = net(x)
        out_a, out_b = net.forward_branches(x)
        set_output_branch(net, "a")
        only_a = net(x)
        set_output_branch(net, "b")
        only_b = net(x)
    assert isinstance(fused, torch.Tensor) and fused.shape == (1, 3, *([16] * dim))
    torch.testing.assert_close(fused, (out_a + out_b) / 2)
    torch.testing.assert_close(only_a, out_a)
    torch.testing.assert_close(only_b, out_b)
    assert not torch.allclose(out_a, out_b)
    assert has_branches(net) and not has_branches(nn.Conv2d(1, 1, 1))
    with pytest.raises(ValueError):
        set_output_branch(net, "c")


def test_parameter_names_do_not_depend_on_deep_supervision():
    with_ds, without_ds = build(ds=True), build(ds=False)
    assert list(with_ds.state_dict()) == list(without_ds.state_dict())
    without_ds.load_state_dict(with_ds.state_dict(), strict=True)


def test_switches_remove_modules_and_channel_split_reaches_each_branch():
    base = build(mmf=False, mae=False, dropout_p=0)
    assert len(base.mmf) == 0 and len(base.mae_a) == 0 and isinstance(base.dropout, nn.Identity)
    full = build()
    assert sum(p.numel() for p in full.parameters()) > sum(p.numel() for p in base.parameters())
    # 4 input channels, branch a gets channels 0+2, branch b channels 1+3
    net = build(n_in=4, channels_a=[0, 2], channels_b=[1, 3], ds=False).eval()
    assert net.branch_a.encoder.stages[0][0].convs[0].conv.in_channels == 2
    x = torch.randn(1, 4, 16, 16, 16)
    with torch.no_grad():
        ref = net(x)
        x2 = x.clone()
        x2[:, 1] = 0  # change a channel of branch b only
        set_output_branch(net, "a")
        a1, a2 = net(x), net(x2)
    assert not torch.allclose(ref, net.fuse(*net.forward_branches(x2)))
    # with MMF, branch a's output depends on branch b's input: that is the point of the fusion
    assert not torch.allclose(a1, a2)
    nofuse = build(n_in=4, channels_a=[0, 2], channels_b=[1, 3], mmf=False, mae=False, ds=False).eval()
    set_output_branch(nofuse, "a")
    with torch.no_grad():
        torch.testing.assert_close(nofuse(x), nofuse(x2))


def test_channel_index_beyond_inputs_is_an_error():
    with pytest.raises(ValueError, match="only 2 input channels"):
        build(n_in=2, channels_a=[0], channels_b=[2])


@pytest.mark.parametrize("mode", ["residual_gate", "gate", "add", "replace"])
def test_mmf_modes_all_train(mode):
    net = build(mmf_mode=mode, mae_position="all_skips").train()
    out_a, out_b = net(torch.randn(2, 2, 16, 16, 16))
    (out_a[0].mean() + out_b[0].mean()).backward()
    assert all(p.grad is not None for n, p in net.named_parameters() if "mmf" in n)


@pytest.mark.parametrize("dim", [2, 3])
def test_light_mmf_uses_pointwise_convolutions_and_keeps_shapes(dim):
    torch.manual_seed(0)
    paper, light = build(dim).train(), build(dim, mmf_kernel_size=1).train()
    conv = nn.Conv2d if dim == 2 else nn.Conv3d
    kernels = {m.kernel_size for n, m in light.named_modules() if n.startswith("mmf.") and isinstance(m, conv)}
    assert kernels == {(1,) * dim}
    assert sum(p.numel() for p in light.parameters()) < sum(p.numel() for p in paper.parameters())
    x = torch.randn(2, 2, *([16] * dim))
    for out_light, out_paper in zip(light(x), paper(x)):
        assert [o.shape for o in out_light] == [o.shape for o in out_paper]
    with pytest.raises(ValueError, match="mmf_kernel_size"):
        SMMSNetworkConfig(mmf_kernel_size=5)
    # a model trained before the option existed has no mmf_kernel_size in its plans: the paper's 3 is used
    assert SMMSNetworkConfig.from_dict({"channels_a": [0], "channels_b": [1]}).mmf_kernel_size == 3


def test_mae_weights_sum_to_one_across_modalities():
    torch.manual_seed(0)
    mae = ModalityAwareEnhancement(nn.Conv3d, 8, nn.InstanceNorm3d, {"affine": True})
    own, other = torch.randn(3, 8, 6, 6, 6), torch.randn(3, 8, 6, 6, 6)
    w, u_own, u_other = mae.weights_and_features(own, other)
    assert w.shape == (3, 2, 8)
    torch.testing.assert_close(w.sum(1), torch.ones(3, 8))
    assert (w > 0).all() and (w < 1).all()
    out = mae(own, other)
    torch.testing.assert_close(out, w[:, 0, :, None, None, None] * u_own + w[:, 1, :, None, None, None] * u_other)


def test_every_parameter_gets_a_gradient_from_the_smms_loss():
    """Under DDP (find_unused_parameters=False) every parameter must receive a gradient each step."""
    from nnunetv2_smms.trainers.mutual_learning import MutualLearningLoss
    net = build().train()
    out_a, out_b = net(torch.randn(4, 2, 16, 16, 16))
    sup = sum(o[:2].mean() for o in out_a + out_b)
    unsup = MutualLearningLoss()(out_a[0][2:], out_b[0][2:])
    (sup + unsup).backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None]
    assert missing == []
