"""The CMC network (Zhou et al., MICCAI 2024, "cross modality collaboration"), built from nnU-Net plans.

ONE planned nnU-Net encoder-decoder (PlainConvUNet, ResidualEncoderUNet; 2D or 3D) whose encoder and decoder are
shared by both modalities (med-air/CMC model/Semi_SM_model_MIA.py:241-259):

    skips_m   = encoder(x_m)                            m = a, b: each modality on its own (same weights)
    f_m       = skips_m[-1]                             the bottleneck: what the contrastive term (CSC) reads
    h_m       = attention(f_m)                          channel attention "MIA", one module for both (optional)
    g         = sigmoid(block2(block1(cat(h_a, h_b))))  bottleneck fusion, block = conv -> norm -> nonlin
    z_m       = conv1x1(nonlin(norm(cat(g, h_m))))      back to the bottleneck width (2C -> C)
    out_m     = decoder(skips_m[:-1] + [z_m])           the shared decoder with the modality's own skips

Outputs:
- train mode: ``(out_a, out_b, f_a, f_b)``; out_m is what an nnU-Net decoder returns (a deep-supervision list or
  one tensor), f_m the raw bottleneck of modality m (before attention and fusion, as the source returns it);
- eval mode: ONE tensor, chosen by ``output_branch``: ``'fused'`` (default) the mean of the two outputs' logits,
  ``'a'`` / ``'b'`` one output (both modalities are always read: the fusion needs both).

Where the source differs from nnU-Net, or is silent, and what we chose:
- the encoder/decoder are the plans' (the source: a 4-stage CLIP-Universal-Model encoder with pretrained
  weights, a 14-class head hard-coded); nnU-Net initialises them (no pretraining);
- fusion and projection blocks use the plans' conv kernel of the bottleneck stage, norm op (instance norm) and
  nonlinearity (leaky ReLU) instead of the source's 3x3x3 conv + batch norm + ReLU and GroupNorm(16) + ReLU.
  As in the source the fusion map is a sigmoid of the nonlinearity's output (so mostly in [0.5, 1));
- attention and projection are ONE module each, applied to both modalities, as in the source (:243-256);
  ``separate_projections=True`` gives each modality its own 1x1 projection instead;
- channel attention computes its C x C energy in float32 (a sum over all bottleneck voxels overflows fp16);
- a modality may have several channels (e.g. T1+T1ce | T2+FLAIR): both sides need the same number, since the
  encoder is shared. The source has one channel per modality.
Parameter names do not depend on the deep-supervision flag.
"""
from dataclasses import dataclass, field
from typing import List

import torch
from dynamic_network_architectures.building_blocks.simple_conv_blocks import ConvDropoutNormReLU
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from torch import nn

from nnunetv2_smms.architectures.config import OUTPUT_BRANCHES, RecordedConfig
from nnunetv2_smms.architectures.dual_branch import DualBranchUNet


@dataclass
class CMCNetworkConfig(RecordedConfig):
    settings_name = "CMC network"
    channels_a: List[int] = field(default_factory=lambda: [0])
    channels_b: List[int] = field(default_factory=lambda: [1])
    attention: bool = True              # the source's MIA channel attention (gamma starts at 0)
    separate_projections: bool = False  # source: one 1x1 projection for both modalities
    output_branch: str = "fused"        # what eval mode returns: fused | a | b

    def __post_init__(self):
        self.channels_a = [int(c) for c in self.channels_a]
        self.channels_b = [int(c) for c in self.channels_b]
        if len(self.channels_a) != len(self.channels_b) or not self.channels_a:
            raise ValueError(f"CMC shares one encoder between the modalities, so both need the same number of "
                             f"input channels; got a={self.channels_a}, b={self.channels_b}")
        if set(self.channels_a) & set(self.channels_b):
            raise ValueError(f"channels {sorted(set(self.channels_a) & set(self.channels_b))} are in both modalities")
        if self.output_branch not in OUTPUT_BRANCHES:
            raise ValueError(f"output_branch must be one of {OUTPUT_BRANCHES}, got {self.output_branch!r}")



class ChannelAttention(nn.Module):
    """DANet channel attention, CMC's MIA (Semi_SM_model_MIA.py:105-135). X: the features flattened to C x N:

        E = X X^T,  A = softmax_row(max_row(E) - E),  out = gamma * (A X) + X

    gamma is one learnable scalar, initialised to 0 (the module starts as the identity)."""

    def __init__(self):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        with torch.autocast(device_type=x.device.type, enabled=False):
            flat = x.reshape(b, c, -1).float()
            energy = torch.bmm(flat, flat.transpose(1, 2))
            attention = torch.softmax(energy.amax(dim=-1, keepdim=True) - energy, dim=-1)
            out = torch.bmm(attention, flat).view(x.shape)
            return (self.gamma * out + x.float()).to(x.dtype)


class BottleneckFusion(nn.Module):
    """g = sigmoid(block2(block1(cat(h_a, h_b)))), block = conv -> norm -> nonlin; 2C -> C -> C (the source's
    FusionLayer, Semi_SM_model_MIA.py:177-194)."""

    def __init__(self, conv_op, channels: int, kernel_size, conv_bias: bool, norm_op, norm_op_kwargs, nonlin,
                 nonlin_kwargs):
        super().__init__()
        common = dict(conv_bias=conv_bias, norm_op=norm_op, norm_op_kwargs=norm_op_kwargs, nonlin=nonlin,
                      nonlin_kwargs=nonlin_kwargs)
        self.block1 = ConvDropoutNormReLU(conv_op, 2 * channels, channels, kernel_size, 1, **common)
        self.block2 = ConvDropoutNormReLU(conv_op, channels, channels, kernel_size, 1, **common)

    def forward(self, h_a: torch.Tensor, h_b: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.block2(self.block1(torch.cat((h_a, h_b), dim=1))))


class FusedProjection(nn.Module):
    """z = conv1x1(nonlin(norm(cat(g, h)))): 2C -> C (the source: GroupNorm(16) -> ReLU -> Conv 1x1, :219-223)."""

    def __init__(self, conv_op, channels: int, norm_op, norm_op_kwargs, nonlin, nonlin_kwargs):
        super().__init__()
        self.norm = norm_op(2 * channels, **(norm_op_kwargs or {}))
        self.nonlin = nonlin(**(nonlin_kwargs or {}))
        self.conv = conv_op(2 * channels, channels, kernel_size=1)

    def forward(self, fused: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        return self.conv(self.nonlin(self.norm(torch.cat((fused, own), dim=1))))


class CMCNetwork(nn.Module):
    def __init__(self, unet: nn.Module, config: CMCNetworkConfig):
        super().__init__()
        if not (hasattr(unet, "encoder") and hasattr(unet.encoder, "stages") and hasattr(unet, "decoder")):
            raise TypeError(f"CMC needs an encoder-decoder architecture with .encoder.stages and .decoder "
                            f"(PlainConvUNet, ResidualEncoderUNet); the plans give {type(unet).__name__}")
        self.encoder, self.decoder = unet.encoder, unet.decoder
        self.channels_a, self.channels_b = list(config.channels_a), list(config.channels_b)
        self.output_branch = config.output_branch

        enc = self.encoder
        channels = enc.output_channels[-1]
        kernel = enc.kernel_sizes[-1]
        kernel = [int(k) for k in kernel] if isinstance(kernel, (list, tuple)) else int(kernel)
        self.attention = ChannelAttention() if config.attention else nn.Identity()
        self.fusion = BottleneckFusion(enc.conv_op, channels, kernel, enc.conv_bias, enc.norm_op, enc.norm_op_kwargs,
                                       enc.nonlin, enc.nonlin_kwargs)

        def projection():
            return FusedProjection(enc.conv_op, channels, enc.norm_op, enc.norm_op_kwargs, enc.nonlin,
                                   enc.nonlin_kwargs)
        # [shared] or [a, b]
        self.projections = nn.ModuleList([projection(), projection()] if config.separate_projections
                                         else [projection()])
        init = InitWeights_He(1e-2)
        for m in (self.fusion, self.projections):
            m.apply(init)

    # ----------------------------------------------------------------------------------------------------------
    def split_input(self, x: torch.Tensor):
        return x[:, self.channels_a], x[:, self.channels_b]

    def encode(self, x: torch.Tensor):
        """(skips_a, skips_b): the shared encoder applied to each modality on its own."""
        x_a, x_b = self.split_input(x)
        return self.encoder(x_a), self.encoder(x_b)

    def fuse_bottlenecks(self, f_a: torch.Tensor, f_b: torch.Tensor):
        h_a, h_b = self.attention(f_a), self.attention(f_b)
        g = self.fusion(h_a, h_b)
        return self.projections[0](g, h_a), self.projections[-1](g, h_b)

    def forward_features(self, x: torch.Tensor, need_a: bool = True, need_b: bool = True):
        """(out_a, out_b, f_a, f_b) in any mode; an output not needed is None (its decoder pass is skipped)."""
        skips_a, skips_b = self.encode(x)
        z_a, z_b = self.fuse_bottlenecks(skips_a[-1], skips_b[-1])
        out_a = self.decoder(list(skips_a[:-1]) + [z_a]) if need_a else None
        out_b = self.decoder(list(skips_b[:-1]) + [z_b]) if need_b else None
        return out_a, out_b, skips_a[-1], skips_b[-1]

    def forward_branches(self, x: torch.Tensor):
        out_a, out_b, _, _ = self.forward_features(x)
        return out_a, out_b

    fuse = staticmethod(DualBranchUNet.fuse)  # the mean of the two outputs' logits, as the SMMS network

    def forward(self, x: torch.Tensor):
        if self.training:
            return self.forward_features(x)
        branch = self.output_branch
        out_a, out_b, _, _ = self.forward_features(x, need_a=branch != "b", need_b=branch != "a")
        if branch == "a":
            return out_a
        if branch == "b":
            return out_b
        return self.fuse(out_a, out_b)

    def set_deep_supervision(self, enabled: bool) -> None:
        self.decoder.deep_supervision = enabled


def build_cmc_network(arch_class_name: str, arch_kwargs: dict, arch_kwargs_req_import, num_input_channels: int,
                      num_output_channels: int, config: CMCNetworkConfig, deep_supervision: bool = True) -> CMCNetwork:
    """The plans' U-Net with as many input channels as one modality has, wrapped into CMCNetwork."""
    used = config.channels_a + config.channels_b
    if max(used) >= num_input_channels:
        raise ValueError(f"CMC channel split a={config.channels_a} b={config.channels_b} needs channel {max(used)}, "
                         f"but the network gets only {num_input_channels} input channels")
    unet = get_network_from_plans(arch_class_name, arch_kwargs, arch_kwargs_req_import, len(config.channels_a),
                                  num_output_channels, allow_init=True, deep_supervision=deep_supervision)
    return CMCNetwork(unet, config)
