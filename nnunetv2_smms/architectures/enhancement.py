"""MAE: modality-aware enhancement (Meng et al. 2025, eq. 3), an SK-style channel attention across modalities.

For branch a (branch b has its own module with the roles swapped):

    U_own = psi1(F_a), U_other = psi2(F_b)                        conv + norm + ReLU, different receptive fields
    W^a   = softmax over the two modalities (fc(gap(U_own + U_other)))      shape (B, 2, C), sums to 1 per channel
    F_a^  = W^a[:, 0] * U_own + W^a[:, 1] * U_other               the emphasised features that go to decoder a

psi1 is a convolution with the stage's planned kernel (3x3(x3); (1, 3, 3) in an anisotropic stage), psi2 the same
kernel with dilation 2 ("multiple convolutional layers with
different receptive fields"), as in selective-kernel attention; fc is a squeeze (C -> max(C/4, 16), ReLU) and an
excitation to 2C logits.

Position (not stated in the paper): by default at the bottleneck, the deepest encoder features that enter each
decoder (``mae_position='bottleneck'``); ``'all_skips'`` applies one module pair at every skip connection.
"""
from typing import Sequence, Union

import torch
from torch import nn

from nnunetv2_smms.architectures.fusion import same_padding


class ModalityAwareEnhancement(nn.Module):
    def __init__(self, conv_op, channels: int, norm_op, norm_op_kwargs: dict = None, reduction: int = 4,
                 min_hidden: int = 16, kernel_size: Union[int, Sequence[int]] = 3):
        super().__init__()
        norm_op_kwargs = norm_op_kwargs or {}
        k = kernel_size
        self.psi_own = nn.Sequential(conv_op(channels, channels, kernel_size=k, padding=same_padding(k)),
                                     norm_op(channels, **norm_op_kwargs), nn.ReLU(inplace=True))
        self.psi_other = nn.Sequential(conv_op(channels, channels, kernel_size=k, padding=same_padding(k, 2),
                                               dilation=2),
                                       norm_op(channels, **norm_op_kwargs), nn.ReLU(inplace=True))
        hidden = max(channels // reduction, min_hidden)
        self.squeeze = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True))
        self.excite = nn.Linear(hidden, 2 * channels)

    def weights_and_features(self, own: torch.Tensor, other: torch.Tensor):
        u_own, u_other = self.psi_own(own), self.psi_other(other)
        s = (u_own + u_other).flatten(2).mean(-1)  # global average pooling -> (B, C)
        logits = self.excite(self.squeeze(s)).view(s.shape[0], 2, s.shape[1])
        return torch.softmax(logits, dim=1), u_own, u_other

    def forward(self, own: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        w, u_own, u_other = self.weights_and_features(own, other)
        shape = (*w.shape[:1], w.shape[2]) + (1,) * (own.ndim - 2)
        return w[:, 0].reshape(shape) * u_own + w[:, 1].reshape(shape) * u_other
