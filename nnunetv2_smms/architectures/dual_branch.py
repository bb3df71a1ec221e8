"""The SMMS dual-branch network: one planned nnU-Net encoder-decoder per modality, joined by MMF and MAE.

Both branches are built from the plans' own architecture entry (PlainConvUNet, ResidualEncoderUNet / the
ResEnc presets; 2D or 3D; any number of stages) and keep their ``encoder`` and ``decoder`` as nnU-Net built
them; this module only steps the two encoders stage by stage so that MMF can join them.

Outputs:
- train mode: ``(out_a, out_b)``, each what an nnU-Net decoder returns (a list of deep-supervision outputs, or
  one tensor when deep supervision is off);
- eval mode: ONE tensor (list when deep supervision is on), so nnU-Net's predictor, mirroring TTA and sliding
  windows work unchanged. ``output_branch`` chooses it: ``'fused'`` (default) is the mean of the two branches'
  logits (works for softmax and for region/sigmoid training; the predictor also averages logits over mirrors
  and folds), ``'a'`` / ``'b'`` return one branch (per-modality evaluation).
Parameter names do not depend on the deep-supervision flag (the decoders always own their seg layers).
"""
from typing import List, Tuple

import torch
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from torch import nn

from nnunetv2_smms.architectures.config import OUTPUT_BRANCHES, SMMSNetworkConfig
from nnunetv2_smms.architectures.enhancement import ModalityAwareEnhancement
from nnunetv2_smms.architectures.fusion import MultiModalFusion, inject_fusion


class DualBranchUNet(nn.Module):
    def __init__(self, branch_a: nn.Module, branch_b: nn.Module, config: SMMSNetworkConfig):
        super().__init__()
        for name, br in (("a", branch_a), ("b", branch_b)):
            if not (hasattr(br, "encoder") and hasattr(br.encoder, "stages") and hasattr(br, "decoder")):
                raise TypeError(f"SMMS needs an encoder-decoder architecture with .encoder.stages and .decoder "
                                f"(PlainConvUNet, ResidualEncoderUNet); branch {name} is {type(br).__name__}")
        self.branch_a, self.branch_b = branch_a, branch_b
        self.channels_a, self.channels_b = list(config.channels_a), list(config.channels_b)
        self.mmf_mode = config.mmf_mode
        self.output_branch = config.output_branch

        enc = branch_a.encoder
        conv_op, norm_op, norm_kwargs = enc.conv_op, enc.norm_op, enc.norm_op_kwargs
        features = list(enc.output_channels)
        n_stages = len(features)
        # per stage, as planned: an int or one int per axis
        kernels = [[int(x) for x in k] if isinstance(k, (list, tuple)) else int(k) for k in enc.kernel_sizes]
        init = InitWeights_He(1e-2)

        self.mmf_stages = min(config.mmf_stages, n_stages - 1) if config.mmf else 0
        self.mmf = nn.ModuleList(
            MultiModalFusion(conv_op, features[s], norm_op, norm_kwargs,
                             kernels[s] if config.mmf_kernel_size == 3 else 1)
            for s in range(self.mmf_stages))
        if not config.mae:
            self.mae_levels: List[int] = []
        elif config.mae_position == "bottleneck":
            self.mae_levels = [n_stages - 1]
        else:
            self.mae_levels = list(range(n_stages))
        self.mae_a = nn.ModuleDict({str(l): ModalityAwareEnhancement(conv_op, features[l], norm_op, norm_kwargs,
                                                                     kernel_size=kernels[l]) for l in self.mae_levels})
        self.mae_b = nn.ModuleDict({str(l): ModalityAwareEnhancement(conv_op, features[l], norm_op, norm_kwargs,
                                                                     kernel_size=kernels[l]) for l in self.mae_levels})
        dropout_cls = {nn.Conv2d: nn.Dropout2d, nn.Conv3d: nn.Dropout3d}[conv_op]
        self.dropout = dropout_cls(config.dropout_p) if config.dropout_p > 0 else nn.Identity()
        for m in (self.mmf, self.mae_a, self.mae_b):
            m.apply(init)

    # ----------------------------------------------------------------------------------------------------------
    def split_input(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        needed = max(self.channels_a + self.channels_b) + 1
        if x.shape[1] < needed:
            # nnUNetv2_predict reads only the files a case has: a missing modality arrives as a missing channel
            raise ValueError(
                f"the SMMS network got {x.shape[1]} input channel(s), its branches read channels a={self.channels_a}"
                f" and b={self.channels_b}: a case probably lacks a modality's file (CASE_XXXX). Predict such cases "
                f"with 'nnunetv2_smms predict' (same options as nnUNetv2_predict): it predicts them with the branch "
                f"of the modality that is present.")
        return x[:, self.channels_a], x[:, self.channels_b]

    def encode(self, x_a: torch.Tensor, x_b: torch.Tensor) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        enc_a, enc_b = self.branch_a.encoder, self.branch_b.encoder
        if getattr(enc_a, "stem", None) is not None:
            x_a, x_b = enc_a.stem(x_a), enc_b.stem(x_b)
        skips_a, skips_b = [], []
        for s, (stage_a, stage_b) in enumerate(zip(enc_a.stages, enc_b.stages)):
            x_a, x_b = stage_a(x_a), stage_b(x_b)
            if s < self.mmf_stages:
                f_ab = self.mmf[s](x_a, x_b)
                x_a, x_b = inject_fusion(x_a, f_ab, self.mmf_mode), inject_fusion(x_b, f_ab, self.mmf_mode)
            skips_a.append(x_a)
            skips_b.append(x_b)
        return skips_a, skips_b

    def enhance(self, skips_a: List[torch.Tensor], skips_b: List[torch.Tensor]):
        skips_a, skips_b = list(skips_a), list(skips_b)
        for l in self.mae_levels:
            f_a, f_b = skips_a[l], skips_b[l]
            skips_a[l] = self.mae_a[str(l)](f_a, f_b)
            skips_b[l] = self.mae_b[str(l)](f_b, f_a)
        skips_a[-1], skips_b[-1] = self.dropout(skips_a[-1]), self.dropout(skips_b[-1])
        return skips_a, skips_b

    def forward_branches(self, x: torch.Tensor, need_a: bool = True, need_b: bool = True):
        skips_a, skips_b = self.enhance(*self.encode(*self.split_input(x)))
        out_a = self.branch_a.decoder(skips_a) if need_a else None
        out_b = self.branch_b.decoder(skips_b) if need_b else None
        return out_a, out_b

    @staticmethod
    def fuse(out_a, out_b):
        if isinstance(out_a, (list, tuple)):
            return [(a + b) / 2 for a, b in zip(out_a, out_b)]
        return (out_a + out_b) / 2

    def forward(self, x: torch.Tensor):
        if self.training:
            return self.forward_branches(x)
        branch = self.output_branch
        out_a, out_b = self.forward_branches(x, need_a=branch != "b", need_b=branch != "a")
        if branch == "a":
            return out_a
        if branch == "b":
            return out_b
        return self.fuse(out_a, out_b)

    def set_deep_supervision(self, enabled: bool) -> None:
        self.branch_a.decoder.deep_supervision = enabled
        self.branch_b.decoder.deep_supervision = enabled


def unwrap(network: nn.Module) -> nn.Module:
    """The module itself, under DDP (.module) and torch.compile (._orig_mod) wrappers."""
    while True:
        if hasattr(network, "module") and isinstance(network.module, nn.Module):
            network = network.module
        elif hasattr(network, "_orig_mod"):
            network = network._orig_mod
        else:
            return network


def has_branches(network: nn.Module) -> bool:
    """Whether the network has one output per modality (an SMMS dual-branch network, or any network with
    ``forward_branches`` and an ``output_branch`` switch, e.g. CMC's)."""
    mod = unwrap(network)
    return hasattr(mod, "forward_branches") and hasattr(mod, "output_branch")


def set_output_branch(network: nn.Module, branch: str) -> None:
    """Make an SMMS network return 'fused', 'a' or 'b' in eval mode (e.g. predictor.network)."""
    if branch not in OUTPUT_BRANCHES:
        raise ValueError(f"branch must be one of {OUTPUT_BRANCHES}, got {branch!r}")
    mod = unwrap(network)
    if not has_branches(mod):
        raise TypeError(f"{type(mod).__name__} is not a network with one branch per modality; it has no branches")
    mod.output_branch = branch
