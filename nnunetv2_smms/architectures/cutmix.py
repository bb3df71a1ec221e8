"""CutMix with one box per sample, as VerSemi uses it (Zeng et al., TMI 2025; maxwell0027/VerSemi).

The source's ``context_mask(img, r)`` (``utils1/statistic.py:8-19``) zeroes, for every sample, a box of side
``int(r * 96)`` per axis at a uniformly drawn position, and mixes ``mix(a, b) = a * M + b * (1 - M)``: the box
comes from ``b``, everything outside it from ``a``. Here:

- the box is a FRACTION of the patch per axis: side ``max(1, int(r * size))`` of each spatial axis of the tensor
  (the nnU-Net patch, 2D or 3D; an anisotropic patch gives a cuboid), not of a hard-coded 96;
- ``cube_mask`` returns ``inside`` (B, *spatial), True in the box, i.e. the source's ``1 - M``;
- the position is uniform over every position where the box fits (the source's ``randint(0, 96 - side)`` leaves
  out the last one), one box per sample, drawn with torch's global generator (nnUNet_smms_seed seeds it);
- ``mix`` works for images (B, C, ...), label maps (B, 1, ...) and per-class targets (B, K, ...) alike.
"""
from typing import Sequence, Tuple, Union

import torch

Ratio = Union[float, Tuple[float, float]]


def check_ratio(ratio: Ratio, name: str = "cube ratio") -> None:
    """A fraction in (0, 1], or a range (low, high) with 0 < low <= high <= 1."""
    values = tuple(ratio) if isinstance(ratio, (list, tuple)) else (ratio,)
    if len(values) not in (1, 2) or not all(isinstance(v, (int, float)) for v in values):
        raise ValueError(f"{name} must be a fraction of the patch (e.g. 0.667) or a range (low, high), got {ratio!r}")
    if not all(0 < v <= 1 for v in values) or (len(values) == 2 and values[0] > values[1]):
        raise ValueError(f"{name} must lie in (0, 1] (a fraction of the patch side; a range needs low <= high), "
                         f"got {ratio!r}")


def draw_ratio(ratio: Ratio) -> float:
    """A fixed fraction, or one drawn uniformly from (low, high) (the source: once per step, ``random.uniform``)."""
    check_ratio(ratio)
    if isinstance(ratio, (list, tuple)):
        low, high = float(ratio[0]), float(ratio[1])
        return low + (high - low) * float(torch.rand(()))
    return float(ratio)


def cube_side(size: int, ratio: float) -> int:
    return max(1, min(int(size), int(ratio * size)))


def cube_mask(batch: int, spatial: Sequence[int], ratio: float, device=None) -> torch.Tensor:
    """(batch, *spatial) bool, True inside one box per sample of side ``int(ratio * size)`` per axis."""
    check_ratio(ratio)
    spatial = [int(s) for s in spatial]
    inside = torch.zeros((batch, *spatial), dtype=torch.bool)
    sides = [cube_side(s, ratio) for s in spatial]
    for i in range(batch):
        starts = [int(torch.randint(0, s - side + 1, ())) for s, side in zip(spatial, sides)]
        inside[(i, *(slice(a, a + side) for a, side in zip(starts, sides)))] = True
    return inside.to(device) if device is not None else inside


def mix(a: torch.Tensor, b: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """``a`` outside the box, ``b`` inside it (the source's a * M + b * (1 - M)); any number of channels."""
    if a.shape != b.shape or a.shape[0] != inside.shape[0] or a.shape[2:] != inside.shape[1:]:
        raise ValueError(f"cannot mix {tuple(a.shape)} and {tuple(b.shape)} with a box mask {tuple(inside.shape)}")
    return torch.where(inside[:, None], b, a)


def partner_index(n: int, device=None) -> torch.Tensor:
    """Which sample is pasted into sample i: i + 1 (cyclic). The source pastes the second half of the batch into
    the first half (B/2 mixes); the cyclic shift gives B mixes from the same B cases (a batch of one pastes the
    case into itself)."""
    return torch.roll(torch.arange(n, device=device), -1)
