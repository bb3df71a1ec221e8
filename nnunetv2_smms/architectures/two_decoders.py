"""One nnU-Net encoder, two nnU-Net decoders that differ in how they upsample (MLRPL, Su et al. MedIA 2024).

The authors' network ``Mine3d_v1`` (their ``code/networks/VNet.py``) has one VNet encoder and two decoders: decoder 1
upsamples with a transposed convolution (``up_type`` 0), decoder 2 with nearest-neighbour interpolation followed by
a 3x3x3 convolution (``up_type`` 2). Here both the encoder and the decoders are the ones nnU-Net plans
(``get_network_from_plans``: PlainConvUNet or ResidualEncoderUNet, 2D or 3D, any depth):
- ``decoder1`` is nnU-Net's decoder unchanged (transposed convolutions);
- ``decoder2`` is a second nnU-Net decoder (nnU-Net's initialisation, another random draw) whose transposed
  convolutions are replaced by :class:`InterpolationUpsampling`: interpolation by the stage's stride
  (``"nearest"``, the source's decoder 2; or ``"linear"``, i.e. bilinear/trilinear with align_corners, the source's
  ``up_type`` 1) and a convolution with the planned kernel of the stage it feeds (the source: 3x3x3). Like nnU-Net's
  transposed convolution, and unlike the source's upsampling blocks, it has no norm or nonlinearity of its own: the
  decoder stage that follows normalises.

Both decoders expose their full-resolution pre-logit features (the last decoder stage's output, the input of the
last segmentation layer); nnU-Net's stock decoder returns logits only, so :meth:`TwoDecoderUNet.decode` runs a
decoder's own modules in the order of ``UNetDecoder.forward`` (dynamic_network_architectures
``building_blocks/unet_decoder.py:100-125``) and returns the features too.

Dropout as in the source's training network (``net_factory`` builds ``Mine3d_v1`` with ``has_dropout=True``):
channel dropout p = 0.5 on the bottleneck, shared by both decoders (``Encoder.forward``), and p = 0.5 on each
decoder's full-resolution features, which then give both the logits and the returned features
(``Decoder_v1.forward``). Train mode only; 0 turns either off.

Outputs: train mode ``(out1, out2, features1, features2)`` (``out*``: what an nnU-Net decoder returns, a
deep-supervision list or one tensor); eval mode ONE tensor (list with deep supervision on): decoder 1's, as the
authors test with the first output only (``utils/test_patch.py:192-197``, ``test_3d.py:69-71``).
"""
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
from dynamic_network_architectures.building_blocks.unet_residual_decoder import UNetResDecoder
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from torch import nn

UPSAMPLINGS = ("nearest", "linear")


def _per_axis(value, dim: int) -> Tuple[int, ...]:
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),) * dim


class InterpolationUpsampling(nn.Module):
    """Interpolation by ``stride`` (per axis), then a convolution from ``in_channels`` to ``out_channels``."""

    def __init__(self, conv_op, in_channels: int, out_channels: int, stride, kernel_size, mode: str = "nearest",
                 bias: bool = True):
        super().__init__()
        if mode not in UPSAMPLINGS:
            raise ValueError(f"upsampling must be one of {UPSAMPLINGS}, got {mode!r}")
        dim = {nn.Conv2d: 2, nn.Conv3d: 3}[conv_op]
        self.scale_factor = tuple(float(s) for s in _per_axis(stride, dim))
        self.mode = mode if mode == "nearest" else {2: "bilinear", 3: "trilinear"}[dim]
        kernel = _per_axis(kernel_size, dim)
        self.conv = conv_op(in_channels, out_channels, kernel, 1, [k // 2 for k in kernel], bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kwargs = {} if self.mode == "nearest" else {"align_corners": True}
        return self.conv(F.interpolate(x, scale_factor=self.scale_factor, mode=self.mode, **kwargs))


def use_interpolation_upsampling(decoder: nn.Module, encoder: nn.Module, mode: str) -> None:
    """Replace the decoder's transposed convolutions by InterpolationUpsampling (same channels and strides)."""
    ups = []
    for s in range(1, len(encoder.output_channels)):
        ups.append(InterpolationUpsampling(encoder.conv_op, encoder.output_channels[-s],
                                           encoder.output_channels[-(s + 1)], encoder.strides[-s],
                                           encoder.kernel_sizes[-(s + 1)], mode, bias=encoder.conv_bias))
    decoder.transpconvs = nn.ModuleList(ups)
    decoder.transpconvs.apply(InitWeights_He(1e-2))


class TwoDecoderUNet(nn.Module):
    def __init__(self, encoder: nn.Module, decoder1: nn.Module, decoder2: nn.Module, feature_dropout: float = 0.5,
                 bottleneck_dropout: float = 0.5):
        super().__init__()
        self.encoder, self.decoder1, self.decoder2 = encoder, decoder1, decoder2
        dropout = {nn.Conv2d: nn.Dropout2d, nn.Conv3d: nn.Dropout3d}[encoder.conv_op]
        self.bottleneck_dropout = dropout(bottleneck_dropout) if bottleneck_dropout > 0 else nn.Identity()
        self.feature_dropout = dropout(feature_dropout) if feature_dropout > 0 else nn.Identity()

    def decoders(self) -> Sequence[nn.Module]:
        return self.decoder1, self.decoder2

    def decode(self, decoder: nn.Module, skips: List[torch.Tensor]):
        """(what ``decoder(skips)`` returns, the full-resolution pre-logit features); the features pass the
        feature dropout (train mode) before the last segmentation layer."""
        x = skips[-1]
        last = len(decoder.stages) - 1
        seg = []
        for s in range(last + 1):
            x = decoder.stages[s](torch.cat((decoder.transpconvs[s](x), skips[-(s + 2)]), 1))
            if s == last:
                x = self.feature_dropout(x)
            if decoder.deep_supervision or s == last:
                seg.append(decoder.seg_layers[s](x))
        seg = seg[::-1]
        return (seg if decoder.deep_supervision else seg[0]), x

    def encode(self, x: torch.Tensor) -> List[torch.Tensor]:
        skips = list(self.encoder(x))
        skips[-1] = self.bottleneck_dropout(skips[-1])
        return skips

    def forward(self, x: torch.Tensor):
        skips = self.encode(x)
        if not self.training:
            return self.decode(self.decoder1, skips)[0]
        out1, features1 = self.decode(self.decoder1, skips)
        out2, features2 = self.decode(self.decoder2, skips)
        return out1, out2, features1, features2

    def forward_both(self, x: torch.Tensor):
        """Both decoders' outputs in any mode (validation scores each)."""
        skips = self.encode(x)
        return self.decode(self.decoder1, skips)[0], self.decode(self.decoder2, skips)[0]

    def set_deep_supervision(self, enabled: bool) -> None:
        for decoder in self.decoders():
            decoder.deep_supervision = enabled


def build_two_decoder_network(arch_class_name: str, arch_kwargs: dict, arch_kwargs_req_import,
                              num_input_channels: int, num_output_channels: int, deep_supervision: bool = True,
                              decoder2_upsampling: str = "nearest", feature_dropout: float = 0.5,
                              bottleneck_dropout: float = 0.5) -> TwoDecoderUNet:
    def planned():
        return get_network_from_plans(arch_class_name, arch_kwargs, arch_kwargs_req_import, num_input_channels,
                                      num_output_channels, allow_init=True, deep_supervision=deep_supervision)

    net, other = planned(), planned()
    if not isinstance(net.decoder, (UNetDecoder, UNetResDecoder)):
        raise TypeError(f"MLRPL needs an nnU-Net encoder-decoder with a UNetDecoder (PlainConvUNet, "
                        f"ResidualEncoderUNet); the plans build {type(net).__name__} with {type(net.decoder).__name__}")
    decoder2 = other.decoder
    decoder2.encoder = net.encoder  # the decoder keeps a reference to its encoder: the one shared encoder
    use_interpolation_upsampling(decoder2, net.encoder, decoder2_upsampling)
    return TwoDecoderUNet(net.encoder, net.decoder, decoder2, feature_dropout, bottleneck_dropout)
