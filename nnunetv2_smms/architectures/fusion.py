"""MMF: multi-stage multi-modal feature fusion (Meng et al. 2025, eq. 2).

    f_ab = sigmoid(conv2(conv1(cat(f_a, f_b))))

conv1/conv2 are convolutions with the stage's planned kernel (3x3x3 as in the paper; (1, 3, 3) in an anisotropic
stage; stride 1, "same" padding), each followed by PReLU and normalization, in that order.

Cost: at the paper's kernel size MMF adds three 3x3x3 convolutions of the stage's width per stage it fuses (conv1
reads both branches), at the full resolution too; that is about a third more convolution work than the two
encoder-decoders it joins (``python benchmarks/bench_flops.py``). ``kernel_size=1`` (pointwise convolutions, the
same gate otherwise) is the light variant for users who need the speed; it is an option, not the paper's default.

Where the paper is silent, and what we chose:
- Normalization: the paper says batch norm; we use the plans' norm op (instance norm in nnU-Net) like every
  other layer of the network, because batch norm over 2 + 2 3D crops is noisy.
- How f_ab enters the next stage of both encoders ("transmits them to the next stage of each encoder").
  f_ab is a sigmoid map in [0, 1], i.e. an attention gate, so the default is ``residual_gate``:
  f_a' = f_a * (1 + f_ab) (and likewise f_b'): the shared map can only emphasise, each encoder keeps its own
  modality-specific signal, and at initialisation (f_ab ~ 0.5) the features are scaled, not destroyed.
  Alternatives for ablations: ``gate`` (f_a * f_ab), ``add`` (f_a + f_ab) and ``replace`` (both encoders
  continue from f_ab itself, the most literal reading).
- The modulated features are also the skip connections of the decoders, so each decoder sees the shared
  low-level features too.
"""
from typing import Sequence, Union

import torch
from torch import nn


def same_padding(kernel_size, dilation: int = 1):
    """Padding that keeps the spatial size for an odd kernel (an int or one per axis)."""
    if isinstance(kernel_size, int):
        return dilation * (kernel_size // 2)
    return [dilation * (k // 2) for k in kernel_size]


def inject_fusion(features: torch.Tensor, fused: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "residual_gate":
        return features * (1 + fused)
    if mode == "gate":
        return features * fused
    if mode == "add":
        return features + fused
    if mode == "replace":
        return fused
    raise ValueError(f"unknown MMF mode {mode!r}")


class MultiModalFusion(nn.Module):
    def __init__(self, conv_op, channels: int, norm_op, norm_op_kwargs: dict = None,
                 kernel_size: Union[int, Sequence[int]] = 3):
        super().__init__()
        norm_op_kwargs = norm_op_kwargs or {}
        pad = same_padding(kernel_size)
        self.conv1 = conv_op(2 * channels, channels, kernel_size=kernel_size, stride=1, padding=pad)
        self.act1 = nn.PReLU(channels)
        self.norm1 = norm_op(channels, **norm_op_kwargs)
        self.conv2 = conv_op(channels, channels, kernel_size=kernel_size, stride=1, padding=pad)
        self.act2 = nn.PReLU(channels)
        self.norm2 = norm_op(channels, **norm_op_kwargs)

    def forward(self, f_a: torch.Tensor, f_b: torch.Tensor) -> torch.Tensor:
        x = self.norm1(self.act1(self.conv1(torch.cat((f_a, f_b), dim=1))))
        x = self.norm2(self.act2(self.conv2(x)))
        return torch.sigmoid(x)
