"""The SMMS network's contract beyond the method's formulas (found by mutation testing, each test fails when the
behaviour is removed): the plans' norm settings and nnU-Net's weight init reach every module, MAE's psi layers and
squeeze are conv -> norm -> ReLU, padding keeps the size for any odd kernel, deep-supervision outputs are fused
per scale, a one-branch prediction runs only that branch's decoder, the DDP / torch.compile wrappers are looked
through, and bad settings or inputs fail with an error that names what is wrong."""
import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from nnunetv2_smms.architectures import SMMSNetworkConfig, build_dual_branch_network, has_branches, set_output_branch
from nnunetv2_smms.architectures.config import (ChannelSplitError, RecordedConfig, branch_channel_names,
                                                resolve_channel_split)
from nnunetv2_smms.architectures.dual_branch import DualBranchUNet, unwrap
from nnunetv2_smms.architectures.enhancement import ModalityAwareEnhancement
from nnunetv2_smms.architectures.fusion import MultiModalFusion, inject_fusion, same_padding
from test_network import PLAIN, REQ_IMPORT, arch_kwargs, build

BRATS4 = {"channel_names": {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"}}


def _build_with(kwargs_change: dict, ds=True, **cfg):
    kw = arch_kwargs(3, 3) | kwargs_change
    config = SMMSNetworkConfig(**({"channels_a": [0], "channels_b": [1]} | cfg))
    return build_dual_branch_network(PLAIN, kw, REQ_IMPORT, 2, 3, config, deep_supervision=ds)


def _joint_modules(net):
    return [*net.mmf, *net.mae_a.values(), *net.mae_b.values()]


# ------------------------------------------------------------------------------------------------ the modules
def test_plans_norm_settings_reach_mmf_and_mae():
    net = _build_with({"norm_op_kwargs": {"eps": 1e-3, "affine": True}}, mae_position="all_skips")
    norms = [m for mod in _joint_modules(net) for m in mod.modules() if isinstance(m, nn.InstanceNorm3d)]
    assert len(norms) == 2 * len(net.mmf) + 2 * 2 * len(net.mae_levels)
    assert all(n.eps == 1e-3 and n.affine for n in norms)


def test_mae_psi_layers_are_conv_norm_relu_and_the_squeeze_is_nonnegative():
    m = ModalityAwareEnhancement(nn.Conv3d, 8, nn.InstanceNorm3d, {"affine": True})
    for psi in (m.psi_own, m.psi_other):
        assert [type(x) for x in psi] == [nn.Conv3d, nn.InstanceNorm3d, nn.ReLU]
        assert (psi(torch.randn(2, 8, 6, 6, 6)) >= 0).all()
    assert (m.squeeze(torch.randn(16, 8)) >= 0).all() and (m.squeeze(torch.randn(16, 8)) == 0).any()


def test_mae_hidden_width_and_mmf_kernel_defaults():
    """fc squeezes C -> max(C / 4, 16) (enhancement.py's docstring); MMF's default kernel is the paper's 3."""
    assert ModalityAwareEnhancement(nn.Conv2d, 32, nn.InstanceNorm2d).squeeze[0].out_features == 16
    assert ModalityAwareEnhancement(nn.Conv2d, 128, nn.InstanceNorm2d).squeeze[0].out_features == 32
    assert MultiModalFusion(nn.Conv2d, 4, nn.InstanceNorm2d).conv1.kernel_size == (3, 3)


def test_same_padding_keeps_the_size_for_any_odd_kernel_and_dilation():
    assert same_padding(5) == 2 and same_padding(3, 2) == 2 and same_padding([1, 5, 5]) == [0, 2, 2]
    m = MultiModalFusion(nn.Conv3d, 4, nn.InstanceNorm3d, kernel_size=[1, 5, 5])
    e = ModalityAwareEnhancement(nn.Conv3d, 4, nn.InstanceNorm3d, kernel_size=[1, 5, 5])
    x = torch.randn(1, 4, 3, 10, 10)
    assert m(x, x).shape == x.shape and e(x, x).shape == x.shape


def test_nnunet_weight_init_everywhere():
    """Both branches come from nnU-Net with its He init (conv biases 0); MMF and MAE get the same init."""
    net = build(3, 3, ds=False)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv3d)]
    assert convs and all(m.bias is None or not m.bias.any() for m in convs)
    joint = [m for mod in _joint_modules(net) for m in mod.modules() if isinstance(m, nn.Conv3d)]
    scaled = torch.cat([(m.weight * math.sqrt(m.weight[0].numel())).flatten() for m in joint])
    he_std = math.sqrt(2 / (1 + 1e-2 ** 2))  # kaiming normal, leaky ReLU slope 1e-2
    assert abs(scaled.std().item() / he_std - 1) < 0.1


def test_integer_kernel_sizes_are_planned_kernels_too():
    net = _build_with({"kernel_sizes": [3, 3, 3]})
    assert net.mmf[0].conv1.kernel_size == (3, 3, 3)


# ------------------------------------------------------------------------------------------------ the outputs
def test_deep_supervision_outputs_are_fused_scale_by_scale():
    torch.manual_seed(0)
    a = [torch.randn(1, 3, 4, 4), torch.randn(1, 3, 2, 2)]
    b = [torch.randn(1, 3, 4, 4), torch.randn(1, 3, 2, 2)]
    fused = DualBranchUNet.fuse(a, b)
    assert len(fused) == 2
    for f, x, y in zip(fused, a, b):
        torch.testing.assert_close(f, (x + y) / 2)
    net = build(3, 3, ds=True, dropout_p=0.0).eval()
    x = torch.randn(1, 2, 16, 16, 16)
    with torch.no_grad():
        out, (out_a, out_b) = net(x), net.forward_branches(x)
    assert isinstance(out, list) and len(out) == len(out_a) == 2  # 3 stages: 2 decoder outputs
    for o, x_, y_ in zip(out, out_a, out_b):
        torch.testing.assert_close(o, (x_ + y_) / 2)


@pytest.mark.parametrize("branch,runs_a,runs_b", [("fused", 1, 1), ("a", 1, 0), ("b", 0, 1)])
def test_one_branch_prediction_runs_only_that_decoder(branch, runs_a, runs_b):
    net = build(3, 3, ds=False).eval()
    calls = {"a": 0, "b": 0}
    net.branch_a.decoder.register_forward_hook(lambda *_: calls.__setitem__("a", calls["a"] + 1))
    net.branch_b.decoder.register_forward_hook(lambda *_: calls.__setitem__("b", calls["b"] + 1))
    set_output_branch(net, branch)
    with torch.no_grad():
        net(torch.randn(1, 2, 16, 16, 16))
    assert calls == {"a": runs_a, "b": runs_b}


def test_set_deep_supervision_switches_both_decoders():
    net = build(3, 3, ds=True).train()
    x = torch.randn(1, 2, 16, 16, 16)
    net.set_deep_supervision(False)
    assert all(torch.is_tensor(o) for o in net(x))
    net.set_deep_supervision(True)
    assert all(isinstance(o, list) for o in net(x))


def test_builders_default_to_deep_supervision():
    from types import SimpleNamespace

    from nnunetv2_smms.architectures import build_from_configuration
    config = SMMSNetworkConfig(channels_a=[0], channels_b=[1])
    net = build_dual_branch_network(PLAIN, arch_kwargs(3, 3), REQ_IMPORT, 2, 3, config)
    manager = SimpleNamespace(configuration={"smms": config.to_dict()}, network_arch_class_name=PLAIN,
                              network_arch_init_kwargs=arch_kwargs(3, 3),
                              network_arch_init_kwargs_req_import=REQ_IMPORT)
    for n in (net, build_from_configuration(manager, 2, 3)):
        assert n.branch_a.decoder.deep_supervision is True and n.branch_b.decoder.deep_supervision is True


# ------------------------------------------------------------------------------------------------ the wrappers
def test_ddp_and_compile_wrappers_are_looked_through():
    net = build(3, 3, ds=False)
    wrapped = torch.compile(nn.DataParallel(net))  # compiles lazily: nothing is compiled here
    assert unwrap(wrapped) is net and unwrap(nn.DataParallel(net)) is net and unwrap(torch.compile(net)) is net
    assert has_branches(wrapped)
    set_output_branch(wrapped, "b")
    assert net.output_branch == "b"
    set_output_branch(torch.compile(net), "a")
    assert net.output_branch == "a"


def test_a_network_needs_both_branch_attributes():
    class OnlySwitch(nn.Module):
        output_branch = "fused"

    class OnlyBranches(nn.Module):
        def forward_branches(self, x):
            return x, x
    assert not has_branches(OnlySwitch()) and not has_branches(OnlyBranches())


# ------------------------------------------------------------------------------------------------ bad input
def test_set_output_branch_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"branch must be one of .*got 'c'"):
        set_output_branch(build(3, 3, ds=False), "c")
    with pytest.raises(TypeError, match="Linear is not a network with one branch per modality"):
        set_output_branch(nn.Linear(2, 2), "a")


def test_branches_must_be_encoder_decoders():
    good = build(3, 3, ds=False)
    config = SMMSNetworkConfig()

    class DecoderOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.decoder = good.branch_b.decoder

    class EncoderOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = good.branch_b.encoder
    with pytest.raises(TypeError, match=r"\.encoder\.stages and \.decoder .*branch a is Identity"):
        DualBranchUNet(nn.Identity(), good.branch_b, config)
    with pytest.raises(TypeError, match="branch b is DecoderOnly"):
        DualBranchUNet(good.branch_a, DecoderOnly(), config)
    with pytest.raises(TypeError, match="branch b is EncoderOnly"):
        DualBranchUNet(good.branch_a, EncoderOnly(), config)


def test_a_missing_modality_channel_is_a_clear_error():
    net = build(3, 3, ds=False).eval()
    with pytest.raises(ValueError, match=r"got 1 input channel\(s\), its branches read channels a=\[0\] and "
                                         r"b=\[1\]: a case probably lacks a modality's file"):
        net(torch.randn(1, 1, 16, 16, 16))


@pytest.mark.parametrize("field,value", [("mmf_mode", "mul"), ("mae_position", "decoder"), ("output_branch", "c")])
def test_config_rejects_unknown_choices_naming_them(field, value):
    with pytest.raises(ValueError, match=rf"{field} must be one of .*got '{value}'"):
        SMMSNetworkConfig(**{field: value})


@pytest.mark.parametrize("p", [1.0, 1.5, -0.1])
def test_config_dropout_must_be_below_one(p):
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
        SMMSNetworkConfig(dropout_p=p)
    SMMSNetworkConfig(dropout_p=0.99)


def test_recorded_settings_from_a_newer_version_are_an_error_naming_the_key():
    d = SMMSNetworkConfig().to_dict() | {"future_knob": 1}
    with pytest.raises(ValueError, match=r"Unknown SMMS settings \['future_knob'\] \(known: .*'mmf_mode'"):
        SMMSNetworkConfig.from_dict(d)

    @dataclass
    class Tiny(RecordedConfig):
        settings_name = "tiny"
        width: int = 1
    assert Tiny.from_dict(Tiny(width=3).to_dict()) == Tiny(width=3) and Tiny(width=3).to_dict() == {"width": 3}
    with pytest.raises(ValueError, match=r"Unknown tiny settings \['depth'\]"):
        Tiny.from_dict({"width": 2, "depth": 1})


def test_inject_fusion_rejects_an_unknown_mode():
    x = torch.ones(1)
    with pytest.raises(ValueError, match="unknown MMF mode 'mul'"):
        inject_fusion(x, x, "mul")


def test_channel_split_errors_say_where_the_bad_split_came_from():
    with pytest.raises(ChannelSplitError, match=r"^dataset\.json has no 'channel_names'; SMMS needs a multi-modal"):
        resolve_channel_split({})
    with pytest.raises(ChannelSplitError, match=r"nnUNet_smms_channel_split='0\|T9': unknown channel 'T9'"):
        resolve_channel_split(BRATS4, "0|T9")
    bad_b = BRATS4 | {"smms": {"branch_a": ["T1ce"], "branch_b": ["T9"]}}
    with pytest.raises(ChannelSplitError, match=r"dataset\.json 'smms' branch_b: unknown channel 'T9'"):
        resolve_channel_split(bad_b)


def test_branch_names_without_channel_names_are_the_indices():
    assert branch_channel_names({}, [0, 2]) == "0+2"
