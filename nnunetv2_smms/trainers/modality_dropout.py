"""Modality dropout: a whole branch's input set to zero, per sample, so that an SMMS model learns to predict when a
modality is missing at inference (``nnunetv2_smms predict``, inference/missing_modality.py).

The rule, per sample of a batch (one uniform draw u per sample):
    u < p / 2          -> branch a's channels are 0
    p / 2 <= u < p     -> branch b's channels are 0
    otherwise          -> the sample is unchanged
so a sample loses a branch with probability p, each branch with p / 2, and NEVER both (a sample without any input
teaches nothing). This is the usual recipe (ModDrop, Neverova et al. 2015; "modality dropout", Lau et al. 2019,
arXiv:1908.06683; ivadomed's input-level dropout, notes ssl-methods-facts.md section 4, which only names it);
the sources give no p for this setting, ours is a class attribute.

What replaces the input: 0, the normalised mean. nnU-Net's z-score normalisation maps a constant image to 0
(preprocessing/normalization/default_normalization_schemes.py, ZScoreNormalization.run), so the zero-filled file
that prediction writes for a missing modality is 0 after preprocessing: training sees what prediction sees.
MMF and MAE get no "missing" flag: they see the features of the zero input only (the simplest faithful reading; a
flag would be a new network input the paper does not have). The dropout acts on the batch as the network receives
it (after nnU-Net's augmentation), so a dropped channel is exactly 0.

p = 0 returns the batch itself and draws no random numbers: the training update is bit-for-bit the one without
this code (the network's own dropout draws the same masks).
"""
from typing import Sequence, Tuple

import torch

KEPT, DROPPED_A, DROPPED_B = 0, 1, 2


def drop_modalities(x: torch.Tensor, channels_a: Sequence[int], channels_b: Sequence[int], p: float,
                    generator: torch.Generator = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(the batch with each dropped branch's channels set to 0, per sample KEPT / DROPPED_A / DROPPED_B).

    The draw is on the CPU (torch's global generator unless ``generator`` is given; nnUNet_smms_seed seeds it), the
    same on every device."""
    n = x.shape[0]
    if not 0 <= p <= 1:
        raise ValueError(f"modality dropout p must be in [0, 1], got {p}")
    if p == 0:
        return x, torch.full((n,), KEPT, dtype=torch.long)
    u = torch.rand(n, generator=generator)
    which = torch.where(u < p / 2, DROPPED_A, torch.where(u < p, DROPPED_B, KEPT))
    zero = torch.zeros(n, x.shape[1], dtype=torch.bool)
    zero[:, list(channels_a)] = (which == DROPPED_A)[:, None]
    zero[:, list(channels_b)] = (which == DROPPED_B)[:, None]
    zero = zero.view(n, x.shape[1], *([1] * (x.ndim - 2))).to(x.device, non_blocking=True)
    return x.masked_fill(zero, 0), which
