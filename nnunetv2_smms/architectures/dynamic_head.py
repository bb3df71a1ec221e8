"""The VerSemi network (Zeng et al., TMI 2025): the planned nnU-Net U-Net as trunk plus a DoDNet-style dynamic,
task-prompted head (maxwell0027/VerSemi ``vnet_odod_mix.py``).

Trunk (run ONCE per input, whatever the number of prompts): the encoder and decoder nnU-Net plans
(``get_network_from_plans``: PlainConvUNet or ResidualEncoderUNet, 2D or 3D, any depth). The decoder's
segmentation layers are replaced by identities and its deep supervision is off, so nnU-Net's own
``UNetDecoder.forward`` returns the last decoder stage's features (full resolution); the bottleneck is the
encoder's last output. Nothing of the decoder is copied or re-run by hand.

Head, per sample b and prompt t (one-hot over T = K + 1 prompts: the K class prompts, one per foreground label or
region of the dataset, and the synthetic "any foreground" prompt, index K):

    g_b        = GAP(bottleneck_b)                                       (C_bottleneck,)
    theta_bt   = controller([g_b || onehot(t)])                          a Linear = the source's 1x1 conv
    h_b        = precls(features_b) = conv1x1(nonlin(norm(features_b)))  (head_channels, *spatial)
    z_bt       = W_L (relu(W_{L-1} ... relu(W_1 h_b + c_1) ...)) + c_L    (*spatial), 1x1 convolutions whose
                                                                          weights and biases are cut from theta_bt

Where we differ from the source, or it is silent:
- GAP reads the encoder's bottleneck as it is: nnU-Net's stages end with norm -> nonlin already (the source
  applies its own BatchNorm + ReLU before the pooling, ``:177-181``). precls uses the plans' norm (instance norm)
  and nonlinearity instead of BatchNorm + ReLU (``:185-189``); it is initialised like nnU-Net's convolutions
  (He), the controller keeps PyTorch's default Linear init (the source: the default Conv3d init).
- The head ends in ONE logit per prompt (sigmoid = foreground probability) instead of the source's two softmax
  logits: softmax over two logits is the sigmoid of their difference, so the family of outputs is the same. The
  source's second, unused "tumor" head is not built. Hidden layers: ``hidden_layers`` = 2 of ``head_channels``
  = 8 (the source's 8 -> 8 -> 8 -> 2, ``:312-327``): 64+8 + 64+8 + 8+1 = 153 generated numbers per (b, t).
- No dropout on the bottleneck (the plans' network has none; the source's is applied only with is_train=True).

Outputs:
- train mode: ``(B, T, *spatial)`` logits of every prompt (``forward_prompts`` chooses prompts in any mode);
- eval mode: ONE tensor of nnU-Net's outputs, built from the K class prompts (the synthetic one is not used),
  so nnUNetv2_predict, its sliding windows and mirroring work unchanged:
  * label datasets (softmax), ``combination = "one_minus_max"`` (default): channels
    ``[log(1 - max_c p_c), log p_1, ..., log p_K]`` with p_c = sigmoid(z_c) (computed as logsigmoid(-max z),
    logsigmoid(z_c)); nnU-Net's softmax turns them into scores proportional to (1 - max_c p_c, p_1, ..., p_K),
    its argmax is background where every p_c < 0.5 and otherwise the class with the largest p_c;
    ``"zero_logit"``: ``[0, z_1, ..., z_K]`` (the same argmax, other probabilities);
  * region datasets (sigmoid): the K region logits z_c (nnU-Net thresholds sigmoid at 0.5 per region).
  This rule is ours (UNVERIFIED): the source evaluates each task's own binary output.
Deep supervision: none (the source has none); ``set_deep_supervision(True)`` is an error.
"""
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from torch import nn

from nnunetv2_smms.architectures.config import RecordedConfig

COMBINATIONS = ("one_minus_max", "zero_logit")


@dataclass
class DynamicHeadConfig(RecordedConfig):
    settings_name = "VerSemi network"
    n_class_prompts: int = 1          # K: foreground labels (or regions) of the dataset
    regions: bool = False             # region-based dataset: eval returns the K region logits
    head_channels: int = 8            # the source's 8
    hidden_layers: int = 2            # the source's two 8 -> 8 layers
    combination: str = "one_minus_max"

    def __post_init__(self):
        self.n_class_prompts, self.head_channels, self.hidden_layers = \
            int(self.n_class_prompts), int(self.head_channels), int(self.hidden_layers)
        self.regions = bool(self.regions)
        if self.n_class_prompts < 1:
            raise ValueError(f"VerSemi needs at least one foreground label or region, got n_class_prompts="
                             f"{self.n_class_prompts}")
        if self.head_channels < 1 or self.hidden_layers < 0:
            raise ValueError(f"head_channels must be >= 1 and hidden_layers >= 0, got {self.head_channels}, "
                             f"{self.hidden_layers}")
        if self.combination not in COMBINATIONS:
            raise ValueError(f"combination must be one of {COMBINATIONS}, got {self.combination!r}")

    @property
    def n_prompts(self) -> int:
        return self.n_class_prompts + 1

    @property
    def synthetic_prompt(self) -> int:
        return self.n_class_prompts

    def num_output_channels(self) -> int:
        """What nnU-Net expects of the eval output: K regions, or background + K labels."""
        return self.n_class_prompts if self.regions else self.n_class_prompts + 1



def combine_class_logits(class_logits: torch.Tensor, regions: bool = False,
                         combination: str = "one_minus_max") -> torch.Tensor:
    """(B, K, ...) class-prompt logits -> nnU-Net's output (module docstring)."""
    if regions:
        return class_logits
    z = class_logits.float()
    if combination == "one_minus_max":
        background = F.logsigmoid(-z.amax(1, keepdim=True))    # log(1 - max_c sigmoid(z_c))
        return torch.cat((background, F.logsigmoid(z)), 1)
    if combination == "zero_logit":
        return torch.cat((torch.zeros_like(z[:, :1]), z), 1)
    raise ValueError(f"combination must be one of {COMBINATIONS}, got {combination!r}")


class DynamicHead(nn.Module):
    """Controller (GAP(bottleneck) || one-hot prompt -> the head's parameters) and the per-sample, per-prompt
    head of 1x1 convolutions on precls(features)."""

    def __init__(self, conv_op, bottleneck_channels: int, feature_channels: int, norm_op, norm_op_kwargs, nonlin,
                 nonlin_kwargs, n_prompts: int, head_channels: int = 8, hidden_layers: int = 2):
        super().__init__()
        self.n_prompts, self.head_channels, self.hidden_layers = n_prompts, head_channels, hidden_layers
        # (weight shape (out, in), bias size) per layer: hidden layers h -> h, then h -> 1
        hidden = [((head_channels, head_channels), head_channels)] * hidden_layers
        self.layer_shapes = hidden + [((1, head_channels), 1)]
        self.n_params = sum(o * i + b for (o, i), b in self.layer_shapes)
        norm = norm_op(feature_channels, **(norm_op_kwargs or {})) if norm_op is not None else nn.Identity()
        act = nonlin(**(nonlin_kwargs or {})) if nonlin is not None else nn.Identity()
        self.precls = nn.Sequential(norm, act, conv_op(feature_channels, head_channels, kernel_size=1))
        self.precls.apply(InitWeights_He(1e-2))
        self.controller = nn.Linear(bottleneck_channels + n_prompts, self.n_params)

    def prompt_codes(self, prompts: Sequence[int], device) -> torch.Tensor:
        prompts = torch.as_tensor(list(prompts), dtype=torch.long, device=device)
        if prompts.numel() == 0 or int(prompts.min()) < 0 or int(prompts.max()) >= self.n_prompts:
            raise ValueError(f"prompts must be indices in [0, {self.n_prompts}), got {prompts.tolist()}")
        return F.one_hot(prompts, self.n_prompts)

    def params(self, bottleneck: torch.Tensor, prompts: Sequence[int]) -> torch.Tensor:
        """(B, P, n_params): the controller's output for every sample and prompt."""
        pooled = bottleneck.mean(dim=tuple(range(2, bottleneck.ndim)))              # GAP: (B, C)
        codes = self.prompt_codes(prompts, bottleneck.device).to(pooled.dtype)      # (P, T)
        b, p = pooled.shape[0], codes.shape[0]
        cond = torch.cat((pooled[:, None].expand(b, p, -1), codes[None].expand(b, p, -1)), -1)
        return self.controller(cond)

    def split_params(self, params: torch.Tensor):
        """[(weight (B, P, out, in), bias (B, P, out))] per layer, cut from (B, P, n_params) (weights first, then
        biases, as the source's parse_dynamic_params)."""
        sizes = [o * i for (o, i), _ in self.layer_shapes] + [bias for _, bias in self.layer_shapes]
        chunks = torch.split(params, sizes, dim=-1)
        n = len(self.layer_shapes)
        b, p = params.shape[:2]
        return [(chunks[k].reshape(b, p, *shape), chunks[n + k]) for k, (shape, _) in enumerate(self.layer_shapes)]

    def apply_head(self, head_inputs: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """(B, h, *spatial) precls features and (B, P, n_params) -> (B, P, *spatial) logits."""
        extra = (None,) * (head_inputs.ndim - 2)
        layers = self.split_params(params.to(head_inputs.dtype))
        x = None
        for k, (w, bias) in enumerate(layers):
            if x is None:   # the first layer reads the shared features: (B, in, ...) -> (B, P, out, ...)
                x = torch.einsum("bpoi,bi...->bpo...", w, head_inputs)
            else:
                x = torch.einsum("bpoi,bpi...->bpo...", w, x)
            x = x + bias[(..., *extra)]
            if k < len(layers) - 1:
                x = F.relu(x)
        return x[:, :, 0]

    def forward(self, bottleneck: torch.Tensor, features: torch.Tensor, prompts: Sequence[int]) -> torch.Tensor:
        return self.apply_head(self.precls(features), self.params(bottleneck, prompts))


class VerSemiNetwork(nn.Module):
    def __init__(self, unet: nn.Module, config: DynamicHeadConfig):
        super().__init__()
        if not (hasattr(unet, "encoder") and hasattr(unet, "decoder") and hasattr(unet.decoder, "seg_layers")):
            raise TypeError(f"VerSemi needs an nnU-Net encoder-decoder with a UNetDecoder (PlainConvUNet, "
                            f"ResidualEncoderUNet); the plans give {type(unet).__name__}")
        self.config = config
        self.encoder, self.decoder = unet.encoder, unet.decoder
        # the decoder's own forward then returns its last stage's features: the head replaces the seg layers
        self.decoder.seg_layers = nn.ModuleList([nn.Identity() for _ in self.decoder.seg_layers])
        self.decoder.deep_supervision = False
        enc = self.encoder
        self.head = DynamicHead(enc.conv_op, enc.output_channels[-1], enc.output_channels[0], enc.norm_op,
                                enc.norm_op_kwargs, enc.nonlin, enc.nonlin_kwargs, config.n_prompts,
                                config.head_channels, config.hidden_layers)

    @property
    def class_prompts(self) -> Tuple[int, ...]:
        return tuple(range(self.config.n_class_prompts))

    @property
    def all_prompts(self) -> Tuple[int, ...]:
        return tuple(range(self.config.n_prompts))

    def trunk(self, x: torch.Tensor):
        """(bottleneck, last decoder features): one encoder and one decoder pass."""
        skips = self.encoder(x)
        return skips[-1], self.decoder(skips)

    def forward_prompts(self, x: torch.Tensor, prompts: Optional[Sequence[int]] = None) -> torch.Tensor:
        """(B, P, *spatial) logits of ``prompts`` (default: all, class prompts first, synthetic last); the trunk
        runs once."""
        bottleneck, features = self.trunk(x)
        return self.head(bottleneck, features, self.all_prompts if prompts is None else prompts)

    def combine(self, class_logits: torch.Tensor) -> torch.Tensor:
        return combine_class_logits(class_logits, self.config.regions, self.config.combination)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.forward_prompts(x)
        return self.combine(self.forward_prompts(x, self.class_prompts))

    def set_deep_supervision(self, enabled: bool) -> None:
        if enabled:
            raise ValueError("the VerSemi network has no deep supervision (one dynamic head at full resolution); "
                             "the trainer keeps enable_deep_supervision = False")
        self.decoder.deep_supervision = False


def build_versemi_network(arch_class_name: str, arch_kwargs: dict, arch_kwargs_req_import, num_input_channels: int,
                          num_output_channels: int, config: DynamicHeadConfig) -> VerSemiNetwork:
    """The plans' U-Net (all input channels: the modalities as channels) with the dynamic head."""
    if num_output_channels != config.num_output_channels():
        raise ValueError(f"nnU-Net asks for {num_output_channels} output channels, but the VerSemi settings give "
                         f"{config.num_output_channels()} ({config.n_class_prompts} class prompts, "
                         f"regions={config.regions}); the recorded settings do not match this dataset")
    unet = get_network_from_plans(arch_class_name, arch_kwargs, arch_kwargs_req_import, num_input_channels,
                                  num_output_channels, allow_init=True, deep_supervision=False)
    return VerSemiNetwork(unet, config)
