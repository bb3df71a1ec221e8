"""3D UX-Net encoder (Lee et al., ICLR 2023) and the UNETR-style convolutional decoder DK-UXNet puts on it.

Re-implemented from the description (notes ``ssl-methods-facts.md`` B2, ``uxnet_encoder.py:47-108`` and
``network_backbone.py:197-373`` of ``Rows21/DK-UXNet``); 2D or 3D (``dim``), any number of input channels.

Encoder (:class:`UXNetEncoder`), four stages, total stride 16:
- stem: convolution k7 stride 2 (padding 3) + channel layer norm; between stages: channel layer norm + convolution
  k2 stride 2;
- stage s: ``depths[s]`` :class:`UXBlock` of ``dims[s]`` channels: depthwise convolution k7 -> layer norm over the
  channels -> 1x1 convolution dims -> 4 dims with groups = dims (the UX-Net "depthwise convolution scaling" in place
  of ConvNeXt's MLP) -> GELU -> 1x1 convolution 4 dims -> dims (groups = dims) -> layer scale gamma (init 1e-6) ->
  drop path -> + input. (The source's GRN exists but is switched off; it is left out here.)
- every stage output that is used gets its own channel layer norm (``out_indices``).

Decoder (:class:`UNETRDecoder`), levels l = 0..3 at stride 2^l (level 0: the input resolution):
- skip block of level l (the source's ``encoder{l+1}``): a residual block (conv k3 - norm - LeakyReLU - conv k3 -
  norm, + 1x1 conv + norm on the skip when the channels change, LeakyReLU; dynamic_network_architectures'
  ``BasicBlockD``) from the input image (l = 0) or stage output l-1 (l >= 1) to ``dims[l]`` channels;
- bottleneck block (``encoder5``): residual block on stage output 3 (stride 16) to ``hidden_size`` channels;
- up block to level l (``decoder{l+2}``): transposed convolution k2 stride 2 to ``dims[l]`` channels, concatenated
  with the skip block of level l, residual block 2 dims[l] -> dims[l].
It returns the features of levels 3 (stride 8, dims[3]), 2, 1, 0 down to ``lowest_level``: with ``lowest_level`` >
0 the full-resolution blocks (and with 2 the stride-2 ones) are not built at all (DK-UXNet's mask logits at a
lower resolution need none of them, and an unused block would leave parameters without gradient under DDP).
Norm: instance norm (affine, eps 1e-5) and LeakyReLU 1e-2, nnU-Net's (the source: MONAI's "instance" norm, which
has no affine parameters). Initialisation: PyTorch's defaults, as the source (its ConvNeXt init is commented out).
"""
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from dynamic_network_architectures.building_blocks.residual import BasicBlockD
from timm.layers import DropPath
from torch import nn

CONV = {2: nn.Conv2d, 3: nn.Conv3d}
CONV_TRANSPOSE = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
INSTANCE_NORM = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}
NUM_STAGES = 4  # UX-Net: four stages, stride 2 each (stem included): inputs must be multiples of 16


class ChannelLayerNorm(nn.Module):
    """Layer norm over the channel axis of a channels-first tensor (B, C, *spatial)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.movedim(1, -1)).movedim(-1, 1)


class UXBlock(nn.Module):
    """Depthwise large-kernel convolution, channel layer norm, depthwise-scaled pointwise expansion x4, GELU,
    pointwise projection, layer scale, drop path, residual."""

    def __init__(self, channels: int, dim: int = 3, kernel_size: int = 7, layer_scale: float = 1e-6,
                 drop_path: float = 0.0, expansion: int = 4):
        super().__init__()
        conv = CONV[dim]
        self.dwconv = conv(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)
        self.norm = ChannelLayerNorm(channels)
        self.pwconv1 = conv(channels, expansion * channels, 1, groups=channels)
        self.act = nn.GELU()
        self.pwconv2 = conv(expansion * channels, channels, 1, groups=channels)
        self.gamma = nn.Parameter(torch.full((channels,), float(layer_scale))) if layer_scale > 0 else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pwconv2(self.act(self.pwconv1(self.norm(self.dwconv(x)))))
        if self.gamma is not None:
            y = y * self.gamma.view(1, -1, *([1] * (x.ndim - 2)))
        return x + self.drop_path(y)


class UXNetEncoder(nn.Module):
    """Stem + 3 downsamplings, 4 stages of UXBlocks; returns the normalised outputs of the stages in
    ``out_indices`` (stride 2, 4, 8, 16 for stages 0..3), None for the others."""

    def __init__(self, in_channels: int, dims: Sequence[int] = (48, 96, 192, 384), depths: Sequence[int] = (2, 2, 2, 2),
                 dim: int = 3, kernel_size: int = 7, layer_scale: float = 1e-6, drop_path_rate: float = 0.0,
                 out_indices: Sequence[int] = (0, 1, 2, 3)):
        super().__init__()
        if len(dims) != NUM_STAGES or len(depths) != NUM_STAGES:
            raise ValueError(f"UX-Net has {NUM_STAGES} stages: dims and depths need {NUM_STAGES} entries each, got "
                             f"dims={list(dims)}, depths={list(depths)}")
        conv = CONV[dim]
        self.downsample = nn.ModuleList([nn.Sequential(conv(in_channels, dims[0], 7, stride=2, padding=3),
                                                       ChannelLayerNorm(dims[0]))])
        for s in range(1, NUM_STAGES):
            self.downsample.append(nn.Sequential(ChannelLayerNorm(dims[s - 1]),
                                                 conv(dims[s - 1], dims[s], 2, stride=2)))
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.stages = nn.ModuleList()
        for s in range(NUM_STAGES):
            first = sum(depths[:s])
            self.stages.append(nn.Sequential(*[UXBlock(dims[s], dim, kernel_size, layer_scale, rates[first + j])
                                               for j in range(depths[s])]))
        self.out_indices = tuple(sorted(set(int(i) for i in out_indices)))
        self.out_norms = nn.ModuleDict({str(i): ChannelLayerNorm(dims[i]) for i in self.out_indices})

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        outs = []
        for s in range(NUM_STAGES):
            x = self.stages[s](self.downsample[s](x))
            outs.append(self.out_norms[str(s)](x) if s in self.out_indices else None)
        return outs


def residual_block(dim: int, in_channels: int, out_channels: int) -> BasicBlockD:
    """UNETR's residual block (MONAI ``UnetResBlock``): dynamic_network_architectures' BasicBlockD, k3, instance
    norm, LeakyReLU 1e-2."""
    return BasicBlockD(CONV[dim], in_channels, out_channels, 3, 1, conv_bias=False, norm_op=INSTANCE_NORM[dim],
                       norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
                       nonlin_kwargs={"negative_slope": 1e-2, "inplace": True})


class UpBlock(nn.Module):
    """UNETR's up block: transposed convolution k2 stride 2, concatenation with the skip, residual block."""

    def __init__(self, dim: int, in_channels: int, out_channels: int):
        super().__init__()
        self.up = CONV_TRANSPOSE[dim](in_channels, out_channels, 2, stride=2, bias=False)
        self.block = residual_block(dim, 2 * out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.block(torch.cat((self.up(x), skip), 1))


class UNETRDecoder(nn.Module):
    """Skip blocks, bottleneck block and up blocks from stride 16 down to level ``lowest_level`` (stride
    2^lowest_level); ``forward(image, stage_outputs)`` -> {level: features} for levels 3 .. lowest_level."""

    def __init__(self, in_channels: int, dims: Sequence[int], hidden_size: int, dim: int = 3, lowest_level: int = 0):
        super().__init__()
        if lowest_level not in (0, 1, 2, 3):
            raise ValueError(f"lowest_level must be 0..3 (stride 1..8), got {lowest_level}")
        self.lowest_level = lowest_level
        levels = range(lowest_level, NUM_STAGES)
        self.skips = nn.ModuleDict({str(l): residual_block(dim, in_channels if l == 0 else dims[l - 1], dims[l])
                                    for l in levels})
        self.bottleneck = residual_block(dim, dims[NUM_STAGES - 1], hidden_size)
        self.ups = nn.ModuleDict({str(l): UpBlock(dim, hidden_size if l == NUM_STAGES - 1 else dims[l + 1], dims[l])
                                  for l in levels})

    def stage_outputs_needed(self) -> List[int]:
        """The encoder stages whose outputs this decoder reads (the bottleneck: stage 3)."""
        return sorted({l - 1 for l in range(max(self.lowest_level, 1), NUM_STAGES)} | {NUM_STAGES - 1})

    def forward(self, image: torch.Tensor, stage_outputs: List[torch.Tensor]) -> Dict[int, torch.Tensor]:
        x = self.bottleneck(stage_outputs[NUM_STAGES - 1])
        features = {}
        for l in range(NUM_STAGES - 1, self.lowest_level - 1, -1):
            skip = self.skips[str(l)](image if l == 0 else stage_outputs[l - 1])
            x = features[l] = self.ups[str(l)](x, skip)
        return features


def pad_to_multiple(x: torch.Tensor, multiple: int = 16):
    """Zero-pad every spatial axis of ``x`` (B, C, *spatial) to a multiple of ``multiple`` (split evenly, the extra
    voxel at the end); returns (padded, slices that crop the padded resolution back to the input's)."""
    spatial = x.shape[2:]
    pads, slices = [], [slice(None), slice(None)]
    for s in spatial:
        total = (-s) % multiple
        before = total // 2
        pads.append((before, total - before))
        slices.append(slice(before, before + s))
    if any(p != (0, 0) for p in pads):
        x = F.pad(x, [v for p in reversed(pads) for v in p])
    return x, tuple(slices)
