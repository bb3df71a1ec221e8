"""Two nnU-Net networks of the same plans in one module (cross pseudo supervision, CPS).

Both are what nnU-Net builds from the plans (``get_network_from_plans``: PlainConvUNet, ResidualEncoderUNet, 2D or
3D). They differ only in their initial weights, as CPS needs two differently initialised networks:
- ``net1``: nnU-Net's own initialisation (He / Kaiming normal, negative slope 1e-2);
- ``net2``: ``second_init`` = ``"xavier_normal"`` (default): nnU-Net's initialisation, then every convolution and
  transposed-convolution weight re-drawn Xavier normal (SSL4MIS ``train_cross_pseudo_supervision_3D.py:80-109``:
  Kaiming normal for model 1, Xavier normal for model 2; nnU-Net's other initial values, e.g. the zeroed last norm
  of a residual block, are kept); ``"he"``: nnU-Net's initialisation, another random draw (the original CPS
  initialises both networks alike, from different seeds).

Outputs: train mode ``(out1, out2)`` (each what an nnU-Net decoder returns: a deep-supervision list or one tensor);
eval mode ONE tensor (list with deep supervision on), network 1's, as the original CPS predicts with branch 1
(TorchSemiSeg ``network.py:18-21``), so nnU-Net's predictor, TTA and sliding windows work unchanged. The state dict
holds both networks (``net1.*``, ``net2.*``), so nnU-Net's checkpoint carries both and the predictor loads it into
this module.
"""
from typing import Sequence

from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from torch import nn

SECOND_INITS = ("xavier_normal", "he")

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def xavier_normal_convolutions(module: nn.Module) -> None:
    """Re-draw every (transposed) convolution weight of ``module`` Xavier normal; biases to 0."""
    for m in module.modules():
        if isinstance(m, _CONV_TYPES):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class TwoNetworks(nn.Module):
    def __init__(self, net1: nn.Module, net2: nn.Module):
        super().__init__()
        self.net1, self.net2 = net1, net2

    def forward(self, x):
        if self.training:
            return self.net1(x), self.net2(x)
        return self.net1(x)

    def forward_both(self, x):
        """Both networks' outputs in any mode (validation scores each)."""
        return self.net1(x), self.net2(x)

    def networks(self) -> Sequence[nn.Module]:
        return self.net1, self.net2

    def set_deep_supervision(self, enabled: bool) -> None:
        for net in self.networks():
            net.decoder.deep_supervision = enabled


def build_two_networks(arch_class_name: str, arch_kwargs: dict, arch_kwargs_req_import, num_input_channels: int,
                       num_output_channels: int, deep_supervision: bool = True,
                       second_init: str = "xavier_normal") -> TwoNetworks:
    if second_init not in SECOND_INITS:
        raise ValueError(f"second_init must be one of {SECOND_INITS}, got {second_init!r}")

    def planned():
        return get_network_from_plans(arch_class_name, arch_kwargs, arch_kwargs_req_import, num_input_channels,
                                      num_output_channels, allow_init=True, deep_supervision=deep_supervision)

    net1, net2 = planned(), planned()
    if second_init == "xavier_normal":
        xavier_normal_convolutions(net2)
    return TwoNetworks(net1, net2)
