"""DK-UXNet (Wu, Li, Zhang, ISBI 2024): one network = 3D UX-Net encoder + UNETR-style decoder + kMaX decoder; and
the pair of such networks that DK-UXNet trains mutually, in one module that nnU-Net's predictor rebuilds.

One network (:class:`DKUXNet`, 2D or 3D, from nnU-Net's number of input channels and classes):
    x (B, C_in, *s) -> zero-padded to a multiple of 16 per axis (the UX-Net's total stride; split evenly, extra
    voxel at the end) -> UXNetEncoder -> UNETRDecoder (features of strides 8, 4, 2, 1 down to ``mask_stride``) ->
    KMaXDecoder on the features of ``kmax_levels`` (source: strides 8 and 4, 2 layers each) -> KMaXHead on the
    features of stride ``mask_stride`` -> semantic logits and query-group distribution at that stride ->
    (bi/tri)linear upsampling to the padded input resolution (``mask_stride`` > 1) -> cropped back to ``s``.
    So any nnU-Net patch works: a patch that is not a multiple of 16 is padded inside the network (the padded
    voxels are seen by the convolutions and the k-means assignment, never by a loss) and the outputs have the
    input's size.
Outputs: ``outputs(x)`` -> {"semantic": (B, K, *s) logits over nnU-Net's labels, "distribution": (B, K, *s) query
mass per class group (sums to 1 over K), "mask_logits": (B, N, *s_mask_padded)} in any mode; ``forward`` returns
that dict in train mode and the semantic logits (ONE tensor) in eval mode.

``mask_stride`` (1, 2 or 4) is the memory switch: the per-query mask logits are B x N x V/stride^dim (source: 1,
i.e. full resolution; 128 queries at 96^3 are 113 M floats per sample, and the pixel head adds 256 + 128 channels
at that resolution), and with stride 2 or 4 the full-resolution (and stride-2) UNETR blocks are not built at all.

Pair (:class:`TwoDKUXNets`): ``net1``, ``net2``, two independently initialised DK-UXNets of the same
configuration; train mode ``(outputs1, outputs2)``; eval mode network 1's semantic logits, ONE tensor, so nnU-Net's
predictor (mirroring TTA, sliding windows) works unchanged; ``forward_both`` gives both dicts in any mode. The
state dict holds both (``net1.*``, ``net2.*``): nnU-Net's checkpoint carries both and loads into this module.
"""
from dataclasses import asdict, dataclass, fields
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from nnunetv2_smms.architectures.kmax_decoder import KMaXDecoder, KMaXHead, split_query_groups
from nnunetv2_smms.architectures.uxnet import NUM_STAGES, UNETRDecoder, UXNetEncoder, pad_to_multiple

MASK_STRIDES = (1, 2, 4)
PAD_MULTIPLE = 2 ** NUM_STAGES  # 16


@dataclass(frozen=True)
class DKUXNetConfig:
    """Network settings (defaults: the source's, except ``mask_stride`` and ``num_queries``, chosen for memory;
    see trainers/dkuxnet.py and benchmarks/bench_dkuxnet_memory.py)."""
    dims: Tuple[int, ...] = (48, 96, 192, 384)      # source feat_size
    depths: Tuple[int, ...] = (2, 2, 2, 2)          # source
    hidden_size: int = 768                          # source: UNETR bottleneck block (encoder5)
    kernel_size: int = 7                            # source: depthwise 7^3
    layer_scale: float = 1e-6                       # source
    drop_path_rate: float = 0.0                     # source (main_train.py)
    num_queries: int = 128                          # source
    query_groups: Optional[Tuple[int, ...]] = None  # queries per class; None: split evenly (source: 16 / 4 / rest)
    query_dim: int = 256                            # source
    kmax_levels: Tuple[int, ...] = (3, 2)           # decoder levels (stride 2^level) of the kMaX layers; source: 8, 4
    kmax_layers_per_level: int = 2                  # source
    num_heads: int = 8                              # source
    base_filters: int = 128                         # source
    ffn_dim: int = 2048                             # source
    mask_stride: int = 2                            # source: 1 (full resolution); memory choice
    pixel_head_channels: int = 256                  # source
    mask_embed_dim: int = 128                       # source
    semantic_hidden: int = 64                       # source: MLP(N*256 -> 64 -> N*K)

    @classmethod
    def from_dict(cls, values: Optional[dict]) -> "DKUXNetConfig":
        """From a (JSON) dict: unknown keys are an error, missing keys take the defaults."""
        values = dict(values or {})
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown DK-UXNet network settings {unknown}; known: {sorted(names)}")
        for key in ("dims", "depths", "kmax_levels", "query_groups"):
            if values.get(key) is not None:
                values[key] = tuple(int(v) for v in values[key])
        return cls(**values)

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @property
    def mask_level(self) -> int:
        return {1: 0, 2: 1, 4: 2}[self.mask_stride]

    def check(self, num_classes: int) -> None:
        if self.mask_stride not in MASK_STRIDES:
            raise ValueError(f"mask_stride must be one of {MASK_STRIDES} (mask logits at full, 1/2 or 1/4 "
                             f"resolution), got {self.mask_stride!r}")
        if len(self.dims) != NUM_STAGES or len(self.depths) != NUM_STAGES:
            raise ValueError(f"dims and depths need {NUM_STAGES} entries (UX-Net's stages), got "
                             f"dims={list(self.dims)}, depths={list(self.depths)}")
        bad = [l for l in self.kmax_levels if not self.mask_level <= l < NUM_STAGES]
        if not self.kmax_levels or bad:
            raise ValueError(f"kmax_levels={list(self.kmax_levels)}: each level must be one the decoder builds, "
                             f"{self.mask_level}..{NUM_STAGES - 1} (stride 2^level, down to mask_stride="
                             f"{self.mask_stride}); the source uses (3, 2), strides 8 and 4")
        if self.kmax_layers_per_level < 1:
            raise ValueError(f"kmax_layers_per_level must be >= 1, got {self.kmax_layers_per_level}")
        split_query_groups(self.num_queries, num_classes, self.query_groups)


class DKUXNet(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, config: DKUXNetConfig = DKUXNetConfig(), dim: int = 3):
        super().__init__()
        if dim not in (2, 3):
            raise ValueError(f"DK-UXNet is built for 2D or 3D patches, got {dim} spatial axes")
        config.check(num_classes)
        self.config, self.dim, self.num_classes = config, dim, num_classes
        self.decoder = UNETRDecoder(in_channels, config.dims, config.hidden_size, dim, lowest_level=config.mask_level)
        self.encoder = UXNetEncoder(in_channels, config.dims, config.depths, dim, config.kernel_size,
                                    config.layer_scale, config.drop_path_rate,
                                    out_indices=self.decoder.stage_outputs_needed())
        self.kmax = KMaXDecoder([config.dims[l] for l in config.kmax_levels], config.num_queries, config.query_dim,
                                dim, config.kmax_layers_per_level, num_heads=config.num_heads,
                                base_filters=config.base_filters, ffn_dim=config.ffn_dim,
                                pixel_head_channels=config.pixel_head_channels, embed_dim=config.mask_embed_dim)
        self.head = KMaXHead(config.dims[config.mask_level], num_classes, config.num_queries, config.query_groups,
                             config.query_dim, dim, config.pixel_head_channels, config.mask_embed_dim,
                             config.semantic_hidden)

    def outputs(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        if x.ndim != self.dim + 2:
            raise ValueError(f"this DK-UXNet is {self.dim}D: expected input (B, C, {', '.join('s' * self.dim)}), got "
                             f"shape {tuple(x.shape)}")
        padded, crop = pad_to_multiple(x, PAD_MULTIPLE)
        check_bottleneck(x.shape[2:])
        features = self.decoder(padded, self.encoder(padded))
        queries = self.kmax([features[l] for l in self.config.kmax_levels])
        out = self.head(queries, features[self.config.mask_level])
        for key in ("semantic", "distribution"):
            y = out[key]
            if self.config.mask_stride > 1:
                y = F.interpolate(y.float() if key == "distribution" else y, size=padded.shape[2:],
                                  mode="bilinear" if self.dim == 2 else "trilinear", align_corners=False)
            out[key] = y[crop]
        return out

    def forward(self, x: torch.Tensor):
        out = self.outputs(x)
        return out if self.training else out["semantic"]


class TwoDKUXNets(nn.Module):
    def __init__(self, net1: DKUXNet, net2: DKUXNet):
        super().__init__()
        self.net1, self.net2 = net1, net2

    def forward(self, x: torch.Tensor):
        if self.training:
            return self.net1.outputs(x), self.net2.outputs(x)
        return self.net1(x)

    def forward_both(self, x: torch.Tensor):
        """Both networks' output dicts in any mode (validation scores each)."""
        return self.net1.outputs(x), self.net2.outputs(x)

    def networks(self) -> Sequence[DKUXNet]:
        return self.net1, self.net2


def build_dkuxnet_pair(num_input_channels: int, num_classes: int, patch_size: Sequence[int],
                       config: DKUXNetConfig = DKUXNetConfig()) -> TwoDKUXNets:
    """Two DK-UXNets for nnU-Net's plans: 2D or 3D from the patch's number of axes."""
    dim = len(patch_size)
    if dim not in (2, 3):
        raise ValueError(f"DK-UXNet needs a 2D or 3D configuration; the plans' patch_size {list(patch_size)} has "
                         f"{dim} axes")
    return TwoDKUXNets(DKUXNet(num_input_channels, num_classes, config, dim),
                       DKUXNet(num_input_channels, num_classes, config, dim))


def padded_patch(patch_size: Sequence[int]) -> Tuple[int, ...]:
    """The size the network pads a patch to (a multiple of 16 per axis)."""
    return tuple(int(p) + (-int(p)) % PAD_MULTIPLE for p in patch_size)


def check_bottleneck(patch_size: Sequence[int]) -> None:
    """The stride-16 features need more than one voxel (the instance norms of the UNETR bottleneck): a patch with
    every axis <= 16 is refused."""
    if all(p <= PAD_MULTIPLE for p in padded_patch(patch_size)):
        raise ValueError(f"DK-UXNet: patch {[int(p) for p in patch_size]} is padded to "
                         f"{list(padded_patch(patch_size))}, a single voxel at the backbone's stride 16; use a patch "
                         f"(nnU-Net plans: patch_size) with at least one axis larger than 16")
